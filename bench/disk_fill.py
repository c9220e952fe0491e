"""Where a synthetic fill's time goes when most chunks spill to the disk tier (issue 12), store alone, no model.

    python bench/disk_fill.py --layers 8 --chunks 4096 --kv-dtype int8 --host-frac 0.35 --disk-dir /tmp/kv
    python bench/disk_fill.py ... --profile bench/out/disk_fill.prof       # + cProfile of the fill (top 25 printed)

Puts `--batch` chunks of one layer at a time, layer after layer, as bench/synthetic_fill.py does (the same
TieredKVStore.put path as a prefill), into a store whose GPU tier (the CPU device here) holds `--gpu-chunks`,
whose host tier holds `--host-frac` of all chunks and whose disk tier holds the rest. The kv batch is made
once and reused (the fill's own KV synthesis is not what is measured). Reported per phase (GPU room, host room,
spilling) in chunks/s and GB/s of stored (cold) bytes, the time to drain the queued disk writes, and, in the same
process, a plain O_DIRECT write of the disk tier's bytes to a file in the same directory in runs of `--batch`
chunks from 4 threads: the drive's rate, against which the disk part is judged. JSON to --out.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import mmap
import os
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402


def plain_write(path: str, nbytes: int, run_bytes: int, threads: int = 4) -> float:
    """GB/s of writing nbytes to a new file with O_DIRECT (buffered if refused) in runs of run_bytes, fsynced."""
    run_bytes = max(4096, run_bytes // 4096 * 4096)
    buf = mmap.mmap(-1, run_bytes)
    buf.write(os.urandom(4096) * (run_bytes // 4096))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o600)
        os.pwrite(fd, memoryview(buf)[:4096], 0)
    except OSError:
        fd = os.open(path, flags, 0o600)
    n_runs = max(1, nbytes // run_bytes)
    t0 = time.perf_counter()

    def worker(first: int) -> None:
        for r in range(first, n_runs, threads):
            os.pwrite(fd, buf, r * run_bytes)

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    os.fsync(fd)
    dt = time.perf_counter() - t0
    os.close(fd)
    os.unlink(path)
    buf.close()
    return n_runs * run_bytes / dt / 1e9


class DriveClock:
    """Seconds the I/O threads spent in pwrite (summed over threads) and bytes, and seconds the putting thread
    blocked on disk futures (sync.wait_handles: a slot it needs is still being written)."""

    def __init__(self, store):
        import offload.tiers.sync as sync
        self.write_s = self.wait_s = 0.0
        self.bytes = 0
        self._lock = threading.Lock()
        disk, real_pwrite, real_wait = store.tiers[2], store.tiers[2]._pwrite, sync.wait_handles

        def pwrite(fd, buf, off):
            t = time.perf_counter()
            n = real_pwrite(fd, buf, off)
            with self._lock:
                self.write_s += time.perf_counter() - t
                self.bytes += n
            return n

        def wait(handles):
            t = time.perf_counter()
            real_wait(handles)
            self.wait_s += time.perf_counter() - t

        disk._pwrite, sync.wait_handles = pwrite, wait


def fill_store(store, layers: int, chunks: int, batch: int, kv: torch.Tensor, phases: list, report_s: float) -> None:
    """Put `chunks` chunks of every layer, `batch` at a time; phases: (name, first put index) appended as tiers fill."""
    from offload.tiers.placement import GPU, HOST
    t_last = time.perf_counter()
    done = 0
    for layer in range(layers):
        for first in range(0, chunks, batch):
            n = min(batch, chunks - first)
            phase = "gpu" if store.tiers[GPU].num_free >= n else "host" if store.tiers[HOST].num_free >= n else "spill"
            order = ("gpu", "host", "spill")     # a phase ends when the next tier down is first needed
            if phases and order.index(phase) < order.index(phases[-1][0]):
                phase = phases[-1][0]
            if not phases or phases[-1][0] != phase:
                phases.append((phase, done, time.perf_counter()))
            store.put(layer, first, kv[:n])
            done += n
            if report_s and time.perf_counter() - t_last >= report_s:
                t_last = time.perf_counter()
                print(f"  {done}/{layers * chunks} chunks", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=4096, help="chunks per layer")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--chunk-tokens", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--kv-dtype", default="int8")
    ap.add_argument("--gpu-chunks", type=int, default=None, help="default: 1/16 of all chunks")
    ap.add_argument("--host-frac", type=float, default=0.35, help="host tier share of all chunks")
    ap.add_argument("--batch", type=int, default=512, help="chunks per put (the fill's 16K tokens / 32)")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--disk-dir", default=None)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--cheap-quant", action="store_true",
                    help="replace int8/int4 quantization by a byte slice of the same size (CPU: leaves out what the "
                         "GPU does in microseconds, so the store's own host work and the drive show)")
    ap.add_argument("--progress", type=float, default=10.0, help="seconds between progress lines (0: none)")
    ap.add_argument("--out", default="bench/out/disk_fill.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from offload.tiers.base import ChunkShape
    from offload.tiers.store import TieredKVStore

    if args.cheap_quant:
        import offload.tiers.moves as moves
        moves.quantize_chunks = lambda kv, fmt: kv.reshape(kv.shape[0], -1).view(torch.uint8)[:, :fmt.chunk_bytes]
    shape = ChunkShape(args.kv_heads, args.chunk_tokens, args.head_dim, torch.bfloat16)
    total = args.layers * args.chunks
    gpu = args.gpu_chunks if args.gpu_chunks is not None else max(total // 16, args.layers * 5)
    host = int(total * args.host_frac)
    disk = total - gpu - host + args.batch
    disk_dir = args.disk_dir or tempfile.mkdtemp(prefix="disk_fill")
    store = TieredKVStore(shape, args.layers, (gpu, host, disk), "cpu", disk_dir, policy=args.policy,
                          kv_dtype=args.kv_dtype)
    cold = store.cold_shape.nbytes
    kv = torch.randn((args.batch, *shape.shape)).to(torch.bfloat16)             # kv: [batch, 2, Hkv, C, D]
    phases: list = []
    clock = DriveClock(store)
    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    fill_store(store, args.layers, args.chunks, args.batch, kv, phases, args.progress)
    t_put = time.perf_counter()
    for f in list(store._writes):
        f.result()
    t_end = time.perf_counter()
    if prof:
        prof.disable()
        prof.dump_stats(args.profile)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    st = store.stats()
    disk_bytes = store.tiers[2].bytes_written
    bounds = [(name, start, t) for name, start, t in phases] + [("end", total, t_put)]
    rows = []
    for (name, start, t), (_, nxt, t2) in zip(bounds, bounds[1:]):
        n = nxt - start
        rows.append({"phase": name, "chunks": n, "s": round(t2 - t, 3), "chunks_per_s": round(n / max(t2 - t, 1e-9)),
                     "GBps_cold": round(n * cold / max(t2 - t, 1e-9) / 1e9, 3)})
    drive = plain_write(os.path.join(disk_dir, "plain.bin"), max(disk_bytes, 64 << 20), args.batch * cold)
    summary = {"chunks": total, "cold_chunk_bytes": cold, "gpu": gpu, "host": host, "disk": disk,
               "put_s": round(t_put - t0, 3), "drain_s": round(t_end - t_put, 3),
               "fill_GBps_cold": round(total * cold / (t_end - t0) / 1e9, 3),
               "disk_bytes": disk_bytes, "disk_direct": store.tiers[2].direct,
               "pwrite_s_all_threads": round(clock.write_s, 3), "put_blocked_on_disk_s": round(clock.wait_s, 3),
               "disk_GBps_while_filling": round(disk_bytes / (t_end - t0) / 1e9, 3),
               "plain_write_GBps": round(drive, 3), "h2disk_bytes": st["h2disk_bytes"]}
    store.close()
    print(json.dumps(summary), file=sys.stderr)
    for r in rows:
        print(json.dumps(r), file=sys.stderr)
    write_results("disk_fill", rows, args.out, {"command": "python " + " ".join(sys.argv), "summary": summary})


if __name__ == "__main__":
    main()
