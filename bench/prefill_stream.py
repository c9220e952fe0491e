"""Streamed prefill attention alone: one layer's history in the host tier, T queries attending it block by
block as engine/staging.py does, against the same blocks already on the GPU (the compute ceiling) and the reads
alone. Separates what streaming costs from what attention costs, per host transport (UVA gather or DMA copy).

    python bench/prefill_stream.py --hist 256K --T 2048,4096,8192 --kv-dtype int4,bf16

Llama-3-8B layer geometry: 32 query heads, 8 KV heads, d=128, bf16, 32-token chunks; random K/V (speed only).
"""
from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import event_ms, write_results  # noqa: E402

from offload.config import parse_tokens  # noqa: E402

HQ, HKV, D, C = 32, 8, 128, 32


def make_store(n_chunks: int, kv_dtype: str):
    from offload.tiers.base import ChunkShape
    from offload.tiers.store import TieredKVStore
    store = TieredKVStore(ChunkShape(HKV, C, D, torch.bfloat16), 1, (8, n_chunks + 8, 0), "cuda", kv_dtype=kv_dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    for a in range(0, n_chunks, 1024):
        m = min(1024, n_chunks - a)
        kv = torch.randn(m, 2, HKV, C, D, device="cuda", dtype=torch.bfloat16, generator=g)  # kv: [m, 2, Hkv, C, D]
        store.put(0, a, kv)
    torch.cuda.synchronize()
    return store


def run(store, S: int, T: int, block_tokens: int, reps: int, trace: str = "") -> dict:
    from offload.engine.ops import attend_lse, merge_lse
    from offload.engine.staging import PrefillStage
    sel = SimpleNamespace(C=C, sparse=False, indexes=None, n_sink=0)
    stage = PrefillStage(store, sel, 4 * block_tokens, block_tokens)
    stage.layer, stage.s0 = 0, S
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(HQ, T, D, device="cuda", dtype=torch.bfloat16, generator=g)       # q: [Hq, T, D]
    kw = torch.randn(HKV, 256, D, device="cuda", dtype=torch.bfloat16, generator=g)   # kw: [Hkv, 256, D]
    o0, lse0 = attend_lse(q, kw, kw, causal=False)                                     # the window's part
    B = stage.block * C
    kb = torch.randn(HKV, B, D, device="cuda", dtype=torch.bfloat16, generator=g)     # kb: [Hkv, B, D]
    nb = S // B

    def compute():
        o, lse = o0, lse0
        for _ in range(nb):
            o, lse = merge_lse(o, lse, *attend_lse(q, kb, kb, causal=False))

    def reads():
        for a in range(0, S // C, stage.block):
            store.read_device(0, range(a, a + stage.block))

    flops = 4 * HQ * T * nb * B * D
    row = {"S": S, "T": T, "block_tokens": B, "kv_dtype": store.packed.kv_dtype if store.packed is not None else "bf16"}
    row["compute_ms"] = event_ms(compute, reps)
    for mode in ("uva", "copy"):
        store.stream_copy = mode == "copy"
        row[f"read_{mode}_ms"] = event_ms(reads, reps)
        row[f"stream_{mode}_ms"] = event_ms(lambda: stage._streamed(q, o0, lse0), reps)
    if trace:
        from torch.profiler import ProfilerActivity, profile
        from trace_summary import summarize
        for mode in ("uva", "copy"):
            store.stream_copy = mode == "copy"
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                stage._streamed(q, o0, lse0)
                torch.cuda.synchronize()
            path = f"{trace}_{row['kv_dtype']}_{mode}.json"
            prof.export_chrome_trace(path)
            print(f"== {mode}, T={T}, {row['kv_dtype']}\n{summarize(path, 12)}", flush=True)
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(3):
            stage._streamed(q, o0, lse0)
        torch.cuda.synchronize()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(20)
    for k in ("compute", "stream_uva", "stream_copy"):
        row[f"{k}_tflops"] = flops / (row[f"{k}_ms"] * 1e-3) / 1e12
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hist", default="256K")
    ap.add_argument("--T", default="2048,4096,8192")
    ap.add_argument("--kv-dtype", default="int4,bf16")
    ap.add_argument("--block", default="32K", help="tokens per streamed block (the runtime: a quarter window)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--trace", default="", help="also profile one streamed call per transport at the first T; "
                    "write chrome traces with this prefix and print their summary")
    ap.add_argument("--out", default="bench/out/prefill_stream.json")
    args = ap.parse_args()
    S, block = parse_tokens(args.hist), parse_tokens(args.block)
    rows = []
    print(f"{'kv':>5} {'T':>5} {'compute ms':>10} {'read uva':>9} {'read copy':>9} {'stream uva':>10} "
          f"{'stream copy':>11} {'TFLOPS c/u/d':>16}")
    for kv_dtype in args.kv_dtype.split(","):
        store = make_store(S // C, kv_dtype)
        for T in (int(t) for t in args.T.split(",")):
            r = run(store, S, T, block, args.reps, args.trace if T == int(args.T.split(",")[0]) else "")
            rows.append(r)
            print(f"{kv_dtype:>5} {T:>5} {r['compute_ms']:>10.1f} {r['read_uva_ms']:>9.1f} {r['read_copy_ms']:>9.1f} "
                  f"{r['stream_uva_ms']:>10.1f} {r['stream_copy_ms']:>11.1f} "
                  f"{r['compute_tflops']:>5.0f}/{r['stream_uva_tflops']:>4.0f}/{r['stream_copy_tflops']:>4.0f}",
                  flush=True)
        store.close()
        del store
        torch.cuda.empty_cache()
    write_results("prefill_stream", rows, args.out, {"hist": S, "block": block})


if __name__ == "__main__":
    main()
