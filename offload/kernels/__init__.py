"""Attention and scoring kernels for the sparse decode step.

Every function has a pure-torch reference with the same signature in `offload.kernels.reference`.
Dispatch: CUDA query (with a CUDA or pinned-host pool) and CuPy importable -> CuPy RawKernel;
anything else -> the reference. Shapes are documented in `reference`.
"""
from __future__ import annotations

import importlib.util
import warnings

import torch

from . import reference
from .tokens import token_attend  # torch ops around gather_rows (imported lazily there: it lives below)

__all__ = ["gather_attend", "merge_attn", "dense_attend", "score_chunks", "chunk_bounds", "plan_slots", "topk_rows",
           "gather_rows", "token_attend",
           "KERNELS_AVAILABLE", "reference"]

# CuPy is imported lazily (first CUDA call); this only says whether it could be
KERNELS_AVAILABLE: bool = importlib.util.find_spec("cupy") is not None and torch.cuda.is_available()
_backend_module = None


def _backend():
    """The CuPy launchers, or None (and KERNELS_AVAILABLE turns False) when CuPy cannot load."""
    global _backend_module, KERNELS_AVAILABLE
    if _backend_module is None and KERNELS_AVAILABLE:
        try:
            from . import _cupy
            _backend_module = _cupy
        except Exception as exc:  # a broken CuPy install must not break the torch path
            KERNELS_AVAILABLE = False
            warnings.warn(f"offload.kernels: CuPy failed to load ({exc}); using the torch reference "
                          "(install a cupy-cuda12x wheel that matches your CUDA driver)", stacklevel=3)
    return _backend_module


def _on_gpu(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda for t in tensors) and _backend() is not None


def _pool_reachable(q: torch.Tensor, pool: torch.Tensor) -> bool:
    # a pinned host pool is readable by the kernel through UVA; a pageable one is not
    return pool.is_cuda or (pool.device.type == "cpu" and pool.is_pinned())


def gather_attend(q: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, scale: float,
                  alt_pool: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [Hq, D] over pool slots [Hkv, K] of pool [S, 2, Hkv, C, D] -> (o [Hq, D], lse [Hq]) f32.

    Slots flagged with reference.ALT_SLOT are read from alt_pool (same layout; e.g. the pinned host slab next
    to the GPU pool), so both tiers are attended in one launch.
    """
    pools = (pool,) if alt_pool is None else (pool, alt_pool)
    if _on_gpu(q) and all(_pool_reachable(q, p) for p in pools):
        _cupy = _backend()
        if all(_cupy.supports_gather(q, p) for p in pools) and (
                alt_pool is None or (alt_pool.shape[1:] == pool.shape[1:] and alt_pool.dtype == pool.dtype)):
            return _cupy.gather_attend(q, pool, slots, scale, alt_pool)
    return reference.gather_attend(q, pool, slots, scale, alt_pool)


def dense_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 n_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [Hq, D] over k, v [Hkv, N, D] (the first n_valid: int64 [1], when given) -> (o [Hq, D], lse [Hq]) f32."""
    if _on_gpu(q, k, v):
        _cupy = _backend()
        if _cupy.supports_dense(q, k, v, n_valid):
            return _cupy.dense_attend(q, k, v, scale, n_valid)
    return reference.dense_attend(q, k, v, scale, n_valid)


def merge_attn(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
               lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log-sum-exp merge of two partial attentions: o [..., D], lse [...] -> float32."""
    if _on_gpu(o1, lse1, o2, lse2):
        _cupy = _backend()
        if _cupy.supports_merge(o1, lse1, o2, lse2):
            return _cupy.merge_attn(o1, lse1, o2, lse2)
    return reference.merge_attn(o1, lse1, o2, lse2)


def chunk_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, n_valid: int,
                 group_reduce: str = "max") -> torch.Tensor:
    """Quest bound per KV head and chunk, combined over the query group -> [Hkv, n_valid] f32."""
    if _on_gpu(q, kmin, kmax):
        _cupy = _backend()
        if _cupy.supports_score(q, kmin, kmax, group_reduce):
            return _cupy.chunk_bounds(q, kmin, kmax, n_valid, group_reduce)
    return reference.chunk_bounds(q, kmin, kmax, n_valid, group_reduce)


def score_chunks(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, n_valid: int, k: int,
                 group_reduce: str = "max") -> torch.Tensor:
    """Top-k chunk ids per KV head by Quest bound among the first n_valid chunks -> int64 [Hkv, min(k, n_valid)]."""
    bounds = chunk_bounds(q, kmin, kmax, n_valid, group_reduce)      # bounds: [Hkv, n_valid]
    return torch.topk(bounds, min(k, n_valid), dim=1).indices        # ids: [Hkv, k']


def plan_slots(sel: torch.Tensor, n_valid: torch.Tensor, n_sink: int, n_window: int, budget: int,
               streaming: torch.Tensor, tier: torch.Tensor, slot: torch.Tensor, hits: torch.Tensor,
               chunk_hits: torch.Tensor, merged: bool = False,
               selection_hits_apart: bool = False) -> tuple[torch.Tensor, ...]:
    """GPU-pool and host-slab slot lists [Hkv, F + M] int32 of one layer's sparse step, or one merged list
    with host slots flagged (reference.plan_slots)."""
    args = (sel, n_valid, n_sink, n_window, budget, streaming, tier, slot, hits, chunk_hits, merged,
            selection_hits_apart)
    if _on_gpu(sel, n_valid, streaming, tier, slot, hits, chunk_hits):
        _cupy = _backend()
        if _cupy.supports_plan(sel, n_valid, streaming, tier, slot, hits, chunk_hits, selection_hits_apart):
            return _cupy.plan_slots(*args)
    return reference.plan_slots(*args)


def topk_rows(scores: torch.Tensor, count: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k row ids per head of scores [Hkv, N] among the first `count` (int64 [1]) rows, best first -> [Hkv, k]."""
    if _on_gpu(scores, count):
        _cupy = _backend()
        if _cupy.supports_topk(scores, count, k):
            return _cupy.topk_rows(scores, count, k)
    return reference.topk_rows(scores, count, k)


def gather_rows(pool: torch.Tensor, slots: torch.Tensor, which: int, rows: torch.Tensor | None = None,
                alt_pool: torch.Tensor | None = None) -> torch.Tensor:
    """K (which=0) or V (which=1) rows of chunk slots [Hkv, K] at positions rows [Hkv, R] (None: all K*C)
    of pool [S, 2, Hkv, C, D] (and alt_pool for ALT_SLOT slots) -> [Hkv, R, D] on slots' device
    (reference.gather_rows). On the GPU a pinned host pool is read in place, with no host round trip."""
    reference.check_rows_args(pool, slots, which, rows)
    pools = (pool,) if alt_pool is None else (pool, alt_pool)
    if _on_gpu(slots) and all(_pool_reachable(slots, p) for p in pools):
        _cupy = _backend()
        if _cupy.supports_rows(pool, alt_pool):
            return _cupy.gather_rows(pool, slots, which, rows, alt_pool)
    return reference.gather_rows(pool, slots, which, rows, alt_pool)
