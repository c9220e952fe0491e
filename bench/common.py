"""Shared helpers for the benchmarks: timing, GPU caps, JSON + table output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def cap_gpu(gib: float | None) -> None:
    """Model the consumer card: the caching allocator refuses to grow past `gib`."""
    if gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int) -> list[float]:
    """Wall time in ms of each call (synchronised), after the caller's warm-up."""
    out = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(1000 * (time.perf_counter() - t0))
    return out


def event_ms(fn, reps: int) -> float:
    """Median ms of fn() between CUDA events (GPU time only, no host-side sync cost), after one warm-up call."""
    import torch
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return median(times)


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def write_results(name: str, rows: list[dict], out: str | None, meta: dict | None = None) -> None:
    doc = {"bench": name, "date": date.today().isoformat(), "device": device_name(),
           "torch": torch.__version__, **(meta or {}), "rows": rows}
    path = Path(out or f"bench/out/{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str))
    print_table(rows)
    print(f"\nwrote {path}  ({doc['device']}, {doc['date']})")


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    rows = [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in rows]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-+-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols))


def graph_ms(fn, reps: int) -> float:
    """Median ms of fn() replayed in a CUDA graph between CUDA events (how decode launches its kernels)."""
    fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):     # warm up off the default stream, as capture requires
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    del g
    return median(times)
