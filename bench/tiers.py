"""Bandwidth of every tier path, and of gathering random chunks host -> GPU, against raw ceilings.

    python bench/tiers.py [--slab-gib 4] [--chunks 1024] [--disk-dir /tmp] [--out bench/out/tiers.json]

Ceilings are measured in the same run: one bulk pinned H2D / D2H copy, a pageable H2D copy, a D2D
copy, a sequential O_DIRECT file read and write. Goal: gathering random chunks host -> GPU reaches
>= 60% of the bulk pinned H2D bandwidth. Gather methods: CPU index_select into pinned staging + one
copy (naive), one cudaMemcpyAsync per chunk (batched copies), the same over coalesced runs, a torch
gather kernel reading the pinned slab through a UVA alias, a 16-byte-load CuPy gather kernel, and
offload.kernels.gather_attend reading the slab in place (bytes = the K/V it reads).
On a CPU-only machine only the host/disk rows run (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import median, write_results  # noqa: E402
from offload.tiers import ChunkShape, DevicePool, DiskStore, HostPool  # noqa: E402
from offload.tiers.uva import uva_view  # noqa: E402

CUDA = torch.cuda.is_available()
GB = 1e9


def bench(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median seconds per call (CUDA-synchronised wall time)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return median(times)


def row(path: str, method: str, nbytes: int, secs: float, ceiling: float | None = None) -> dict:
    gbs = nbytes / secs / GB
    r = {"path": path, "method": method, "MB": nbytes / 1e6, "ms": secs * 1e3, "GB/s": gbs}
    if ceiling:
        r["of_ceiling"] = gbs / ceiling
    return r


def ceilings(rows: list, bulk: int, disk_dir: str) -> dict:
    out = {}
    if CUDA:
        pinned = torch.empty(bulk, dtype=torch.uint8, pin_memory=True)          # pinned: [bulk]
        pageable = torch.empty(bulk, dtype=torch.uint8)
        dev = torch.empty(bulk, dtype=torch.uint8, device="cuda")
        dev2 = torch.empty_like(dev)
        for name, fn in (("h2d_pinned", lambda: dev.copy_(pinned, non_blocking=True)),
                         ("d2h_pinned", lambda: pinned.copy_(dev, non_blocking=True)),
                         ("h2d_pageable", lambda: dev.copy_(pageable)),
                         ("d2d", lambda: dev2.copy_(dev))):
            s = bench(fn)
            rows.append(row("ceiling", name, bulk, s))
            out[name] = bulk / s / GB
        del pinned, pageable, dev, dev2
    # sequential file write + read with O_DIRECT, 8 MiB blocks (the drive, not the page cache)
    import mmap
    block, size = 8 << 20, min(bulk, 2 << 30)
    path = os.path.join(tempfile.mkdtemp(dir=disk_dir), "seq.bin")
    buf = mmap.mmap(-1, block)
    flags = os.O_RDWR | os.O_CREAT
    try:
        fd = os.open(path, flags | os.O_DIRECT, 0o600)
        direct = True
    except OSError:
        fd, direct = os.open(path, flags, 0o600), False
    try:
        t0 = time.perf_counter()
        for off in range(0, size, block):
            os.pwrite(fd, buf, off)
        os.fsync(fd)
        w = time.perf_counter() - t0
        t0 = time.perf_counter()
        for off in range(0, size, block):
            os.preadv(fd, [buf], off)
        r = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
    tag = "O_DIRECT" if direct else "buffered"
    rows.append(row("ceiling", f"seq_write_{tag}", size, w))
    rows.append(row("ceiling", f"seq_read_{tag}", size, r))
    out["disk_read"], out["disk_write"] = size / r / GB, size / w / GB
    return out


def pinning(rows: list, nbytes: int) -> dict:
    """Host slab pinned in place (HostPool) vs torch's pinned allocator, which rounds up to a power of two."""
    shape = ChunkShape(1, 1, nbytes // 8, torch.float32)                       # one chunk [2, 1, 1, D] of nbytes
    t0 = time.perf_counter()
    pool = HostPool(shape, 1)
    ours = time.perf_counter() - t0
    key = "allocated_bytes.current"
    before = torch.cuda.host_memory_stats()[key]
    t0 = time.perf_counter()
    theirs = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)          # theirs: [nbytes]
    t_theirs = time.perf_counter() - t0
    grown = torch.cuda.host_memory_stats()[key] - before
    rows.append({"path": "pin", "method": f"HostPool ({pool.pin_method})", "MB": nbytes / 1e6, "ms": ours * 1e3,
                 "pinned_MB": nbytes / 1e6})
    rows.append({"path": "pin", "method": "torch pin_memory=True", "MB": nbytes / 1e6, "ms": t_theirs * 1e3,
                 "pinned_MB": grown / 1e6})
    pool.close()
    del theirs
    return {"pinned_ratio_torch": grown / nbytes}


