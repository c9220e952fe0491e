"""Time to first token of a follow-up turn vs the first turn, through offload-serve (streamed over HTTP).

A live server on localhost (uvicorn on a thread of this process). Turn 1 sends a long document and a question
(~`--doc-tokens` tokens of prompt: prefilled whole); turn 2 sends the whole conversation back plus a short
question, which the server resumes by prefix (only the new turn is prefilled). Then another conversation
runs, which parks the first on disk (--live 1), and turn 3 of the first resumes from the disk.
TTFT is measured at the client: from sending the request to the first streamed content.

    python bench/serve_followup.py --ctx 8K --doc-tokens 7600        # CPU, SmolLM2-135M
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OFFLOAD_NO_PROGRESS", "1")

SENTENCES = ["The {n}th lighthouse keeper logged a storm from the north.",
             "Archive shelf {n} holds letters about the river trade.",
             "On day {n} the harbour master counted forty ships.",
             "Ledger page {n} lists the price of salt and copper."]


def document(tok, n_tokens: int) -> str:
    parts, n = [], 0
    while n < n_tokens:
        s = SENTENCES[len(parts) % len(SENTENCES)].format(n=len(parts) + 1)
        parts.append(s)
        n += len(tok.encode(" " + s))
    return " ".join(parts)


def ask(url: str, model: str, messages: list, max_tokens: int) -> tuple[float, str, dict]:
    """(seconds to the first content, the answer, usage) of one streamed request. httpx speaks the same SSE the
    openai client reads (tests/test_server.py uses the client); it is pure Python, so the GPU box can carry it."""
    import httpx
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, text, usage = None, [], {}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            choice = chunk["choices"][0] if chunk.get("choices") else {}
            if choice.get("delta", {}).get("content") or choice.get("finish_reason"):
                # the first text, or the end: random weights (--load-format dummy) rarely sample a printable
                # byte, so run them with --max-tokens 1 and the end is the first token
                first = first or time.perf_counter() - t0
                text.append(choice["delta"].get("content") or "")
            if chunk.get("usage"):
                u = chunk["usage"]
                usage = {"prompt_tokens": u["prompt_tokens"], "cached_tokens": u["prompt_tokens_details"]["cached_tokens"]}
    return (first if first is not None else time.perf_counter() - t0), "".join(text), usage


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ctx", default="8K")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--doc-tokens", type=int, default=7600)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--load-format", default="auto", help="dummy: random weights and a byte tokenizer (GPU runs)")
    ap.add_argument("--gpu-cap-gib", type=float, default=None, help="cap this process's GPU memory (24: a 24 GB card)")
    ap.add_argument("--out", default="bench/results/serve_followup.json")
    args = ap.parse_args()

    from offload.config import OffloadConfig
    from offload.server.app import create_app
    from offload.server.cli import Running, build_service

    if args.gpu_cap_gib:
        import torch
        torch.cuda.set_per_process_memory_fraction(args.gpu_cap_gib * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    cfg = OffloadConfig(model=args.model, device=args.device, ctx=args.ctx, load_format=args.load_format)
    service = build_service(cfg, max_tokens=1024,
                            max_body=64 << 20, queue=4, park_dir=None, park_mem=8 << 30, live=1, show_progress=False)
    run = Running(create_app(service))
    model = service.served[0]
    try:
        doc = document(service.llm.tokenizer, args.doc_tokens)
        convo = [{"role": "user", "content": f"{doc}\n\nWhich shelf holds letters about the river trade?"}]
        t1, a1, u1 = ask(run.url, model, convo, args.max_tokens)
        convo += [{"role": "assistant", "content": a1}, {"role": "user", "content": "And what did the keeper log?"}]
        t2, a2, u2 = ask(run.url, model, convo, args.max_tokens)
        ask(run.url, model, [{"role": "user", "content": "A short other conversation."}], 4)   # parks the first
        convo += [{"role": "assistant", "content": a2}, {"role": "user", "content": "Thank you. One more?"}]
        t3, a3, u3 = ask(run.url, model, convo, args.max_tokens)
        stats = service.stats()
    finally:
        run.stop()
        service.close()
    out = {"bench": "serve_followup", "date": datetime.date.today().isoformat(), "model": model,
           "device": (f"cpu ({os.cpu_count()} cores, {platform.machine()})" if service.llm.device.type == "cpu" else
                   __import__("torch").cuda.get_device_name(0) + (f", capped at {args.gpu_cap_gib} GiB"
                                                                     if args.gpu_cap_gib else "")),
        "ctx": service.llm.ctx, "load_format": args.load_format,
           "turn1": {"ttft_s": round(t1, 3), **u1}, "followup": {"ttft_s": round(t2, 3), **u2},
           "followup_after_park": {"ttft_s": round(t3, 3), **u3},
           "ratio_followup_to_first": round(t2 / t1, 4), "ratio_after_park_to_first": round(t3 / t1, 4),
           "prefix_cache": stats["prefix_cache"], "command": "python " + " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"| turn | prompt tokens | cached | TTFT s | vs turn 1 |\n|---|---|---|---|---|")
    for name, t, u in (("1 (document + question)", t1, u1), ("2 (follow-up)", t2, u2),
                       ("3 (follow-up, parked on disk in between)", t3, u3)):
        print(f"| {name} | {u.get('prompt_tokens')} | {u.get('cached_tokens')} | {t:.2f} | {t / t1:.1%} |")


if __name__ == "__main__":
    main()
