"""Step 1 of a decode step (select -> plan -> attend -> merge): which chunks each KV head attends.

    selection = selector.select(layer, q, n_chunks, length)     # here: budget, sinks, window, index
    plan = store.plan(layer, selection)                         # offload/tiers/decode.py: slots per tier
    o, lse = kernels.attend_plan(q, tail, plan, scale)          # offload/kernels/plan_attend.py: gather + merge

A `Selection` stays lazy: the index's best-first ids plus how many of them to take, so that combining
sinks + window + selection and looking the slots up is one kernel launch (`kernels.plan_slots`) inside
the captured step. Exact attention ("everything") is the same shape: every chunk id, no sinks or window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Selection:
    """Chunk ids one decode query attends per KV head, before slot lookup.

    Per head: sinks 0..n_sink-1, the window n-n_window..n-1 (n read on the device), then the first `take`
    ids of `ids` that are neither (none for a streaming head). token_k > 0: those `take` chunks are only
    candidates; the token stage keeps their token_k best tokens per KV head (ranked by token_reduce).
    token_mass > 0: token_k is a cap; per KV head the fewest best tokens whose softmax mass (with sinks,
    window and tail) reaches token_mass are attended, at least token_floor (kernels.tokens.select_tokens).
    """
    ids: torch.Tensor            # int64 [Hkv, M] best first, contiguous, on the compute device
    take: int
    n_sink: int
    n_window: int
    streaming: torch.Tensor      # bool [Hkv]
    token_k: int = 0
    token_reduce: str = "sum"
    token_mass: float = 0.0
    token_floor: int = 0
    # token_scores "shadow": the layer's index, whose token_logits(q [Hq, D], candidate chunk ids [Hkv, m]) estimates
    # the logits [Hkv, G, m*C] (and shadow_operands() feeds the fused GPU ranking), so candidates are ranked
    # without reading their keys; None: the candidates' keys are read and scored exactly
    rank_tokens: object | None = None

    @property
    def whole_columns(self) -> int:
        """Columns of the slot plan attended whole; the rest are token-stage candidates."""
        return self.n_sink + self.n_window if self.token_k else self.n_sink + self.n_window + self.ids.shape[1]


class Selector:
    """Budget + sinks + window + one ChunkIndex per layer -> a Selection (indexes None: exact, every chunk)."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, chunk_tokens: int, n_sink: int, n_window: int,
                 device, indexes=None, budget=None, token_candidates: float | None = None,
                 token_reduce: str = "sum", token_mass: float = 0.0, token_floor: int = 0,
                 token_scores: str = "keys"):
        self.L, self.Hkv, self.C = num_layers, num_kv_heads, chunk_tokens
        self.n_sink, self.n_window, self.device = n_sink, n_window, torch.device(device)
        if indexes is not None and budget is not None and budget.adaptive:
            # a mass budget: each head's count comes from the index's mass estimate; the width stays the cap
            # (budget.chunks), -1 past the count (offload/indexes/adaptive.py)
            from offload.indexes.adaptive import wrap_mass_budget
            indexes = wrap_mass_budget(indexes, budget, chunk_tokens, n_sink, n_window)
        self.indexes, self.budget = indexes, budget   # budget: offload.indexes.Budget (chunks beyond sinks + window)
        self.token_candidates, self.token_reduce = token_candidates, token_reduce  # None: whole chunks
        self.token_mass, self.token_floor = token_mass, token_floor   # 0: the budget's tokens, a fixed count
        self.token_scores = token_scores   # "shadow": the layer's index estimates the candidates' logits
        streaming = budget.streaming_heads if budget is not None else {}
        self.streaming = torch.tensor([[h in streaming.get(layer, ()) for h in range(num_kv_heads)]
                                       for layer in range(num_layers)], device=device)  # [L, Hkv] bool
        self._no_stream = torch.zeros(num_kv_heads, dtype=torch.bool, device=device)  # [Hkv]
        self.select_s = 0.0      # host time spent selecting (stats)

    @property
    def sparse(self) -> bool:
        return self.indexes is not None

    def layer_budget(self, layer: int, n_chunks: int, length: int) -> int | None:
        """Chunks the index adds on top of sinks + window; None when every chunk is attended."""
        if not self.sparse:
            return None
        b = self.budget.chunks(length, self.C, layer)
        return None if n_chunks <= self.n_sink + self.n_window + b else b

    def candidates(self, budget: int, n_chunks: int) -> int:
        """Chunks the token stage scores for a layer whose budget is `budget` chunks."""
        return min(n_chunks - self.n_sink - self.n_window, math.ceil(budget * self.token_candidates))

    def select(self, layer: int, q: torch.Tensor, n_chunks: int, length: int) -> Selection:
        """What query q [Hq, D] at position length-1 attends among n_chunks stored chunks."""
        budget = self.layer_budget(layer, n_chunks, length)
        if budget is None:      # exact: every chunk, one column each
            every = torch.arange(n_chunks, device=self.device).expand(self.Hkv, n_chunks).contiguous()  # [Hkv, n]
            return Selection(every, n_chunks, 0, 0, self._no_stream)
        return self.propose(layer, q, budget, n_chunks)

    def propose(self, layer: int, q: torch.Tensor, budget: int, n_chunks: int) -> Selection:
        """The index's proposal for a layer whose budget leaves chunks out."""
        import time
        t = time.perf_counter()
        token = self.token_candidates is not None
        want = self.candidates(budget, n_chunks) if token else budget
        ids = self.indexes[layer].select(q, want + self.n_sink + self.n_window)  # ids: [Hkv, W + fixed]
        self.select_s += time.perf_counter() - t
        return Selection(ids.to(self.device).contiguous(), want, self.n_sink, self.n_window, self.streaming[layer],
                         budget * self.C if token else 0, self.token_reduce, self.token_mass, self.token_floor,
                         self._ranker(layer) if token else None)

    def _ranker(self, layer: int):
        """The layer's index that estimates the candidates' logits (low-rank key shadows), or None: exact keys."""
        if self.token_scores != "shadow":
            return None
        idx = self.indexes[layer]
        return getattr(idx, "inner", idx)

    def graph_key(self, n_chunks: int, length: int):
        """What a captured step's selection shapes depend on; None when an index syncs with the host."""
        if not self.sparse:
            return ("all", n_chunks)             # every chunk is attended: shapes follow the count
        fixed = self.n_sink + self.n_window
        budgets = tuple(self.budget.chunks(length, self.C, layer) for layer in range(self.L))
        if self.token_candidates is not None:    # the candidate count follows n until it reaches its cap
            budgets += tuple(self.candidates(b, n_chunks) for b in budgets)
        index_keys = tuple(idx.graph_key() for idx in self.indexes)
        if any(k is None for k in index_keys):
            return None
        # a layer whose budget still covers every chunk attends them all: its shapes follow the count
        small = tuple(n_chunks if n_chunks <= fixed + b else -1 for b in budgets)
        return ("sparse", budgets, small, index_keys)

    def index_chunks(self, layer: int, first: int, k: torch.Tensor) -> None:
        """Feed new full chunks' keys k [Hkv, n*C, D] (chunks first..) to the layer's index."""
        if not self.sparse:
            return
        idx = self.indexes[layer]
        if idx.num_chunks == 0 and first == 0:
            idx.build(k)
            # room for the whole context at once (the planner counted it): later appends, prefill's included,
            # never regrow (no transient old + new buffers under a capped GPU, no graph recapture)
            idx.reserve(getattr(idx, "max_chunks", 0) or 2 * idx.num_chunks)
        else:
            idx.extend(k)

    # -- index rows (the prompt cache keeps them: a quantized-KV resume cannot rebuild them from its keys) --
    def row_bytes(self) -> int:
        """Bytes of one chunk's index row (every layer the same); 0 when the indexes cannot export rows."""
        idx = self._row_index(0)
        return idx.row_bytes if idx is not None else 0

    def export_rows(self, layer: int, first: int, count: int) -> torch.Tensor | None:
        """The layer index's rows of chunks first.. -> uint8 [count, row_bytes()] on the CPU; None without rows."""
        idx = self._row_index(layer)
        return idx.export_rows(first, count) if idx is not None else None

    def import_rows(self, layer: int, first: int, rows: torch.Tensor) -> None:
        """Append exported rows uint8 [count, row_bytes()] as chunks first.. (in place of index_chunks)."""
        idx = self._row_index(layer)
        if idx is None:
            raise ValueError("this selector's indexes keep no exportable rows; index the chunks' keys instead")
        empty = idx.num_chunks == 0 and first == 0
        idx.import_rows(first, rows)
        if empty:       # as index_chunks after build: room for the whole context
            idx.reserve(getattr(idx, "max_chunks", 0) or 2 * idx.num_chunks)

    def _row_index(self, layer: int):
        """The layer's index with export_rows (a mass budget's wrapper looked through), else None."""
        if not self.sparse:
            return None
        from offload.indexes.adaptive import MassBudgetIndex
        idx = self.indexes[layer]
        idx = idx.inner if isinstance(idx, MassBudgetIndex) else idx
        return idx if hasattr(idx, "export_rows") else None
