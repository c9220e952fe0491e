"""CuPy launchers of tokens.cu: the token stage ranked from low-rank key shadows in five launches per layer
(shadow logits, the three of select.cu's top k, attend over the picked rows where they lie), six with a token mass
threshold (mass.cu before the attention). Imported by kernels.tokens once CuPy has loaded; `supports_ranked` says
which inputs they cover, the torch path takes the rest."""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _build
from ._cupy import _TAGS, _VEC, _attend, _launch, _ptr, _sm_count, supports_gather
from ._cupy_select import SELECT_MAX, select_top
from .reference import ALT_SLOT, mass_need

_SL_THREADS, _CR_THREADS = 256, 256        # SL_THREADS / CR_THREADS in tokens.cu
_MK_THREADS, MASS_MAX = 512, 4096          # MK_THREADS / MK_MAX in mass.cu: the most picks per head it thresholds


def supports_ranked(q, pool, slots, alt, cand, basis, shadows, k: int) -> bool:
    """One candidate part read in place, shadows on the GPU, shapes the kernels take, rows addressable in int32."""
    hkv, m_chunks = slots.shape
    if not (cand.is_cuda and cand.dtype == torch.int64 and cand.shape == slots.shape and cand.stride(1) == 1
            and slots.stride(1) == 1):
        return False
    _, _, phkv, c, d = pool.shape
    if not (q.is_cuda and shadows.is_cuda and basis.is_cuda and slots.is_cuda and supports_gather(q, pool)):
        return False
    if alt is not None and (alt.shape[1:] != pool.shape[1:] or alt.dtype != pool.dtype or not alt.is_contiguous()
                            or alt.data_ptr() % 16 or not (alt.is_cuda or alt.is_pinned())):
        return False
    m = m_chunks * c
    rows = max(pool.shape[0], 0 if alt is None else alt.shape[0]) * 2 * hkv * c
    return (supports_shadow_logits(q, basis, shadows, cand) and shadows.shape[2] == c and phkv == hkv
            and 0 < k <= m <= SELECT_MAX and rows < ALT_SLOT and slots.dtype == torch.int32)


LOGITS, GROUP_MAX, CHUNK_LSE, CHUNK_MAX = 0, 1, 2, 3   # SL_* output modes of shadow_logits_kernel


