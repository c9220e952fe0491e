"""Adaptive budgets: per layer and KV head, attend chunks best-first until their estimated mass reaches p.

A fixed count per head starves the heads whose attention is spread out (on SmolLM2 at 8K a fixed 5% left the
worst head with 0.19 of its mass) and wastes bytes on heads that look at a handful of tokens. After Twilight's
top-p and the mass thresholds of XAttention/FlexPrefill, each KV head here takes the fewest chunks whose
estimated share of the attention mass, together with what is attended anyway (sinks, window, tail), reaches
p; never fewer than a floor nor more than a cap (both in chunks here; Budget converts tokens).

The estimate comes from the index (`chunk_log_mass(query)` on each index: the log of each chunk's estimated
sum of exp(scale * q.k), per query head). Everything below is torch ops on fixed shapes with no host sync, so a
decode step that calls it can be captured in a CUDA graph: `counts` stay on the device and act as a mask over
a selection of fixed width `cap`.
"""
from __future__ import annotations

import torch


def selectable_mask(num_alloc: int, count: torch.Tensor, n_sink: int, n_window: int) -> torch.Tensor:
    """bool [num_alloc]: written chunks outside the sinks and the window (what the budget chooses among).

    count: int64 [1] full chunks written (may live on the device: no sync).
    """
    ids = torch.arange(num_alloc, device=count.device)                          # ids: [n]
    return (ids >= n_sink) & (ids < count - n_window)                           # mask: [n]


def group_shares(log_mass: torch.Tensor, selectable: torch.Tensor,
                 tail_lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated share of each selectable chunk in its query group's attention -> (share [Hkv, n], base [Hkv]).

    log_mass: [Hkv, G, n] float, log of the estimated unnormalised mass per chunk and query head (-inf where
              there is nothing); chunks that are not selectable (sinks, window) count in the normaliser.
    selectable: bool [n] or [Hkv, n].
    tail_lse: [Hq] (= [Hkv * G]) exact log-sum-exp of the tokens attended besides the chunks (the tail), or None.
    Each query head's softmax is normalised apart and the group averages them, so share.sum(1) + base = 1;
    base is the mass of what is attended anyway (sinks, window, tail).
    """
    hkv, g, n = log_mass.shape
    lm = log_mass.float()                                                       # lm: [Hkv, G, n]
    z = torch.logsumexp(lm, dim=2)                                              # z: [Hkv, G]
    if tail_lse is not None:
        z = torch.logaddexp(z, tail_lse.float().reshape(hkv, g).to(z.device))  # z: [Hkv, G]
    sel = selectable.to(lm.device).expand(hkv, n)                               # sel: [Hkv, n]
    per_head = torch.exp(lm - z[..., None])                                     # per_head: [Hkv, G, n]
    share = torch.where(sel, per_head.mean(dim=1), torch.zeros((), device=lm.device))  # share: [Hkv, n]
    share = torch.nan_to_num(share, nan=0.0)                                    # a row of -inf: z = -inf
    base = (1.0 - share.sum(dim=1)).clamp(0.0, 1.0)                             # base: [Hkv]
    return share, base


def adaptive_counts(scores: torch.Tensor, p: float, floor: int, cap: int,
                    base: torch.Tensor | None = None, available: torch.Tensor | None = None) -> torch.Tensor:
    """Chunks each KV head attends: the fewest best ones whose shares reach p -> int64 [Hkv] in [floor, cap].

    scores: [Hkv, n] estimated mass shares (any order; >= 0), e.g. group_shares()[0].
    base: [Hkv] mass attended anyway (counted toward p); None = 0.
    available: [Hkv] selectable chunks per head (counts never exceed it); None = positive scores.
    p = 1 takes every available chunk (up to cap): the exact path when the cap covers the context.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"mass threshold p={p} must be in (0, 1]")
    hkv, n = scores.shape
    if available is None:
        available = (scores > 0).sum(dim=1)                                     # available: [Hkv]
    if p >= 1.0 or n == 0:
        need = torch.full((hkv,), n, dtype=torch.long, device=scores.device)    # need: [Hkv]
    else:
        ordered = torch.sort(scores.float(), dim=1, descending=True).values     # ordered: [Hkv, n]
        before = torch.cumsum(ordered, dim=1) - ordered                         # before: [Hkv, n] exclusive
        if base is not None:
            before = before + base.float()[:, None]
        need = (before < p).sum(dim=1)                                          # need: [Hkv]
    counts = need.clamp(min=floor, max=cap)                                     # counts: [Hkv]
    return torch.minimum(counts, available.to(counts.device))


def adaptive_select(scores: torch.Tensor, counts: torch.Tensor, cap: int) -> torch.Tensor:
    """Best-first ids of fixed width: int64 [Hkv, min(cap, n)], -1 past each head's count (padding).

    scores: [Hkv, n] shares (0 for non-selectable chunks, which then sort last and are masked by counts).
    """
    width = min(int(cap), scores.shape[1])
    ids = torch.topk(scores.float(), width, dim=1).indices                      # ids: [Hkv, W]
    col = torch.arange(width, device=ids.device)                                # col: [W]
    return torch.where(col[None] < counts.to(ids.device)[:, None], ids, torch.full_like(ids, -1))


