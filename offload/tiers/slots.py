"""Slot bookkeeping shared by the tiers: a free list, and runs of consecutive slots (one copy per run)."""
from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np

from offload.errors import CapacityError


class SlotAllocator:
    """Free list over `capacity` slots. Lowest slots go first, so a fresh tier hands out runs."""

    def __init__(self, capacity: int, tier_name: str):
        if capacity < 0:
            raise ValueError(f"{tier_name} tier capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.tier_name = tier_name
        self._free = list(range(capacity))   # a min-heap: the lowest free slots go first, so allocations form runs
        self._used = bytearray(capacity)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} slots")
        if n > len(self._free):
            raise CapacityError(f"{self.tier_name} tier is full: {n} chunk slots wanted, {len(self._free)} free "
                                f"of {self.capacity}; give the tier more memory or lower --ctx")
        out = [heapq.heappop(self._free) for _ in range(n)]
        for s in out:
            self._used[s] = 1
        return out

    def free(self, slots: Sequence[int]) -> None:
        slots = [int(s) for s in slots]
        for s in slots:
            # a double free would hand one slot to two chunks: fail loudly, it is a bug in the caller
            if not (0 <= s < self.capacity) or not self._used[s]:
                raise ValueError(f"slot {s} of the {self.tier_name} tier is not allocated")
        for s in slots:
            self._used[s] = 0
            heapq.heappush(self._free, s)


def runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first position, first slot, length) per run of consecutive slots: one copy per run, not per chunk."""
    return paired_runs(range(len(slots)), slots)


def pieces(spans: Sequence[tuple[int, int, int]], most: int) -> list[tuple[int, int, int]]:
    """Runs (first src, first dst, length) cut into pieces of at most `most` (bounded writes, one handle each)."""
    return [(a + i, b + i, min(most, n - i)) for a, b, n in spans for i in range(0, n, max(1, most))]


def flag_runs(flags: Sequence) -> list[tuple[int, int, object]]:
    """(start, end, flag) per run of equal flags (e.g. packed or not, block by block)."""
    out, i = [], 0
    while i < len(flags):
        j = i
        while j < len(flags) and flags[j] == flags[i]:
            j += 1
        out.append((i, j, flags[i]))
        i = j
    return out


def paired_runs(src: Sequence[int], dst: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first src, first dst, length) per run where src and dst both advance by one (a vector pass: puts at 1M
    tokens split ~1M chunks into runs, a Python loop per element cost ~2 us each)."""
    a, b = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)   # a, b: [n]
    if not a.size:
        return []
    cut = np.flatnonzero((np.diff(a) != 1) | (np.diff(b) != 1)) + 1            # cut: [r - 1] run starts but the first
    starts = np.concatenate(([0], cut))                                         # starts: [r]
    lengths = np.diff(np.concatenate((starts, [a.size])))                       # lengths: [r]
    return list(zip(a[starts].tolist(), b[starts].tolist(), lengths.tolist()))
