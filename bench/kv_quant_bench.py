"""Gather-attend over random host chunks through UVA: bf16 (attend.cu) vs int8 / int4 packed (quant.cu).

    python bench/kv_quant_bench.py [--chunks 64,1024,4096] [--host-gib 4] [--reps 20]
        [--defines ",-DQA_U_SMALL=8 -DQA_MIN_BLOCKS_SMALL=1"]
        [--out bench/out/kv_quant_bench.json]

Llama-3-8B geometry (Hq 32, Hkv 8, D 128, 32-token chunks). One layer's call: per KV head, K random distinct
chunks of a pinned host pool (K = 64: a 2K-token sparse budget; 4096: exact attention over 128K tokens),
read in place by the kernel over PCIe. Pools hold the same chunk count in every format (bf16 --host-gib),
so the random reads spread over the same number of chunks. Reports ms per call (median of --reps after a
warm-up, CUDA events), the bytes the kernel reads and GB/s, and the same call with the pool on the GPU
(what dequantizing costs where bandwidth is not the limit). Needs CUDA + CuPy.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, event_ms, print_table  # noqa: E402

from offload.kernels import _cupy, _cupy_quant  # noqa: E402
from offload.kernels.quant import PackedFormat, quantize_chunks, reference_gather_attend_q  # noqa: E402

HQ, HKV, D, C = 32, 8, 128, 32


_time = event_ms


def _fill(n: int, fmt: PackedFormat | None, gen_seed: int) -> torch.Tensor:
    """A pinned pool of n chunks: random KV, quantized when fmt is given (filled in GPU-sized batches)."""
    shape = (n, fmt.chunk_bytes) if fmt else (n, 2, HKV, C, D)
    pool = torch.empty(shape, dtype=torch.uint8 if fmt else torch.bfloat16, pin_memory=True)
    g = torch.Generator(device="cuda").manual_seed(gen_seed)
    step = 2048
    for i in range(0, n, step):
        m = min(step, n - i)
        kv = torch.randn(m, 2, HKV, C, D, device="cuda", generator=g, dtype=torch.bfloat16)   # kv: [m, 2, Hkv, C, D]
        pool[i:i + m].copy_(quantize_chunks(kv, fmt) if fmt else kv)
    torch.cuda.synchronize()
    return pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", default="64,1024,4096", help="chunks per KV head per call")
    ap.add_argument("--host-gib", type=float, default=4.0, help="bf16 size of each host pool (chunk count)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--defines", default=",-DQA_U_SMALL=8 -DQA_MIN_BLOCKS_SMALL=1",
                    help="quant.cu -D variants to time, comma separated (space between a variant's options)")
    ap.add_argument("--out", default="bench/out/kv_quant_bench.json")
    args = ap.parse_args()
    n = int(args.host_gib * 2**30) // (2 * HKV * C * D * 2)
    fmts = {"bf16": None, "int8": PackedFormat("int8", HKV, C, D), "int4": PackedFormat("int4", HKV, C, D)}
    pools = {name: _fill(n, f, 1) for name, f in fmts.items()}
    gpu_pools = {name: p[:min(n, 4096 * 2)].cuda() for name, p in pools.items()}
    q = torch.randn(HQ, D, device="cuda", dtype=torch.bfloat16)
    scale = D ** -0.5
    rows = []
    for k in (int(x) for x in args.chunks.split(",")):
        slots = torch.stack([torch.randperm(n)[:k] for _ in range(HKV)]).int().cuda()       # slots: [Hkv, K]
        gslots = torch.stack([torch.randperm(gpu_pools["bf16"].shape[0])[:k] for _ in range(HKV)]).int().cuda()
        for defines in args.defines.split(","):
            _cupy_quant.quant_defines = tuple(x for x in defines.split() if x)
            for name, fmt in fmts.items():
                if fmt is None and defines != args.defines.split(",")[0]:
                    continue                                      # bf16 does not use quant.cu's options
                if fmt is None:
                    call = lambda p, s: _cupy.gather_attend(q, p, s, scale)                       # noqa: E731
                    per_chunk = 2 * C * D * 2
                else:
                    call = lambda p, s, f=fmt: _cupy_quant.gather_attend_q(q, p, s, scale, f)     # noqa: E731
                    per_chunk = fmt.key_part_bytes + fmt.value_part_bytes   # one head's K and V
                host_ms = _time(lambda: call(pools[name], slots), args.reps)
                gpu_ms = _time(lambda: call(gpu_pools[name], gslots), args.reps)
                moved = HKV * k * per_chunk
                rows.append({"chunks_per_head": k, "kv": name, "defines": defines if fmt else "", "host_ms": round(host_ms, 4),
                             "host_GBps": round(moved / host_ms / 1e6, 1), "bytes_MB": round(moved / 1e6, 2),
                             "gpu_pool_ms": round(gpu_ms, 4)})
        base = next(r for r in rows if r["chunks_per_head"] == k and r["kv"] == "bf16")
        for r in rows:
            if r["chunks_per_head"] == k:
                r["vs_bf16"] = round(r["host_ms"] / base["host_ms"], 3)
    # the kernels agree with the reference on this data (a spot check; the tests cover the cases)
    s = torch.stack([torch.randperm(n)[:16] for _ in range(HKV)]).int()
    for name, fmt in fmts.items():
        if fmt is not None:
            got = _cupy_quant.gather_attend_q(q, pools[name], s.cuda(), scale, fmt)
            want = reference_gather_attend_q(q.float().cpu(), pools[name], s, scale, fmt)
            torch.testing.assert_close(got[0].cpu(), want[0], rtol=2e-4, atol=2e-4)
    doc = {"bench": "kv_quant_bench", "date": date.today().isoformat(), "device": device_name(),
           "command": "python " + " ".join(sys.argv), "pool_chunks": n, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
