"""Time to first token with and without the prompt cache (issue 11), and what resuming reads.

    python bench/prompt_cache.py --doc-tokens 4096 --out bench/results/prompt_cache_cpu.json

For one document of --doc-tokens tokens and a short question, in one process on the same model:
  no cache   prefill document + question, then the first token
  first run  prefill the document through the cache (writes it), the question, the first token
  resumed    read the document's KV from the cache (no prefill), prefill the question, the first token
Timings start after the model is loaded; they are medians of --reps runs (the first run once per rep, into a
fresh file). The page cache is warm for "resumed" (the file was just written), as in a rerun of a session.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write_results  # noqa: E402

import torch  # noqa: E402

from offload import LLM  # noqa: E402


def document_ids(llm, n: int) -> list[int]:
    lines, i = [], 0
    text = ""
    while True:
        lines.append(f"Record {i}: the crate on shelf {i % 97} holds {(i * 7919) % 1000} bolts and {i % 13} lamps.")
        i += 1
        if i % 64 == 0:
            text = "\n".join(lines)
            ids = llm.tokenizer.encode(text, add_special_tokens=True)
            if len(ids) >= n:
                return ids[:n]


def first_token(sess, doc, question, cache=None) -> tuple[float, int]:
    t0 = time.perf_counter()
    if cache is None:
        logits = sess.prefill(doc + question)
    else:
        sess.prefill(doc, prompt_cache=cache)
        logits = sess.prefill(question)
    tok = int(logits.argmax())
    return time.perf_counter() - t0, tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--doc-tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=None, help="where the cache file goes (default: a temp dir)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    os.environ.setdefault("OFFLOAD_NO_PROGRESS", "1")
    llm = LLM(a.model, device=a.device, ctx=a.doc_tokens + 1024)
    doc = document_ids(llm, a.doc_tokens)
    question = llm.tokenizer.encode("\nWhich shelf holds the crate with the most lamps?", add_special_tokens=False)
    work = Path(a.dir or tempfile.mkdtemp(prefix="pcbench-"))
    times = {"no cache": [], "first run (writes the cache)": [], "resumed": []}
    tokens = set()
    for rep in range(a.reps):
        cache = work / f"doc-{rep}.kvc"
        for name, c in (("no cache", None), ("first run (writes the cache)", cache), ("resumed", cache)):
            s = llm.session()
            dt, tok = first_token(s, doc, question, c)
            s.close()
            times[name].append(dt)
            tokens.add(tok)
    size = (work / "doc-0.kvc").stat().st_size
    base = median(times["no cache"])
    rows = [{"run": k, "ttft_s": round(median(v), 3), "vs no cache": round(median(v) / base, 3),
             "all_s": [round(x, 3) for x in v]} for k, v in times.items()]
    for r in rows:
        r["cache_file_MiB"] = round(size / 2**20, 1)
    assert len(tokens) == 1, "the first token must not depend on the cache"
    write_results("prompt_cache", rows, a.out, {"model": llm.name, "doc_tokens": len(doc),
                                                "question_tokens": len(question), "dtype": str(llm.dtype),
                                                "command": " ".join(sys.argv)})
    for p in work.glob("doc-*.kvc"):
        p.unlink()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
