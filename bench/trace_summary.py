"""Summarise a torch.profiler chrome trace: GPU busy time per stream, their overlap and the idle gaps.

    python bench/trace_summary.py trace.json [--events 40]

Used by bench/prefill_stream.py --trace and bench/prefill_profile.py to tell compute-bound from stalled runs.
"""
from __future__ import annotations

import argparse
import json

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def _union(iv: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(iv):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarize(path: str, n_events: int = 40) -> str:
    ev = [e for e in json.load(open(path))["traceEvents"] if e.get("cat") in GPU_CATS and "dur" in e]
    if not ev:
        return "no GPU events"
    t0 = min(e["ts"] for e in ev)
    span = max(e["ts"] + e["dur"] for e in ev) - t0
    streams: dict = {}
    for e in ev:
        streams.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
    lines = [f"GPU span {span / 1e3:.2f} ms; busy (any stream) {_union([i for v in streams.values() for i in v]) / 1e3:.2f} ms"]
    for tid, iv in sorted(streams.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  stream {tid}: {len(iv)} events, busy {_union(iv) / 1e3:.2f} ms")
    gaps = []
    allv = sorted(i for v in streams.values() for i in v)
    end = allv[0][1]
    for a, b in allv[1:]:
        if a > end:
            gaps.append(a - end)
        end = max(end, b)
    gaps.sort(reverse=True)
    lines.append(f"  idle gaps: {len(gaps)}, total {sum(gaps) / 1e3:.2f} ms, largest "
                 + ", ".join(f"{g / 1e3:.2f}" for g in gaps[:8]) + " ms")
    lines.append("  first events (start ms, dur ms, stream, name):")
    for e in sorted(ev, key=lambda e: e["ts"])[:n_events]:
        lines.append(f"    {(e['ts'] - t0) / 1e3:8.3f} {e['dur'] / 1e3:7.3f} {e['tid']} {e['name'][:60]}")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("trace")
    ap.add_argument("--events", type=int, default=40)
    a = ap.parse_args()
    print(summarize(a.trace, a.events))
