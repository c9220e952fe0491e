"""Accuracy cost of sparse prefill on the real SmolLM2-135M-Instruct: needles and teacher forcing (issue 11).

    python bench/fidelity_prefill.py [--contexts 2K:1,4K:1,8K:2] [--thresholds 0.95] [--prefill-chunk 2048]
        [--parts needle,teacher] [--device cpu|cuda] [--model PATH] [--out bench/out/fidelity_prefill.json]

needle   the whole prompt (chat head + haystack with passkeys + question + answer prefix) is prefilled with
         exact and with sparse prefill, then decoded greedily (decode itself is exact in both): answers equal
         to exact prefill's, and correct. Cases from bench/fidelity_data.py (depths 10-90 %, single and 3-key).
teacher  natural text of --teacher-context tokens prefilled both ways, then --continuation tokens teacher-forced
         through exact decode: top-1 agreement with the exact-prefill session and mean KL.
Sparse prefill only touches a chunk whose history exceeds the sinks and the local band (1,152 tokens at the
defaults), so with 2K chunks a 2K prompt is prefilled exactly; --prefill-chunk 512 tests it harder.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, print_table  # noqa: E402
from fidelity_data import extract_digits, haystack_ids, needle_cases, teacher_text_ids  # noqa: E402

from offload import LLM  # noqa: E402
from offload.config import parse_tokens  # noqa: E402
from offload.engine.sparse_prefill import SparsePrefill  # noqa: E402

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.0f}s] {msg}", flush=True)


def session(llm, mode: str):
    """A session whose dense backend prefills exactly or with the given SparsePrefill."""
    sess = llm.session(prefill="exact")
    if isinstance(mode, SparsePrefill):
        sess.attn.sparse_prefill = mode
    return sess


def answer(llm, mode, ids: list[int], max_new: int, base=None) -> tuple[str, dict]:
    """Greedy answer after prefilling ids; `base` (a session holding ids' first prefill chunk, which every mode
    prefills exactly: it has no history) is forked, so that chunk is computed once per case."""
    if base is not None:
        sess = base.fork(prefill="exact")
        if isinstance(mode, SparsePrefill):
            sess.attn.sparse_prefill = mode
        logits = sess.prefill(ids[base.length:])
    else:
        sess = session(llm, mode)
        logits = sess.prefill(ids)
    out: list[int] = []
    eos = set(llm.tokenizer.eos_token_ids)
    for i in range(max_new):
        tok = int(torch.argmax(logits))
        if tok in eos:
            break
        out.append(tok)
        if re.search(r"\d\D", llm.tokenizer.decode(out)):
            break
        logits = sess.step(tok)
    st = sess.stats()
    sess.close()
    return llm.tokenizer.decode(out), st


def run_needle(llm, args, modes: dict) -> dict:
    tok = llm.tokenizer
    hay = haystack_ids(tok)
    depths = [float(d) for d in args.depths.split(",")]
    cases = []
    for item in args.contexts.split(","):
        ctx, _, segs = item.partition(":")
        cases += needle_cases(tok, hay, [parse_tokens(ctx)], depths, args.kinds.split(","), haystacks=int(segs or 1),
                              seed=args.seed, reserve=args.max_new + 6)
    if args.haystacks:
        cases = [c for c in cases if c.haystack in {int(x) for x in args.haystacks.split(",")}]
    log(f"needle: {len(cases)} cases x {len(modes)} prefill modes")
    results = []
    for case in cases:
        ids = case.head + case.doc + case.tail
        row = {"case": case.name, "context": case.context, "answer": case.answer, "tokens": len(ids), "modes": {}}
        base = None
        if len(ids) > llm.config.prefill_chunk:
            base = session(llm, "exact")
            base.prefill(ids[:llm.config.prefill_chunk])
        for label, mode in modes.items():
            t0 = time.perf_counter()
            text, st = answer(llm, mode, ids, args.max_new, base)
            row["modes"][label] = {"digits": extract_digits(text), "text": text, "s": round(time.perf_counter() - t0, 1),
                                   "density": st.get("sparse_prefill_density")}
        if base is not None:
            base.close()
        log("  " + case.name + " key " + case.answer + " " +
            " ".join(f"{k}={v['digits'] or '-'}" + (f"(d={v['density']})" if v["density"] else "")
                     for k, v in row["modes"].items()))
        results.append(row)
        Path(args.out + ".partial").write_text(json.dumps(results, indent=1))
    rows = []
    for label in modes:
        for ctx in sorted({r["context"] for r in results}) + [None]:
            sel = [r for r in results if ctx is None or r["context"] == ctx]
            same = sum(r["modes"][label]["digits"] == r["modes"]["exact"]["digits"] for r in sel)
            right = sum(r["modes"][label]["digits"] == r["answer"] for r in sel)
            dens = [r["modes"][label]["density"] for r in sel if r["modes"][label]["density"] is not None]
            rows.append({"prefill": label, "context": "all" if ctx is None else ctx, "cases": len(sel),
                         "equal_to_exact": same / len(sel), "correct": right / len(sel),
                         "density": sum(dens) / len(dens) if dens else None})
    return {"cases": results, "rows": rows}


def run_teacher(llm, args, modes: dict) -> dict:
    tok = llm.tokenizer
    ids = teacher_text_ids(tok, haystack_ids(tok), args.teacher_context, args.continuation)
    n = args.teacher_context
    ref_lp, rows = None, []
    for label, mode in modes.items():
        sess = session(llm, mode)
        lp = [torch.log_softmax(sess.prefill(ids[:n]).float(), -1)]
        for t in ids[n:-1]:
            lp.append(torch.log_softmax(sess.step(t).float(), -1))  # lp[i]: [V]
        lp = torch.stack(lp)  # lp: [continuation, V]
        st = sess.stats()
        sess.close()
        if ref_lp is None:
            ref_lp = lp
        kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)  # kl: [continuation]
        rows.append({"prefill": label, "top1_agree": (lp.argmax(-1) == ref_lp.argmax(-1)).float().mean().item(),
                     "kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
                     "density": st.get("sparse_prefill_density")})
        log(f"teacher {label}: {rows[-1]}")
    return {"context": n, "continuation": args.continuation, "rows": rows}


def merge(paths: list[str], out: str) -> None:
    """Combine needle runs split over processes (--haystacks) into one table."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    cases = [c for d in docs for c in d["needle"]["cases"]]
    labels = list(cases[0]["modes"])
    rows = []
    for label in labels:
        for ctx in sorted({c["context"] for c in cases}) + [None]:
            sel = [c for c in cases if ctx is None or c["context"] == ctx]
            dens = [c["modes"][label]["density"] for c in sel if c["modes"][label]["density"] is not None]
            rows.append({"prefill": label, "context": "all" if ctx is None else ctx, "cases": len(sel),
                         "equal_to_exact": sum(c["modes"][label]["digits"] == c["modes"]["exact"]["digits"] for c in sel) / len(sel),
                         "correct": sum(c["modes"][label]["digits"] == c["answer"] for c in sel) / len(sel),
                         "density": sum(dens) / len(dens) if dens else None})
    doc = {**docs[0], "command": [d["command"] for d in docs], "needle": {"cases": cases, "rows": rows}}
    Path(out).write_text(json.dumps(doc, indent=1))
    print_table(rows)


