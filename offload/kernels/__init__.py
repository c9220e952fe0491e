"""Attention and scoring kernels for the sparse decode step.

Every kernel has a pure-torch reference with the same signature in `offload.kernels.reference`. One
mechanism dispatches all of them (`_kernel`): the CuPy launcher of the same name runs when its inputs are
on the GPU (a pool may also be a pinned host tensor, read in place through UVA), CuPy loads, and its
`supports_*` predicate accepts them; anything else runs the reference. Shapes are documented in `reference`.
`attend_plan` (plan_attend.py) executes a whole DecodePlan with these kernels.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from . import reference
from .tokens import token_attend  # torch ops around gather_rows (imported lazily there: it lives below)

__all__ = ["gather_attend", "merge_attn", "merge_all", "dense_attend", "score_chunks", "chunk_bounds", "plan_slots",
           "topk_rows", "gather_rows", "token_attend", "attend_plan", "Tail", "SlotLists", "KERNELS",
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


def _reachable(t: torch.Tensor | None) -> bool:
    # a pinned host tensor is readable by a kernel through UVA; a pageable one is not
    return t is None or t.is_cuda or (t.device.type == "cpu" and t.is_pinned())


def _same_layout(pool: torch.Tensor, alt: torch.Tensor | None) -> bool:
    return alt is None or (alt.shape[1:] == pool.shape[1:] and alt.dtype == pool.dtype)


# kernel name -> (where: inputs the CuPy launcher can read, checked before CuPy loads; supports: the
# launcher's own predicate, given the CuPy module). The launcher and the reference share the name.
KERNELS: dict[str, tuple] = {}


def _kernel(where, supports):
    """Register a kernel: calls go to _cupy.<name> when where(*args) and supports(cupy, *args), else reference.<name>."""
    def register(fn):
        name = fn.__name__
        KERNELS[name] = (where, supports)

        @functools.wraps(fn)
        def run(*args, **kw):
            fn(*args, **kw)                          # argument checks shared by both paths
            if where(*args, **kw):
                cp = _backend()
                if cp is not None and supports(cp, *args, **kw):
                    return getattr(cp, name)(*args, **kw)
            return getattr(reference, name)(*args, **kw)
        return run
    return register


@_kernel(lambda q, pool, slots, scale, alt_pool=None: q.is_cuda and _reachable(pool) and _reachable(alt_pool),
         lambda cp, q, pool, slots, scale, alt_pool=None: cp.supports_gather(q, pool) and (
             alt_pool is None or cp.supports_gather(q, alt_pool)) and _same_layout(pool, alt_pool))
def gather_attend(q: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, scale: float,
                  alt_pool: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [Hq, D] over pool slots [Hkv, K] of pool [S, 2, Hkv, C, D] -> (o [Hq, D], lse [Hq]) f32.

    Slots flagged with reference.ALT_SLOT are read from alt_pool (same layout; e.g. the pinned host slab next
    to the GPU pool), so both tiers are attended in one launch.
    """


@_kernel(lambda q, k, v, scale, n_valid=None: q.is_cuda and k.is_cuda and v.is_cuda,
         lambda cp, q, k, v, scale, n_valid=None: cp.supports_dense(q, k, v, n_valid))
def dense_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 n_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [Hq, D] over k, v [Hkv, N, D] (the first n_valid: int64 [1], when given) -> (o [Hq, D], lse [Hq]) f32."""


@_kernel(lambda *t: all(x.is_cuda for x in t), lambda cp, *t: cp.supports_merge(*t))
def merge_attn(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
               lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log-sum-exp merge of two partial attentions: o [..., D], lse [...] -> float32."""


def merge_all(partials) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact log-sum-exp merge of N partial attentions [(o [..., D], lse [...]), ...] over disjoint keys, left to
    right (the order fixes the float rounding: the tail first, then the plan's parts in plan order)."""
    it = iter(partials)
    o, lse = next(it)
    for o2, lse2 in it:
        o, lse = merge_attn(o, lse, o2, lse2)
    return o, lse


@_kernel(lambda q, kmin, kmax, n_valid, group_reduce="max": q.is_cuda and kmin.is_cuda and kmax.is_cuda,
         lambda cp, q, kmin, kmax, n_valid, group_reduce="max": cp.supports_score(q, kmin, kmax, group_reduce))
def chunk_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, n_valid: int,
                 group_reduce: str = "max") -> torch.Tensor:
    """Quest bound per KV head and chunk, combined over the query group -> [Hkv, n_valid] f32."""


def score_chunks(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, n_valid: int, k: int,
                 group_reduce: str = "max") -> torch.Tensor:
    """Top-k chunk ids per KV head by Quest bound among the first n_valid chunks -> int64 [Hkv, min(k, n_valid)]."""
    bounds = chunk_bounds(q, kmin, kmax, n_valid, group_reduce)      # bounds: [Hkv, n_valid]
    return torch.topk(bounds, min(k, n_valid), dim=1).indices        # ids: [Hkv, k']


SlotLists = reference.SlotLists


def _plan_inputs(sel, table):
    return (sel.ids, sel.streaming, table.count, table.tier, table.slot, table.attended, table.candidates,
            table.chunk_hits)


@_kernel(lambda sel, table, merged=False, with_ids=False: all(t.is_cuda for t in _plan_inputs(sel, table)),
         lambda cp, sel, table, merged=False, with_ids=False: cp.supports_plan(*_plan_inputs(sel, table)))
def plan_slots(sel, table, merged: bool = False, with_ids: bool = False) -> SlotLists:
    """One layer's slot plan in one launch: Selection sel (offload.indexes.selector) looked up in ChunkTable table
    (offload.tiers.decode) -> SlotLists: GPU-pool and host-slab slot lists [Hkv, F + M] int32, or one merged list
    with host slots flagged; with_ids: the attended chunk ids too (reference.plan_slots)."""


@_kernel(lambda scores, count, k, ids=None: scores.is_cuda and count.is_cuda,
         lambda cp, scores, count, k, ids=None: cp.supports_topk(scores, count, k, ids))
def topk_rows(scores: torch.Tensor, count: torch.Tensor, k: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k row ids per head of scores [Hkv, N] among the first `count` (int64 [1]) rows, best first -> [Hkv, k];
    with ids int64 [Hkv, N], the picked rows' ids (ids.gather(1, rows), in the same launch on the GPU)."""


@_kernel(lambda pool, slots, which, rows=None, alt_pool=None: slots.is_cuda and _reachable(pool) and _reachable(alt_pool),
         lambda cp, pool, slots, which, rows=None, alt_pool=None: cp.supports_rows(pool, alt_pool))
def gather_rows(pool: torch.Tensor, slots: torch.Tensor, which: int, rows: torch.Tensor | None = None,
                alt_pool: torch.Tensor | None = None) -> torch.Tensor:
    """K (which=0) or V (which=1) rows of chunk slots [Hkv, K] at positions rows [Hkv, R] (None: all K*C)
    of pool [S, 2, Hkv, C, D] (and alt_pool for ALT_SLOT slots) -> [Hkv, R, D] on slots' device
    (reference.gather_rows). On the GPU a pinned host pool is read in place, with no host round trip."""
    reference.check_rows_args(pool, slots, which, rows)


from .plan_attend import Tail, attend_plan  # noqa: E402  (uses the kernels above)
