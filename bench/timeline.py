"""Where one decode step's time goes: weights, attention, selection, copies and Python/launch gaps.

    python bench/timeline.py --model llama3-8b --ctx 128K --attention sparse --budget 2K --gpu-cap 24

Profiles a few decode steps with torch.profiler (CPU + CUDA), buckets GPU kernels by name, and reports
per step: wall time, GPU busy time per bucket, and the gap (wall - GPU busy: launches, Python, syncs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cap_gpu, write_results  # noqa: E402

BUCKETS = [("selection", ("bound", "topk", "score", "sort")),
           ("attention", ("attend", "gather", "dense", "merge", "flash", "fmha", "softmax", "sdpa")),
           ("copies", ("memcpy", "memset", "copy_")),
           ("weights", ("gemm", "gemv", "cublas", "cutlass", "matmul", "splitk", "nvjet", "sm90")),]


def bucket(name: str) -> str:
    low = name.lower()
    for b, keys in BUCKETS:
        if any(k in low for k in keys):
            return b
    return "other"


def main() -> None:
    from offload import LLM
    from offload.config import parse_tokens
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--ctx", default="128K")
    ap.add_argument("--attention", default="sparse")
    ap.add_argument("--budget", default="2K")
    ap.add_argument("--gpu-mem", default=None)
    ap.add_argument("--host-mem", default=None)
    ap.add_argument("--gpu-cap", type=float, default=24.0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--select-unit", default="chunk", choices=["chunk", "token"])
    ap.add_argument("--token-candidates", type=float, default=4.0)
    ap.add_argument("--weights", default=None, help="bf16 | q8_0 | q4: weights quantized at load (issue 16)")
    ap.add_argument("--index", default=None, help="summary | shadow | ann")
    ap.add_argument("--index-options", default=None, help='JSON, e.g. \'{"candidate_factor": 1}\'')
    ap.add_argument("--token-scores", default=None, choices=["keys", "shadow"])
    ap.add_argument("--out", default="bench/out/timeline.json")
    args = ap.parse_args()
    cap_gpu(args.gpu_cap)
    ctx = parse_tokens(args.ctx)
    opts = dict(attention=args.attention, budget=args.budget, select_unit=args.select_unit,
                token_candidates=args.token_candidates)
    for name in ("gpu_mem", "host_mem", "weights", "index", "token_scores"):
        if getattr(args, name):
            opts[name] = getattr(args, name)
    if args.index_options:
        opts["index_options"] = json.loads(args.index_options)
    llm = LLM(args.model, load_format="dummy", ctx=ctx + 64, show_progress=False, **opts)
    sess = llm.session()
    ids = torch.randint(0, llm.model_config.vocab_size, (ctx,), generator=torch.Generator().manual_seed(0)).tolist()
    tok = int(sess.prefill(ids).argmax())
    for _ in range(4):
        tok = int(sess.step(tok).argmax())
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            tok = int(sess.step(tok).argmax())
        torch.cuda.synchronize()
        wall = 1000 * (time.perf_counter() - t0) / args.steps
    gpu = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0)) / 1000 / args.steps
        if t > 0 and ev.device_type.name == "CUDA":
            gpu[bucket(ev.key)] = gpu.get(bucket(ev.key), 0.0) + t
    busy = sum(gpu.values())
    row = {"ctx": ctx, "attention": args.attention, "budget": args.budget, "select_unit": args.select_unit,
           "wall_ms": wall, "gpu_busy_ms": busy,
           **{f"{k}_ms": v for k, v in sorted(gpu.items())}, "gap_ms": wall - busy}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    prof.export_chrome_trace(args.out.replace(".json", ".trace.json"))
    top = prof.key_averages().table(sort_by="self_cuda_time_total" if hasattr(prof, "key_averages") else None,
                                    row_limit=25)
    print(top)
    write_results("timeline", [row], args.out, {"args": vars(args), "stats": llm.stats})


if __name__ == "__main__":
    main()
