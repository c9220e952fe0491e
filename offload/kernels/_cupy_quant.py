"""CuPy launchers of quant.cu: attention and row gathers over raw and packed (int8/int4) chunk pools.

Imported lazily by `quant` on the first CUDA call. Pools are passed as raw pointers; a pinned host slab's
pointer is valid on the device (UVA), so packed host chunks are read in place and cross PCIe compressed.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _build
from ._cupy import _IDX, _TAGS, _empty, _launch, _ptr, _sm_count, _tickets_for
from .quant import PackedFormat, is_packed

_THREADS = 128             # QA_THREADS
_WARPS = 4
_MAX_SPLITS = 128          # QA_MAX_SPLITS
_MAX_GROUP = 8
_ROW_THREADS = 256

# benchmarks set -D tuning options of quant.cu here (e.g. "-DQA_U_SMALL=8")
quant_defines: tuple[str, ...] = ()


def _raw_ok(pool: torch.Tensor, hkv: int, c: int, d: int) -> bool:
    return (pool.dtype in _TAGS and pool.dim() == 5 and tuple(pool.shape[1:]) == (2, hkv, c, d)
            and pool.is_contiguous() and pool.data_ptr() % 16 == 0)


def _pools_ok(pool, alt_pool, fmt: PackedFormat | None) -> tuple[bool, torch.dtype]:
    """Both pools readable by the kernel in `fmt`'s geometry; the raw dtype they share."""
    if fmt is None or not fmt.compressed or fmt.head_dim not in (64, 128) or fmt.chunk_tokens & (fmt.chunk_tokens - 1):
        return False, None
    hkv, c, d = fmt.num_kv_heads, fmt.chunk_tokens, fmt.head_dim
    raw_dtype = None
    for p in (pool, alt_pool):
        if p is None:
            continue
        if is_packed(p):
            if p.shape[1] != fmt.chunk_bytes or not p.is_contiguous() or p.data_ptr() % 16:
                return False, None
        elif not _raw_ok(p, hkv, c, d) or (raw_dtype is not None and p.dtype != raw_dtype):
            return False, None
        else:
            raw_dtype = p.dtype
    return True, raw_dtype or torch.bfloat16