def shadow_logits(q, basis, shadows, cand, held, scale: float, mode: int = LOGITS, with_parts: bool = False):
    """Low-rank logits of the candidates' tokens -> (out, parts). out f32 by mode: LOGITS [Hkv, G, M], GROUP_MAX
    [Hkv, M], CHUNK_LSE / CHUNK_MAX [Hkv, G, K] (per candidate chunk, C <= 32); -inf where not held. parts f32
    [Hkv, B, G, 2] (per block max and sum of exp) or None. cand int64 [Hkv, K] chunk ids (-1: none), held int32
    [Hkv, K] part slots (-1: none) or None; rows may be strided."""
    hkv, kc = cand.shape
    hq, d = q.shape
    g = hq // hkv
    _, cap, c, r = shadows.shape
    m = kc * c
    q = q.contiguous()                                                          # q: [Hq, D]
    per = max(_SL_THREADS, math.ceil(m * hkv / (2 * _sm_count(q.device)) / _SL_THREADS) * _SL_THREADS)
    blocks = math.ceil(m / per)
    shape = {LOGITS: (hkv, g, m), GROUP_MAX: (hkv, m)}.get(mode, (hkv, g, kc))
    out = torch.empty(shape, dtype=torch.float32, device=q.device)
    parts = torch.empty((hkv, blocks, g, 2), dtype=torch.float32, device=q.device) if with_parts else None
    if m == 0:
        return out, parts
    name = f"shadow_logits_kernel<{_TAGS[q.dtype]}, {_TAGS[shadows.dtype]}, {g}, {r}>"
    fn = _build.function("tokens.cu", name, q.device.index)
    args = (_ptr(q), _ptr(basis), _ptr(shadows), np.int64(cap * c * r // _VEC[shadows.dtype]),
            _ptr(cand), np.int64(cand.stride(0)), _ptr(held), np.int64(0 if held is None else held.stride(0)),
            np.int32(m), np.int32(c.bit_length() - 1), np.int32(d), np.float32(scale), np.int32(per),
            np.int32(mode), _ptr(out), _ptr(parts))
    _launch(fn, q.device, (blocks, hkv), args, threads=_SL_THREADS)
    return out, parts


def chunk_reduce(x, cand, count, mass: bool, group_sum: bool):
    """The shadow index's chunk scores from shadow_logits' per-chunk x f32 [Hkv, G, m] -> f32 [Hkv, m]: softmax share
    among the candidates (mass) or x itself, reduced over the group (sum or max); -inf where cand >= count."""
    hkv, g, m = x.shape
    out = torch.empty((hkv, m), dtype=torch.float32, device=x.device)          # out: [Hkv, m]
    fn = _build.function("tokens.cu", f"chunk_reduce_kernel<{g}>", x.device.index)
    args = (_ptr(x), _ptr(cand), _ptr(count), np.int32(m), np.int32(mass), np.int32(group_sum), _ptr(out))
    _launch(fn, x.device, (hkv,), args, threads=_CR_THREADS)
    return out


def supports_shadow_logits(q, basis, shadows, cand, mode: int = LOGITS) -> bool:
    """The shapes shadow_logits takes (chunk modes: chunks of at most one warp)."""
    hkv = cand.shape[0]
    if not (q.is_cuda and shadows.is_cuda and basis.is_cuda and cand.is_cuda and q.dtype in _TAGS):
        return False
    _, _, c, r = shadows.shape
    return (shadows.dtype in _TAGS and shadows.is_contiguous() and shadows.shape[0] == hkv and c & (c - 1) == 0
            and r % _VEC[shadows.dtype] == 0 and r <= 128 and basis.dtype == torch.float32 and basis.is_contiguous()
            and tuple(basis.shape) == (hkv, q.shape[1], r) and q.shape[0] % hkv == 0 and 1 <= q.shape[0] // hkv <= 8
            and cand.dtype == torch.int64 and cand.stride(1) == 1 and (mode in (LOGITS, GROUP_MAX) or c <= 32))


def token_select(logits, parts, base_lse, cand, held, c: int, k: int, rows: bool, rows_out=None, total: bool = False):
    """Top-k candidate tokens per KV head -> (idx int64, rank f32, ok bool, pool row int32 or None), each
    [Hkv, k] in position order (with total, also select_top's int64 [Hkv] mass total). logits/parts:
    shadow_logits' (parts None: logits are the group max ranks). rows_out: int64 [1] that the held picks are
    counted into, or None."""
    base = None if base_lse is None else base_lse.float().contiguous()        # base: [Hq]
    return select_top(logits, cand.shape[1] * c, k, parts=parts, base_lse=base, cand=cand, held=held, c=c,
                      rows=rows, rows_out=rows_out, total=total)


def mass_keep(val, ok, row, total, g: int, mass: float, floor: int, rows_out=None) -> None:
    """The token mass threshold over select_top's picks, in place (reference.mass_keep): the held picks after the
    fewest best whose shares with the base reach `mass` (at least `floor`) get ok false and row -1. val f32, ok
    bool, row int32 or None: [Hkv, k], k <= MASS_MAX; total int64 [Hkv] (select_top's); rows_out int64 [1] += the
    kept held picks."""
    hkv, k = val.shape
    if not 0 < k <= MASS_MAX:
        raise ValueError(f"mass_keep takes 0 < k <= {MASS_MAX} picks per head, not {k}")
    fn = _build.function("mass.cu", "mass_keep_kernel", val.device.index)
    _launch(fn, val.device, (hkv,), (_ptr(val), _ptr(total), np.int32(k), np.int32(g), np.int64(mass_need(mass, g)),
                                     np.int32(min(floor, k)), _ptr(ok), _ptr(row), _ptr(rows_out)),
            threads=_MK_THREADS)


def supports_select_rows(scores, count, k: int) -> bool:
    return (scores.is_cuda and scores.dtype == torch.float32 and scores.dim() == 2 and scores.is_contiguous()
            and count.is_cuda and count.dtype == torch.int64 and 0 < k <= scores.shape[1] <= SELECT_MAX)


def select_rows(scores, count, k: int):
    """Top-k row ids per head of scores f32 [Hkv, N] among the first `count` (int64 [1] on the device) -> int64
    [Hkv, k] in row order (not best first; ties: lower row): topk_rows without its sort."""
    return select_top(scores, scores.shape[1], k, count=count)[0]


def ranked_select(q, basis, shadows, cand, held, k: int, index_scale: float, group_reduce: str,
                  base_lse=None, c: int | None = None, rows: bool = False, rows_out=None, total: bool = False):
    """Four launches: shadow logits, then the top-k per KV head (token_select's outputs; total: "sum" only)."""
    c = shadows.shape[2] if c is None else c
    max_out = group_reduce == "max"
    logits, parts = shadow_logits(q, basis, shadows, cand, held, index_scale, GROUP_MAX if max_out else LOGITS,
                                  not max_out)
    return token_select(logits, parts, base_lse if not max_out else None, cand, held, c, k, rows, rows_out, total)


def ranked_token_attend(q, pool, slots, alt, cand, basis, shadows, k: int, index_scale: float, scale: float,
                        group_reduce: str, base_lse=None, rows_out=None, mass: float = 0.0, floor: int = 0):
    """Attention of q over the top-k candidate tokens per KV head ranked from their shadows, read from pool (alt:
    ALT_SLOT-flagged slots) -> (o [Hq, D], lse [Hq]) f32: five launches, no host sync. mass > 0 ("sum" only, k <=
    MASS_MAX): k is a cap, each head attends the fewest best picks reaching that mass, at least `floor` (a sixth)."""
    _, _, hkv, c, d = pool.shape
    if mass > 0:
        _, val, ok, row, total = ranked_select(q, basis, shadows, cand, slots, k, index_scale, group_reduce, base_lse,
                                               c, True, None, True)
        mass_keep(val, ok, row, total, q.shape[0] // hkv, mass, floor, rows_out)
    else:
        _, _, _, row = ranked_select(q, basis, shadows, cand, slots, k, index_scale, group_reduce, base_lse, c, True,
                                     rows_out)
    half = hkv * c * d * pool.element_size()                                   # bytes from a slot's K to its V
    alt_ptrs = (0, 0) if alt is None or alt.shape[0] == 0 else (alt.data_ptr(), alt.data_ptr() + half)
    # a picked token is a chunk of one row: row(j) = base + row[h, j] * D + h * C * D (elements)
    return _attend(q.contiguous(), pool.data_ptr(), pool.data_ptr() + half, row, (d, c * d, d), 0, k, k,
                   hkv, d, pool.dtype, scale, None, None, alt=alt_ptrs)