def main() -> None:
    if sys.argv[1:2] == ["--merge"]:
        return merge(sys.argv[2:-1], sys.argv[-1])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--parts", default="needle,teacher")
    ap.add_argument("--contexts", default="2K:1,4K:1,8K:2")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--kinds", default="single,multi")
    ap.add_argument("--thresholds", default="0.95")
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--teacher-context", type=int, default=7936)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--max-new", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--haystacks", default="", help="only these haystack segments (split a run over processes)")
    ap.add_argument("--device", default="cpu", help="cpu (float32) or cuda (bfloat16, cuDNN prefill)")
    ap.add_argument("--out", default="bench/out/fidelity_prefill.json")
    args = ap.parse_args()
    llm = LLM(args.model, device=args.device, ctx=8192 + 512, prefill_chunk=args.prefill_chunk, show_progress=False)
    modes = {"exact": "exact"}
    modes.update({f"sparse@{t}": SparsePrefill(threshold=float(t)) for t in args.thresholds.split(",")})
    doc = {"bench": "fidelity_prefill", "date": date.today().isoformat(), "device": device_name(),
           "model": llm.name, "dtype": str(llm.dtype), "prefill_chunk": args.prefill_chunk, "command": " ".join(sys.argv),
           "sparse_config": {k: str(v) for k, v in modes.items()}}
    for part in args.parts.split(","):
        doc[part] = {"needle": run_needle, "teacher": run_teacher}[part](llm, args, modes)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
        print_table(doc[part]["rows"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
