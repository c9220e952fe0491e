"""Eviction policy: which chunks leave a tier first. Mechanism (copies, slots) stays in the tiers and store.

The store asks two things of a policy: record that chunks were used (`touch`, on insert and on every
selection), and rank candidates for demotion (`victims`). Sinks (the first `sink_chunks` chunks of a
layer) and the local window (its last `window_chunks` full chunks) are pinned on the device tier: every
decode step attends to them, so moving them would cost a copy per step.

State is per layer: one float64 score per chunk index in growable tensors, so ranking thousands of
candidates is a few vector ops, not a Python loop.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class EvictionPolicy(ABC):
    """Ranks chunks for demotion. Lower rank leaves first."""

    def __init__(self, sink_chunks: int = 1, window_chunks: int = 4):
        self.sink_chunks = sink_chunks
        self.window_chunks = window_chunks

    def pinned(self, chunk_ids: torch.Tensor, num_chunks: int) -> torch.Tensor:
        """Bool mask over chunk_ids [m]: sinks and the local window of a layer with num_chunks chunks."""
        return (chunk_ids < self.sink_chunks) | (chunk_ids >= num_chunks - self.window_chunks)

    @abstractmethod
    def touch(self, layer: int, chunk_ids: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Chunks [m] were inserted (weight 0) or selected (weight: attention mass, None = 1 per hit)."""

    @abstractmethod
    def victims(self, layers: torch.Tensor, chunk_ids: torch.Tensor, n: int) -> torch.Tensor:
        """Positions (int64 [n]) into the candidates (layers, chunk_ids: int64 [m]) to demote first."""


class _PerLayer:
    """A growable float64 table [layers, chunk ids], one row per layer: a ranking gathers its candidates' values in
    one indexed read, O(candidates), where a masked pass per layer over all of them took 32 passes over the ~740K
    host residents of a 1M-token session at every spilling put (issue 12)."""

    def __init__(self, fill: float = 0.0):
        self.fill = fill
        self.data = torch.empty(0, 0, dtype=torch.float64)                      # data: [L', cap]

    def at(self, layer: int, size: int) -> torch.Tensor:
        """Row `layer`, at least `size` long (a view: writes go to the table; valid until the next growth)."""
        rows, cap = self.data.shape
        if layer >= rows or size > cap:
            grown = torch.full((max(rows, layer + 1), max(cap, size, 2 * cap) if size > cap else cap), self.fill,
                               dtype=torch.float64)                              # grown: [L'', cap']
            grown[:rows, :cap] = self.data
            self.data = grown
        return self.data[layer]                                                  # [cap] float64

    def gather(self, layers: torch.Tensor, chunk_ids: torch.Tensor) -> torch.Tensor:
        """Values of (layers, chunk_ids) [m] each; `fill` for chunks never set."""
        rows, cap = self.data.shape
        ok = (layers < rows) & (chunk_ids < cap)                                 # ok: [m] bool
        if bool(ok.all()):
            return self.data[layers, chunk_ids]                                  # [m]
        out = torch.full((chunk_ids.numel(),), self.fill, dtype=torch.float64)  # out: [m]
        out[ok] = self.data[layers[ok], chunk_ids[ok]]
        return out


class LRUPolicy(EvictionPolicy):
    """Least recently used first; a batch inserted together ages in order (its last chunk is newest)."""

    def __init__(self, sink_chunks: int = 1, window_chunks: int = 4):
        super().__init__(sink_chunks, window_chunks)
        self._last = _PerLayer(fill=-1.0)
        self._clock = 0

    def touch(self, layer, chunk_ids, weight=None):
        ids = chunk_ids.reshape(-1).long()
        ids = ids[ids >= 0]
        if not ids.numel():
            return
        ticks = torch.arange(self._clock, self._clock + ids.numel(), dtype=torch.float64)  # ticks: [m]
        self._clock += ids.numel()
        self._last.at(layer, int(ids.max()) + 1)[ids] = ticks

    def victims(self, layers, chunk_ids, n):
        last = self._last.gather(layers, chunk_ids)                              # last: [m]
        return torch.argsort(last, stable=True)[:n]


class AttentionMassPolicy(EvictionPolicy):
    """Keep the chunks that attention used most recently: decayed mass, ties broken by recency.

    mass(chunk) = sum over its selections of weight * decay**(steps since), a step being one touch of
    that chunk's layer (one decode step, or one insert). weight is the attention mass the chunk received
    (any per-selection score works) or 1 per selection when the caller has none. A chunk never selected
    has mass 0; among those, the least recently inserted goes first (LRU).
    """

    def __init__(self, sink_chunks: int = 1, window_chunks: int = 4, decay: float = 0.95):
        super().__init__(sink_chunks, window_chunks)
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay
        self._mass = _PerLayer(0.0)
        self._stamp = _PerLayer(0.0)      # layer step at which mass was last brought up to date
        self._recency = LRUPolicy(sink_chunks, window_chunks)
        self._step: dict[int, int] = {}

    def _current(self, layers: torch.Tensor, chunk_ids: torch.Tensor) -> torch.Tensor:
        mass = self._mass.gather(layers, chunk_ids)                              # mass: [m]
        stamp = self._stamp.gather(layers, chunk_ids)                            # stamp: [m]
        steps = torch.zeros(max(self._step, default=0) + 1, dtype=torch.float64)  # steps: [L]
        for layer, step in self._step.items():
            steps[layer] = step
        now = steps[layers.clamp(max=steps.numel() - 1)]                          # now: [m]
        return mass * self.decay ** (now - stamp)                                # [m]

    def touch(self, layer, chunk_ids, weight=None):
        ids = chunk_ids.reshape(-1).long()
        keep = ids >= 0
        ids = ids[keep]
        if not ids.numel():
            return
        if weight is None:
            w = torch.ones(ids.numel(), dtype=torch.float64)                     # w: [m]
        else:
            w = weight.reshape(-1)[keep.to(weight.device)].detach().to("cpu", torch.float64)  # w: [m]
        self._step[layer] = self._step.get(layer, 0) + 1
        uniq, inv = ids.unique(return_inverse=True)                              # uniq: [u]
        add = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, w)  # add: [u] (heads summed)
        layers = torch.full_like(uniq, layer)                                    # layers: [u]
        cur = self._current(layers, uniq)                                        # cur: [u]
        size = int(uniq.max()) + 1
        self._mass.at(layer, size)[uniq] = cur + add
        self._stamp.at(layer, size)[uniq] = float(self._step[layer])
        self._recency.touch(layer, uniq)

    def victims(self, layers, chunk_ids, n):
        by_age = self._recency.victims(layers, chunk_ids, chunk_ids.numel())     # by_age: [m] oldest first
        mass = self._current(layers, chunk_ids)[by_age]                          # mass: [m]
        return by_age[torch.argsort(mass, stable=True)][:n]


def make_policy(name: str | EvictionPolicy, sink_chunks: int = 1, window_chunks: int = 4) -> EvictionPolicy:
    """'lru' | 'attention' (alias 'mass') | an EvictionPolicy instance."""
    if isinstance(name, EvictionPolicy):
        return name
    kinds = {"lru": LRUPolicy, "attention": AttentionMassPolicy, "mass": AttentionMassPolicy}
    if name not in kinds:
        from offload.errors import ConfigError
        raise ConfigError(f"unknown eviction policy {name!r}; use one of {', '.join(kinds)}")
    return kinds[name](sink_chunks, window_chunks)
