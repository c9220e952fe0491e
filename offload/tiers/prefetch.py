"""Which drive reads a decode step starts a layer ahead: policy only (the store reads what it is told).

A layer's prediction is the set of chunks it read from the drive at the previous step. Whether that set is worth
reading early depends on how much attention moves between steps: on a real model consecutive queries select
mostly the same chunks, on a synthetic fill (dummy weights) almost none (bench/disk_prefetch.py). A prefetched
chunk that the next selection does not need is drive time spent for nothing (and pushes the needed reads back),
so the adaptive rule measures, per layer, the precision every prediction would have had (|predicted & needed| /
|predicted|, known for free at the next step whether the reads were started or not) over the last `window`
steps, and prefetches a layer only while that precision is at least `min_precision`. Since the measurement
does not depend on prefetching, a layer whose selection settles is picked up again at once; no probing.

Exactness does not depend on the rule: a prefetched chunk is the same bytes as one read on demand, and every
chunk a step selects is read (from the prefetch's buffer, or the drive now) whatever was predicted.
"""
from __future__ import annotations

from collections import deque

import torch

PREFETCH_MODES = ("adaptive", "always", "off")


class PrefetchRule:
    """mode "always": every layer reads last step's drive chunks a layer ahead (the scheme before this rule);
    "off": never; "adaptive": only layers whose recent prediction precision reaches min_precision."""

    def __init__(self, num_layers: int, mode: str = "adaptive", min_precision: float = 0.5, window: int = 4):
        if mode not in PREFETCH_MODES:
            raise ValueError(f"prefetch mode must be one of {', '.join(PREFETCH_MODES)}, not {mode!r}")
        self.mode, self.min_precision = mode, min_precision
        self._recent = [deque(maxlen=window) for _ in range(num_layers)]   # (hit, predicted) per past step

    def wanted(self, layer: int) -> bool:
        """Whether to start `layer`'s predicted drive reads now."""
        if self.mode != "adaptive":
            return self.mode == "always"
        recent = self._recent[layer]
        predicted = sum(p for _, p in recent)
        # no evidence yet: read ahead (the scheme's default); else only while most of what it reads is used
        return predicted == 0 or sum(h for h, _ in recent) >= self.min_precision * predicted

    def observe(self, layer: int, predicted: torch.Tensor, needed: torch.Tensor) -> None:
        """Layer's drive chunks predicted from its previous step [p] and those this step needed [n] (distinct)."""
        if predicted.numel():
            self._recent[layer].append((int(torch.isin(predicted, needed).sum()), predicted.numel()))

    def precision(self, layer: int) -> float | None:
        """The recent precision of layer's predictions (None before the first)."""
        recent = self._recent[layer]
        predicted = sum(p for _, p in recent)
        return sum(h for h, _ in recent) / predicted if predicted else None