def tier_paths(rows: list, ceil: dict, shape: ChunkShape, n: int, disk_dir: str) -> None:
    """Whole-chunk moves through the tier classes: GPU<->host, host<->disk (CRC included)."""
    host = HostPool(shape, n)
    host.slab.view(torch.uint8).random_()
    slots = list(range(n))
    perm = torch.randperm(n).tolist()
    if CUDA:
        dev = DevicePool(shape, n, "cuda")
        side = torch.cuda.Stream()
        rows.append(row("gpu->host", "DevicePool.read runs", n * shape.nbytes,
                        bench(lambda: dev.read(slots, host.slab, stream=side)), ceil.get("d2h_pinned")))
        rows.append(row("host->gpu", "DevicePool.write runs", n * shape.nbytes,
                        bench(lambda: dev.write(slots, host.slab, stream=side)), ceil.get("h2d_pinned")))
        del dev
    disk = DiskStore(shape, n, disk_dir, io_threads=8)
    try:
        dslots = disk.alloc(n)
        rows.append(row("host->disk", f"DiskStore.write (direct={disk.direct})", n * shape.nbytes,
                        bench(lambda: disk.write(dslots, host.slab).result(), reps=3), ceil.get("disk_write")))
        back = torch.empty_like(host.slab)                                      # back: [n, 2, Hkv, C, D]
        rand = [dslots[i] for i in perm]
        rows.append(row("disk->host", "DiskStore.read random slots", n * shape.nbytes,
                        bench(lambda: disk.read(rand, back).result(), reps=3), ceil.get("disk_read")))
    finally:
        disk.close()
        host.close()


def gathers(rows: list, ceil: dict, shape: ChunkShape, slab_chunks: int, n: int) -> None:
    """N random whole chunks from a big pinned slab into one GPU buffer, several ways."""
    host = HostPool(shape, slab_chunks)
    host.slab.view(torch.uint8).random_()
    idx = torch.randperm(slab_chunks)[:n]                                      # idx: [N]
    nbytes = n * shape.nbytes
    h2d = ceil.get("h2d_pinned")
    staging = torch.empty((n, *shape.shape), dtype=shape.dtype, pin_memory=CUDA)  # staging: [N, 2, Hkv, C, D]
    if not CUDA:
        rows.append(row("gather host", "index_select (CPU)", nbytes,
                        bench(lambda: torch.index_select(host.slab, 0, idx, out=staging))))
        host.close()
        return
    dst = torch.empty((n, *shape.shape), dtype=shape.dtype, device="cuda")     # dst: [N, 2, Hkv, C, D]

    def naive():
        torch.index_select(host.slab, 0, idx, out=staging)
        dst.copy_(staging, non_blocking=True)

    ids = idx.tolist()

    def per_chunk():
        for i, s in enumerate(ids):
            dst[i].copy_(host.slab[s], non_blocking=True)

    order = sorted(range(n), key=lambda i: ids[i])
    from offload.tiers.slots import paired_runs
    spans = paired_runs([ids[i] for i in order], order)

    def per_run():
        for s0, d0, m in spans:
            dst[d0:d0 + m].copy_(host.slab[s0:s0 + m], non_blocking=True)

    uva = uva_view(host.slab, "cuda", torch.int64)                             # uva: slab aliased on the GPU
    idx_dev = idx.cuda()
    dst64 = dst.view(torch.int64)

    def uva_gather():
        torch.index_select(uva, 0, idx_dev, out=dst64)

    ref = host.slab[idx].view(torch.int16)                                     # ref: [N, 2, Hkv, C, D] bits
    methods = [("naive: CPU index_select + 1 copy", naive), ("batched: 1 copy per chunk", per_chunk),
               ("batched: 1 copy per run", per_run), ("UVA: torch index_select kernel", uva_gather)]
    cupy_gather = _cupy_gather(host.slab, idx_dev, dst)
    if cupy_gather is not None:
        methods.append(("UVA: CuPy 16-byte gather kernel", cupy_gather))
    for name, fn in methods:
        dst.zero_()
        rows.append(row("gather host->gpu", name, nbytes, bench(fn), h2d))
        torch.cuda.synchronize()
        assert torch.equal(dst.view(torch.int16).cpu(), ref), f"{name} gathered the wrong bytes"
    _attend_rows(rows, host, idx, h2d)
    del uva
    host.close()