def true_chunk_log_mass(query: torch.Tensor, keys: torch.Tensor, chunk_tokens: int, scale: float) -> torch.Tensor:
    """Reference (exact) log mass per chunk and query head: query [Hq, D], keys [Hkv, n*C, D] -> [Hkv, G, n].

    What an index's chunk_log_mass estimates; the oracle of the fidelity bench and the calibration tests use it.
    """
    hq, d = query.shape
    hkv = keys.shape[0]
    qg = query.float().reshape(hkv, hq // hkv, d)                               # qg: [Hkv, G, D]
    s = torch.einsum("hgd,hnd->hgn", qg, keys.float()) * scale                  # s: [Hkv, G, N]
    return torch.logsumexp(s.reshape(hkv, hq // hkv, -1, chunk_tokens), dim=3)  # [Hkv, G, n]


class MassBudgetIndex:
    """Wraps a ChunkIndex so that `select` applies a mass budget: the same call, fewer ids per head.

    select(query, width) returns [Hkv, min(width, num_chunks)] ids best-first by estimated share, -1 past
    each head's count (the slot planner treats -1 as padding, so a padded column moves no bytes). width is
    what the selector asks for (the cap in chunks + sinks + window), so the step keeps its fixed shapes.
    Counts are summed on the device (`selected_chunks`): the average budget a run really used.
    """

    def __init__(self, inner, p: float, floor_chunks: int, n_sink: int, n_window: int):
        if not 0.0 < p <= 1.0:
            raise ValueError(f"mass threshold p={p} must be in (0, 1]")
        self.inner, self.p, self.floor = inner, float(p), int(floor_chunks)
        self.n_sink, self.n_window = int(n_sink), int(n_window)
        self.chunk_tokens = inner.chunk_tokens
        self._sum = torch.zeros(2, dtype=torch.float64, device=getattr(inner, "device", "cpu"))  # [chunks, heads x steps]

    def select(self, query: torch.Tensor, budget: int) -> torch.Tensor:
        n = self.inner.num_chunks
        width = min(int(budget), n)
        cap = max(0, width - self.n_sink - self.n_window)
        if cap == 0 or n == 0:
            return self.inner.select(query, budget)
        lm = self.inner.chunk_log_mass(query, cap)                              # lm: [Hkv, G, n_alloc]
        written = torch.isfinite(lm[0, 0])                                      # written: [n_alloc]
        count = written.sum()                                                   # count: [] (device: no sync)
        ids = torch.arange(lm.shape[2], device=lm.device)                       # ids: [n_alloc]
        mask = written & (ids >= self.n_sink) & (ids < count - self.n_window)   # mask: [n_alloc]
        share, base = group_shares(lm, mask)                                    # share: [Hkv, n_alloc]
        counts = adaptive_counts(share, self.p, self.floor, cap, base, mask.sum().expand(share.shape[0]))
        self._sum[0] += counts.sum()                                            # in place: graph-safe
        self._sum[1] += float(counts.numel())
        return adaptive_select(share, counts, width)                           # [Hkv, width], -1 = padding

    def selected_chunks(self) -> float:
        """Mean chunks selected per head and step so far (a host sync: call it for stats, not per step)."""
        total, n = self._sum.tolist()
        return total / n if n else 0.0

    # the rest of the ChunkIndex interface is the wrapped index's
    def build(self, keys, queries=None) -> None:
        self.inner.build(keys, queries)

    def extend(self, keys) -> None:
        self.inner.extend(keys)

    def reserve(self, num_chunks: int) -> None:
        self.inner.reserve(num_chunks)

    def gpu_bytes(self, num_chunks: int) -> int:
        return self.inner.gpu_bytes(num_chunks)

    def graph_key(self):
        return self.inner.graph_key()

    @property
    def num_chunks(self) -> int:
        return self.inner.num_chunks

    @property
    def max_chunks(self) -> int:
        return getattr(self.inner, "max_chunks", 0)

    @property
    def nbytes(self) -> dict[str, int]:
        return self.inner.nbytes


def wrap_mass_budget(indexes: list, budget, chunk_tokens: int, n_sink: int, n_window: int) -> list:
    """Each layer's index wrapped in MassBudgetIndex where `budget` (offload.indexes.Budget) has a mass
    threshold for that layer; others (and already wrapped ones) are returned as they are."""
    out = []
    for layer, idx in enumerate(indexes):
        p = budget.mass(layer)
        if p and not isinstance(idx, MassBudgetIndex):
            idx = MassBudgetIndex(idx, p, budget.floor_chunks(chunk_tokens, layer), n_sink, n_window)
        out.append(idx)
    return out
