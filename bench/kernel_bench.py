"""Benchmark offload.kernels on the GPU: gather-attend against the memory ceilings of the same run,
against torch SDPA, and chunk scoring. Writes JSON (--out) and prints a table.

    python bench/kernel_bench.py [--out bench/out/kernels.json] [--quick]

Times are CUDA-event medians over many reps after a warm-up; inputs rotate over several slot sets
drawn from a 1 GiB pool so successive reps miss the 50 MB L2 like a real decode step would.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F

import offload.kernels as kernels
from offload.kernels import _cupy, reference

DEV = torch.device("cuda")
HQ, HKV, D = 32, 8, 128
# default: 4 rows in flight per lane, no prefetch
VARIANTS = {"u2": ("-DATT_U_SMALL=2",), "u8": ("-DATT_U_SMALL=8",), "pf": ("-DATT_PREFETCH=1",),
            "pf_u2": ("-DATT_PREFETCH=1", "-DATT_U_SMALL=2")}


def e2e_ms(fn, inputs, reps, warmup=5):
    """Median ms per call with the GPU idle at the start: host launch cost + GPU time (what an eager,
    launch-bound decode step pays)."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    times = []
    for i in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*inputs[i % len(inputs)])
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def gpu_ms(fn, inputs, reps, warmup=5):
    """Median GPU ms per call: all reps are queued behind a sleep kernel, so host launch cost is hidden
    and each event pair brackets only the call's own kernels (what a CUDA-graph replay would pay)."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda._sleep(int(reps * 300e-6 * 2e9))                  # ~300 us of host time per rep, 2 GHz
    for i, (start, stop) in enumerate(events):
        start.record()
        fn(*inputs[i % len(inputs)])
        stop.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(stop) for start, stop in events)


def host_us(fn, inputs, reps=200):
    """Host-side cost per call (no sync inside): what a decode loop pays if the GPU never waits."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(reps):
        fn(*inputs[i % len(inputs)])
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / reps * 1e6