def _cupy_gather(slab: torch.Tensor, idx_dev: torch.Tensor, dst: torch.Tensor):
    try:
        import cupy
        import numpy as np
    except ImportError:
        return None
    src = """
    extern "C" __global__ void gather_rows(const uint4* __restrict__ src, const long long* __restrict__ idx,
                                           uint4* __restrict__ dst, long long row_vec) {
        const uint4* s = src + idx[blockIdx.y] * row_vec;
        uint4* d = dst + (long long)blockIdx.y * row_vec;
        for (long long i = blockIdx.x * blockDim.x + threadIdx.x; i < row_vec; i += gridDim.x * blockDim.x)
            d[i] = s[i];
    }"""
    kern = cupy.RawKernel(src, "gather_rows")
    row_vec = slab[0].numel() * slab.element_size() // 16
    grid = (max(1, min(8, row_vec // 256)), idx_dev.numel())

    def run():
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        with stream:
            kern(grid, (256,), (np.uint64(slab.data_ptr()), np.uint64(idx_dev.data_ptr()),
                                np.uint64(dst.data_ptr()), np.int64(row_vec)))
    return run


def _attend_rows(rows: list, host: HostPool, idx: torch.Tensor, h2d: float | None) -> None:
    try:
        from offload import kernels
    except ImportError:
        return
    _, _, hkv, c, d = host.slab.shape
    k = idx.numel() // hkv
    slots = idx[:hkv * k].view(hkv, k).to(torch.int32).cuda()                  # slots: [Hkv, K] per head
    q = torch.randn(4 * hkv, d, device="cuda", dtype=host.slab.dtype)          # q: [Hq, D]
    read = hkv * k * 2 * c * d * host.slab.element_size()                      # each head reads its K and V
    fn = lambda: kernels.gather_attend(q, host.slab, slots, d ** -0.5)  # noqa: E731
    tag = "CuPy kernel" if kernels.KERNELS_AVAILABLE else "torch reference"
    rows.append(row("gather host->gpu", f"gather_attend on the pinned slab ({tag})", read, bench(fn), h2d))
    dev = host.slab[:int(idx.max()) + 1].cuda()                                # dev: the same chunks in HBM
    fn_dev = lambda: kernels.gather_attend(q, dev, slots, d ** -0.5)  # noqa: E731
    rows.append(row("gather gpu", f"gather_attend on a device pool ({tag})", read, bench(fn_dev)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slab-gib", type=float, default=4.0 if CUDA else 0.25)
    ap.add_argument("--chunks", type=int, default=2048 if CUDA else 256, help="random chunks gathered")
    ap.add_argument("--chunk-tokens", type=int, default=32)
    ap.add_argument("--disk-dir", default=tempfile.gettempdir())
    ap.add_argument("--disk-chunks", type=int, default=4096 if CUDA else 256)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    shape = ChunkShape(8, a.chunk_tokens, 128, torch.bfloat16 if CUDA else torch.float32)  # Llama-3-8B layer
    rows: list[dict] = []
    ceil = ceilings(rows, (1 << 30) if CUDA else (64 << 20), a.disk_dir)
    pin = pinning(rows, 5 << 28) if CUDA else {}                              # 1.25 GiB: not a power of two
    tier_paths(rows, ceil, shape, a.disk_chunks, a.disk_dir)
    slab_chunks = max(a.chunks, int(a.slab_gib * 2**30) // shape.nbytes)
    gathers(rows, ceil, shape, slab_chunks, a.chunks)
    best = max((r["GB/s"] for r in rows if r["path"] == "gather host->gpu" and "gather_attend" not in r["method"]),
               default=float("nan"))
    goal = {"goal": "gather random chunks host->gpu >= 60% of pinned H2D",
            "best_gather_GBps": best, "h2d_pinned_GBps": ceil.get("h2d_pinned"),
            "met": bool(ceil.get("h2d_pinned") and best >= 0.6 * ceil["h2d_pinned"])}
    write_results("tiers", rows, a.out, meta={"chunk_bytes": shape.nbytes, "chunks": a.chunks,
                                              "slab_gib": slab_chunks * shape.nbytes / 2**30, **pin, **goal})
    print(f"{goal['goal']}: best {best:.1f} GB/s vs {ceil.get('h2d_pinned') or float('nan'):.1f} -> "
          f"{'met' if goal['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