def supports_attend_q(q: torch.Tensor, pool, alt_pool, fmt) -> bool:
    ok, _ = _pools_ok(pool, alt_pool, fmt)
    hkv = fmt.num_kv_heads if fmt is not None else 0
    return (ok and q.dtype in _TAGS and q.dim() == 2 and q.shape[1] == fmt.head_dim and hkv > 0
            and q.shape[0] % hkv == 0 and 1 <= q.shape[0] // hkv <= _MAX_GROUP)


def supports_rows_q(pool, alt_pool, fmt, dtype) -> bool:
    ok, _ = _pools_ok(pool, alt_pool, fmt)
    return ok and dtype in _TAGS


def _splits(n_chunks: int, hkv: int, device, num_splits: int | None) -> tuple[int, int]:
    """(chunks_per_split, n_splits): about two blocks per SM, at least one chunk per warp."""
    if num_splits is None:
        target = max(1, math.ceil(2 * _sm_count(device) / hkv))
        per = max(math.ceil(n_chunks / target), _WARPS)
    else:
        per = math.ceil(n_chunks / max(1, num_splits))
    per = max(per, math.ceil(n_chunks / _MAX_SPLITS), 1)
    return per, math.ceil(n_chunks / per)


def _pool_args(pool):
    return (_ptr(None), np.int32(0)) if pool is None or pool.shape[0] == 0 else (_ptr(pool), np.int32(is_packed(pool)))


def gather_attend_q(q, pool, slots, scale, fmt: PackedFormat, alt_pool=None, *, out=None, num_splits=None):
    """One launch over both pools (raw or packed); `out` (o, lse) and `num_splits` exist for tests/benchmarks."""
    _, raw_dtype = _pools_ok(pool, alt_pool, fmt)
    hkv, c, d = fmt.num_kv_heads, fmt.chunk_tokens, fmt.head_dim
    device = q.device
    q = q.contiguous()                                                 # q: [Hq, D]
    if slots.device != device or slots.dtype not in _IDX or not slots.is_contiguous():
        slots = slots.to(device, torch.long, non_blocking=True).contiguous()  # slots: [Hkv, K]
    hq = q.shape[0]
    group = hq // hkv
    o, lse = out if out is not None else (_empty((hq, d), device), _empty((hq,), device))
    n_chunks = slots.shape[1]
    if n_chunks == 0:
        o.zero_()
        lse.fill_(float("-inf"))
        return o, lse
    per, n_splits = _splits(n_chunks, hkv, device, num_splits)
    n_part = hkv * n_splits * group
    scratch = _empty((n_part * (d + 1),), device) if n_splits > 1 else o  # scratch: [Hkv*P*G*D + Hkv*P*G]
    name = (f"attend_q_kernel<{_TAGS[q.dtype]}, {_TAGS[raw_dtype]}, {d}, {group}, {fmt.bits}, "
            f"{_IDX[slots.dtype]}>")
    fn = _build.function("quant.cu", name, device.index, quant_defines)
    (pa, a_packed), (pb, b_packed) = _pool_args(pool), _pool_args(alt_pool)
    args = (_ptr(q), pa, pb, a_packed, b_packed, _ptr(slots), np.int32(n_chunks), np.int32(per), np.int32(n_splits),
            np.int32(hkv),
            np.int32(c.bit_length() - 1), np.int32(fmt.key_group.bit_length() - 1), np.int32(fmt.key_part_bytes),
            np.int32(fmt.value_part_bytes), np.float32(scale), _ptr(scratch),
            np.uint64(scratch.data_ptr() + 4 * n_part * d),
            np.uint64(_tickets_for(device, hkv)), _ptr(o), _ptr(lse))
    _launch(fn, device, (n_splits, hkv), args, shared_mem=4 * per, threads=_THREADS)
    return o, lse


def gather_rows_q(pool, slots, which, rows, alt_pool, fmt: PackedFormat, dtype):
    """One launch: K or V rows of both pools (raw or packed) -> [Hkv, R, D] in dtype, on slots' device."""
    _, raw_dtype = _pools_ok(pool, alt_pool, fmt)
    hkv, c, d = fmt.num_kv_heads, fmt.chunk_tokens, fmt.head_dim
    device = slots.device
    slots = slots.to(torch.int32).contiguous()                         # slots: [Hkv, K]
    if rows is not None:
        rows = rows.to(device, torch.long).contiguous()                # rows: [Hkv, R]
    n_rows = slots.shape[1] * c if rows is None else rows.shape[1]
    out = torch.empty((hkv, n_rows, d), dtype=dtype, device=device)   # out: [Hkv, R, D]
    if n_rows == 0:
        return out
    name = f"gather_rows_q_kernel<{_TAGS[raw_dtype]}, {_TAGS[dtype]}, {d}, {fmt.bits}>"
    fn = _build.function("quant.cu", name, device.index, quant_defines)
    (pa, a_packed), (pb, b_packed) = _pool_args(pool), _pool_args(alt_pool)
    args = (pa, pb, a_packed, b_packed, _ptr(slots), np.int32(slots.shape[1]), _ptr(rows), np.int32(n_rows),
            np.int32(hkv), np.int32(c.bit_length() - 1), np.int32(fmt.key_group.bit_length() - 1),
            np.int32(fmt.key_part_bytes), np.int32(fmt.value_part_bytes), np.int32(which), _ptr(out))
    _launch(fn, device, (math.ceil(n_rows * (d // 8) / _ROW_THREADS), hkv), args, threads=_ROW_THREADS)
    return out