def ceilings(reps):
    big = 256 << 20
    src = torch.empty(big, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    d2d_ms = gpu_ms(lambda: dst.copy_(src), [()], reps)
    host = torch.empty(big, dtype=torch.uint8).pin_memory()
    h2d_ms = gpu_ms(lambda: dst.copy_(host, non_blocking=True), [()], max(5, reps // 4))
    return {"d2d_copy_GBps": 2 * big / d2d_ms / 1e6,          # read + write bytes: what HBM moves
            "h2d_pinned_GBps": big / h2d_ms / 1e6}


def same_size_ms(nbytes, reps):
    """GPU ms to copy, and to merely read (a bf16 max-reduction), nbytes at rotating offsets of a 1 GiB
    buffer: the fixed-size floor a gather of that many bytes competes with (launch ramp and tail included)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    offs = [(i * (96 << 20)) % ((1 << 30) - nbytes) // 256 * 256 for i in range(8)]
    copy = gpu_ms(lambda o: dst.copy_(src[o:o + nbytes]), [(o,) for o in offs], reps)
    read = gpu_ms(lambda o: src[o:o + nbytes].view(torch.bfloat16).amax(), [(o,) for o in offs], reps)
    return copy, read


def make_pool(c, pinned, dtype=torch.bfloat16):
    slots_n = (1 << 30) // (2 * HKV * c * D * 2)                 # 1 GiB of bf16 chunks
    pool = torch.randn(slots_n, 2, HKV, c, D, device=DEV).to(dtype)  # pool: [S, 2, Hkv, C, D]
    if pinned:
        host = torch.empty(pool.shape, dtype=dtype, pin_memory=True)
        host.copy_(pool)
        return host
    return pool


def slot_sets(pool, k, n_sets, gen):
    return [torch.stack([torch.randperm(pool.shape[0], generator=gen)[:k] for _ in range(HKV)]).int().to(DEV)
            for _ in range(n_sets)]


def bench_gather(rows, ceil, reps, tokens_list):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(HQ, D, device=DEV).bfloat16()
    scale = 1 / math.sqrt(D)
    for c, pinned in ((64, False), (16, False), (64, True), (16, True)):
        pool = make_pool(c, pinned)
        ceiling = ceil["h2d_pinned_GBps"] if pinned else ceil["d2d_copy_GBps"]
        for tokens in (tokens_list if c == 64 else (8192,)):
            sets = slot_sets(pool, tokens // c, 8, gen)
            nbytes = 2 * HKV * tokens * D * 2                    # K and V rows actually read
            inputs = [(q, pool, s, scale) for s in sets]
            ms = gpu_ms(kernels.gather_attend, inputs, reps if not pinned else max(10, reps // 4))
            row = {"op": "gather_attend", "pool": "pinned-host" if pinned else "gpu", "tokens_per_kv_head": tokens,
                   "chunk_tokens": c, "MB_read": nbytes / 1e6, "ms": ms, "GBps": nbytes / ms / 1e6,
                   "frac_of_ceiling": nbytes / ms / 1e6 / ceiling}
            if not pinned:
                row["ms_copy_same_bytes"], row["ms_read_same_bytes"] = same_size_ms(nbytes, reps)
                row["frac_of_same_size_copy"] = row["ms_copy_same_bytes"] / ms
                row["frac_of_same_size_read"] = row["ms_read_same_bytes"] / ms
                row["e2e_ms"] = e2e_ms(kernels.gather_attend, inputs, reps)
                row["host_us_per_call"] = host_us(kernels.gather_attend, inputs)
                for splits in (8, 32, 128):
                    row[f"ms_splits{splits}"] = gpu_ms(
                        lambda *a, n=splits: _cupy.gather_attend(*a, num_splits=n), inputs, reps)
                for tag, defines in VARIANTS.items():           # compile-time variants of attend.cu
                    with _cupy.launch_options(attend_defines=defines):
                        row[f"ms_{tag}"] = gpu_ms(kernels.gather_attend, inputs, reps)
                # SDPA on K/V gathered beforehand, and gather (index_select) + SDPA
                kv = [_gathered(pool, s) for s in sets[:2]]
                row["ms_sdpa_pregathered"] = gpu_ms(_sdpa, [(q, kk, vv, scale) for kk, vv in kv], reps)
                row["ms_dense_kernel_pregathered"] = gpu_ms(kernels.dense_attend,
                                                             [(q, kk, vv, scale) for kk, vv in kv], reps)
                row["ms_index_select_plus_sdpa"] = gpu_ms(
                    lambda qq, p, s, sc: _sdpa(qq, *_gathered(p, s), sc), inputs, reps)
                del kv
            rows.append(row)
        del pool
        torch.cuda.empty_cache()


def _gathered(pool, slots):
    heads = torch.arange(HKV, device=DEV)[:, None]                # heads: [Hkv, 1]
    kv = pool[slots.long(), :, heads]                              # kv: [Hkv, K, 2, C, D]
    k = kv[:, :, 0].reshape(HKV, -1, D)                            # k: [Hkv, K*C, D]
    v = kv[:, :, 1].reshape(HKV, -1, D)                            # v: [Hkv, K*C, D]
    return k, v


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q[None, :, None], k[None], v[None], scale=scale, enable_gqa=True)


def bench_score(rows, ceil, reps, n_chunks=16384):
    kmin = [torch.randn(HKV, n_chunks, D, device=DEV).bfloat16() for _ in range(4)]
    kmax = [(x.float() + torch.rand_like(x.float())).bfloat16() for x in kmin]
    q = torch.randn(HQ, D, device=DEV).bfloat16()
    inputs = [(q, lo, hi, n_chunks) for lo, hi in zip(kmin, kmax)]
    nbytes = 2 * HKV * n_chunks * D * 2
    ms_bounds = gpu_ms(kernels.chunk_bounds, inputs, reps)
    bounds = kernels.chunk_bounds(*inputs[0])
    row = {"op": "score_chunks", "chunks": n_chunks, "kv_heads": HKV, "q_heads": HQ, "MB_read": nbytes / 1e6,
           "ms_bounds_kernel": ms_bounds, "bounds_frac_of_ceiling": nbytes / ms_bounds / 1e6 / ceil["d2d_copy_GBps"],
           "ms_bounds_torch_reference": gpu_ms(reference.chunk_bounds, inputs, reps)}
    count = torch.tensor([n_chunks], device=DEV)
    for k in (74, 256, 1024):
        row[f"ms_topk{k}_only"] = gpu_ms(lambda b, kk=k: torch.topk(b, kk, dim=1), [(bounds,)], reps)
        row[f"ms_topk_rows_kernel_k{k}"] = gpu_ms(lambda b, kk=k: _cupy.topk_rows(b, count, kk), [(bounds,)], reps)
    half = torch.tensor([n_chunks // 2], device=DEV)      # a buffer twice the chunks in use, as after growth
    row["ms_topk_rows_kernel_k74_half_valid"] = gpu_ms(lambda b: _cupy.topk_rows(b, half, 74), [(bounds,)], reps)
    row["ms_torch_masked_topk_k74_half_valid"] = gpu_ms(lambda b: reference.topk_rows(b, half, 74), [(bounds,)], reps)
    for k in (256, 1024):
        row[f"ms_score_chunks_k{k}"] = gpu_ms(lambda *a, kk=k: kernels.score_chunks(*a, kk), inputs, reps)
    row["e2e_ms_score_chunks_k256"] = e2e_ms(lambda *a: kernels.score_chunks(*a, 256), inputs, reps)
    row["host_us_per_call"] = host_us(lambda *a: kernels.score_chunks(*a, 256), inputs)
    rows.append(row)


def bench_merge(rows, reps):
    o = [torch.randn(HQ, D, device=DEV) for _ in range(2)]
    lse = [torch.randn(HQ, device=DEV) for _ in range(2)]
    args = [(o[0], lse[0], o[1], lse[1])]
    rows.append({"op": "merge_attn", "ms_kernel": gpu_ms(kernels.merge_attn, args, reps),
                 "ms_torch_reference": gpu_ms(reference.merge_attn, args, reps),
                 "e2e_ms_kernel": e2e_ms(kernels.merge_attn, args, reps),
                 "e2e_ms_torch_reference": e2e_ms(reference.merge_attn, args, reps),
                 "host_us_kernel": host_us(kernels.merge_attn, args),
                 "host_us_torch_reference": host_us(reference.merge_attn, args)})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out/kernels.json")
    ap.add_argument("--quick", action="store_true", help="fewer reps and sizes")
    args = ap.parse_args()
    if not (torch.cuda.is_available() and kernels.KERNELS_AVAILABLE):
        raise SystemExit("bench/kernel_bench.py needs a CUDA GPU and CuPy")
    reps = 20 if args.quick else 100
    ceil = ceilings(reps)
    rows: list[dict] = []
    bench_gather(rows, ceil, reps, (2048, 8192) if args.quick else (2048, 4096, 8192, 16384))
    bench_score(rows, ceil, reps)
    bench_merge(rows, reps)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "ceilings": ceil, "rows": rows}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_table(result)


def print_table(result):
    c = result["ceilings"]
    print("ms = GPU time (queued behind a sleep: no launch cost); e2e_ms = host launch + GPU; columns after "
          "%ceil are GPU ms of: SDPA / dense kernel on pre-gathered K,V, index_select+SDPA, 8/32/128 splits, variants")
    print(f"{result['device']}  D2D copy {c['d2d_copy_GBps']:.0f} GB/s (read+write)  "
          f"pinned H2D {c['h2d_pinned_GBps']:.1f} GB/s")
    print(f"{'op':14} {'pool':11} {'C':>3} {'tok/head':>8} {'MB':>7} {'ms':>8} {'GB/s':>7} {'%ceil':>6} "
          f"{'sdpa':>7} {'dense':>7} {'idx+sdpa':>8} {'s8':>7} {'s32':>7} {'s128':>7} {'u2':>7} {'u8':>7} "
          f"{'pf':>7} {'pf_u2':>7} {'e2e_ms':>7} {'host_us':>7} {'copy=':>7} {'read=':>7}")
    for r in result["rows"]:
        if r["op"] == "gather_attend":
            f = lambda key: f"{r[key]:7.3f}" if key in r else "      -"  # noqa: E731
            print(f"{r['op']:14} {r['pool']:11} {r['chunk_tokens']:3d} {r['tokens_per_kv_head']:8d} {r['MB_read']:7.1f} {r['ms']:8.4f} "
                  f"{r['GBps']:7.0f} {100 * r['frac_of_ceiling']:5.0f}% {f('ms_sdpa_pregathered')} "
                  f"{f('ms_dense_kernel_pregathered')} {f('ms_index_select_plus_sdpa'):>8} {f('ms_splits8')} "
                  f"{f('ms_splits32')} {f('ms_splits128')} {f('ms_u2')} {f('ms_u8')} {f('ms_pf')} {f('ms_pf_u2')} {f('e2e_ms')} "
                  f"{r.get('host_us_per_call', float('nan')):7.1f} {f('ms_copy_same_bytes')} {f('ms_read_same_bytes')}")
    for r in result["rows"]:
        if r["op"] != "gather_attend":
            print(r["op"] + ": " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in r.items() if k != "op"))


if __name__ == "__main__":
    main()
