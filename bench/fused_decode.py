"""Decode with and without the fused decode kernels (issue 16: RMSNorm, residual add + RMSNorm, RoPE of q and k,
silu * up, the dense cache's CuPy attention), same process, same model, same prompt.

    python bench/fused_decode.py --ctx 8K --weights bf16,q8_0,q4 --steps 32 --gpu-cap 24

Per weight format one LLM (dummy 8B weights, exact attention: the whole step in one CUDA graph); sessions alternate
unfused / fused (--rounds of each, so drift hits both), each prefilling the same prompt and timing --steps decode
steps after --warmup. --count-kernels also profiles one eager step of each (torch.profiler) and counts the device
operations it launched. Writes JSON (bench/out/fused_decode.json) and prints a table: ms/token, fused / unfused,
and each against bf16 of the same path (issue 16 goals: q8_0 <= 0.6, q4 <= 0.4).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cap_gpu, median, sync, write_results  # noqa: E402

from offload.config import parse_tokens  # noqa: E402
from offload.kernels.fused import fused_decode  # noqa: E402


def time_session(llm, ids: list[int], args) -> tuple[float, float, dict]:
    """(median ms/token, mean ms/token, engine stats) of one session: prefill ids, then warmup + steps."""
    sess = llm.session()
    tok = int(sess.prefill(ids).argmax())
    times = []
    for _ in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        tok = int(sess.step(tok).argmax())
        times.append(1000 * (time.perf_counter() - t0))
    stats = dict(llm.stats)
    sess.close()
    kept = times[args.warmup:]
    return median(kept), sum(kept) / max(1, len(kept)), stats


def count_ops(llm, ids: list[int]) -> int:
    """Device operations (kernels, memsets, copies) one eager decode step launches."""
    from torch.profiler import ProfilerActivity, profile
    sess = llm.session(cuda_graph=False)
    tok = int(sess.prefill(ids[:64]).argmax())
    for _ in range(2):   # kernels compiled and caches warm before the profiled step
        tok = int(sess.step(tok).argmax())
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        tok = int(sess.step(tok).argmax())
        sync()
    sess.close()
    return sum(ev.count for ev in prof.key_averages() if ev.device_type.name == "CUDA")


def run(args, ctx: int, weights: str) -> list[dict]:
    from offload import LLM
    llm = LLM(args.model, load_format="dummy", ctx=ctx + args.warmup + args.steps + 8, attention="full",
              weights=weights, show_progress=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, llm.model_config.vocab_size, (ctx,), generator=g).tolist()
    runs: dict[bool, list[tuple]] = {False: [], True: []}
    for _ in range(args.rounds):
        for on in (False, True):
            with fused_decode(on):
                runs[on].append(time_session(llm, ids, args))
    rows = []
    for on in (False, True):
        med = min(r[0] for r in runs[on])   # the quieter round of each: both get the same chance
        row = {"weights": weights, "fused": on, "ctx": ctx, "ms_per_token": med,
               "mean_ms": min(r[1] for r in runs[on]), "rounds_ms": [round(r[0], 3) for r in runs[on]],
               "decode_mode": runs[on][-1][2].get("decode_mode"), "weight_format": llm.model.weight_format}
        if args.count_kernels and torch.cuda.is_available():
            try:
                with fused_decode(on):
                    row["device_ops_per_step"] = count_ops(llm, ids)
            except Exception as e:   # the timing above stands without the count
                row["device_ops_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        rows.append(row)
        print(row, flush=True)
    llm.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--ctx", default="8K")
    ap.add_argument("--weights", default="bf16,q8_0,q4")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="sessions of each path (alternating)")
    ap.add_argument("--gpu-cap", type=float, default=24.0, help="GiB cap (a consumer card)")
    ap.add_argument("--count-kernels", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default="bench/out/fused_decode.json")
    args = ap.parse_args()
    cap_gpu(args.gpu_cap)
    rows = []
    for ctx in [parse_tokens(c) for c in args.ctx.split(",")]:
        for weights in args.weights.split(","):
            try:
                rows.extend(run(args, ctx, weights))
            except Exception as e:  # a failed format must not hide the others' figures
                rows.append({"weights": weights, "ctx": ctx, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                print(rows[-1], flush=True)
    ms = {(r["ctx"], r["weights"], r["fused"]): r["ms_per_token"] for r in rows if "ms_per_token" in r}
    for r in rows:
        if "ms_per_token" not in r:
            continue
        unfused, bf16 = ms.get((r["ctx"], r["weights"], False)), ms.get((r["ctx"], "bf16", r["fused"]))
        if r["fused"] and unfused:
            r["x_time_vs_unfused"] = r["ms_per_token"] / unfused
        if bf16:
            r["x_time_vs_bf16"] = r["ms_per_token"] / bf16   # same path (fused or not)
    write_results("fused_decode", rows, args.out, {"args": vars(args)})


if __name__ == "__main__":
    main()
