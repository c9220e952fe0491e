"""CuPy launchers: torch tensors in, torch tensors out, kernels launched on torch's current stream.

Pointers go to the kernels as raw integers (CuPy has no bfloat16 and needs no array objects); a pinned
host tensor's pointer is valid on the device under UVA, so a host pool is read in place over PCIe.
`supports_*` say which inputs the kernels cover; everything else goes to the torch reference.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import cupy
import numpy as np
import torch

from . import _build

SMEM_DEFAULT = 48 * 1024   # dynamic shared memory a launch gets without raising the function's limit
_smem_raised: dict[int, int] = {}


def allow_smem(fn, nbytes: int) -> bool:
    """Raise fn's dynamic shared memory limit to nbytes (once per size); False when CuPy offers no way to."""
    if nbytes <= SMEM_DEFAULT or _smem_raised.get(id(fn), 0) >= nbytes:
        return True
    try:
        with warnings.catch_warnings():   # some CuPy versions deprecate the RawKernel attribute
            warnings.simplefilter("ignore")
            fn.max_dynamic_shared_size_bytes = nbytes
    except AttributeError:
        return False
    _smem_raised[id(fn)] = nbytes
    return True


_TAGS = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_IDX = {torch.int32: "int", torch.int64: "long long"}
_THREADS = 128             # ATT_THREADS / SC_THREADS in the .cu files
_MAX_SPLITS = 128          # ATT_MAX_SPLITS
_MAX_GROUP = 8
_DENSE_CHUNK_SHIFT = 6     # dense attention walks its keys in runs of 64 tokens



@dataclass(frozen=True)
class LaunchOptions:
    """Debug and tuning options of every launch (defaults: none). poison: fill outputs and scratch with NaN
    first, so an element a kernel forgets to write shows; attend_defines: -D tuning options of attend.cu
    (e.g. "-DATT_U_SMALL=8"), each set compiled apart."""
    poison: bool = False
    attend_defines: tuple[str, ...] = ()


_options = LaunchOptions()


@contextmanager
def launch_options(**kw):
    """Run launches under LaunchOptions(**kw) (tests poison outputs, benchmarks compare compile variants)."""
    global _options
    saved, _options = _options, LaunchOptions(**kw)
    try:
        yield
    finally:
        _options = saved

_VEC = {torch.bfloat16: 8, torch.float16: 8, torch.float32: 4}  # elements per 16-byte load
_TICKET_RING = 1 << 16     # per-device ring of split tickets; a call takes Hkv consecutive entries

_streams: dict[tuple[int, int], object] = {}
_sm_counts: dict[int, int] = {}
_tickets: dict[int, list] = {}   # device index -> [int32 ring buffer, next free offset]


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _empty(shape, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=torch.float32, device=device)
    return out.fill_(float("nan")) if _options.poison else out


def _sm_count(device: torch.device) -> int:
    n = _sm_counts.get(device.index)
    if n is None:
        n = _sm_counts[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


def _launch(fn, device: torch.device, grid, args, shared_mem: int = 0, threads: int = _THREADS) -> None:
    """Launch on torch's current stream of `device` (captured too, inside torch.cuda.graph)."""
    stream = torch.cuda.current_stream(device)
    key = (device.index, stream.cuda_stream)
    cp_stream = _streams.get(key)
    if cp_stream is None:
        cp_stream = _streams[key] = _cupy_stream(stream, device.index)
    if device.index == torch.cuda.current_device():
        with cp_stream:
            fn(grid, (threads,), args, shared_mem=shared_mem)
    else:
        with cupy.cuda.Device(device.index), cp_stream:
            fn(grid, (threads,), args, shared_mem=shared_mem)


def _cupy_stream(stream: torch.cuda.Stream, device_index: int):
    """CuPy's view of a torch stream (CuPy 14 reads the __cuda_stream__ protocol; older ones need the pointer)."""
    if hasattr(cupy.cuda.Stream, "from_external") and hasattr(stream, "__cuda_stream__"):
        return cupy.cuda.Stream.from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, device_index)


def _tickets_for(device: torch.device, hkv: int) -> int:
    """Pointer to Hkv zeroed tickets. The kernel re-zeroes them; rotating through a ring keeps calls that
    run concurrently on different streams apart. Call once before CUDA-graph capture so the ring is not
    allocated from a graph's private pool."""
    ring = _tickets.get(device.index)
    if ring is None:
        ring = _tickets[device.index] = [torch.zeros(_TICKET_RING, dtype=torch.int32, device=device), 0]
    off = ring[1] if ring[1] + hkv <= _TICKET_RING else 0
    ring[1] = off + hkv
    return ring[0].data_ptr() + 4 * off


def _rows_ok(t: torch.Tensor, head_dim: int) -> bool:
    """16-byte loads need: rows contiguous, aligned base, every stride a whole number of vectors."""
    vec = _VEC[t.dtype]
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s % vec == 0 for s in t.stride()[:-1]) and head_dim % vec == 0)


def _group_ok(hq: int, hkv: int, head_dim: int) -> bool:
    return hkv > 0 and hq % hkv == 0 and 1 <= hq // hkv <= _MAX_GROUP and head_dim in (64, 128)


def supports_gather(q: torch.Tensor, pool: torch.Tensor) -> bool:
    _, _, hkv, c, d = pool.shape
    return (q.dtype in _TAGS and pool.dtype in _TAGS and q.shape[-1] == d and _group_ok(q.shape[0], hkv, d)
            and c > 0 and c & (c - 1) == 0 and pool.is_contiguous() and _rows_ok(pool, d))


def supports_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_valid=None) -> bool:
    d = k.shape[-1]
    ok_count = n_valid is None or (n_valid.dtype == torch.int64 and n_valid.is_cuda and n_valid.numel() == 1)
    return ok_count and (q.dtype in _TAGS and k.dtype in _TAGS and v.dtype == k.dtype and v.shape == k.shape
            and q.shape[-1] == d and _group_ok(q.shape[0], k.shape[0], d))


def supports_merge(o1, lse1, o2, lse2) -> bool:
    return (all(t.dtype == torch.float32 for t in (o1, lse1, o2, lse2))
            and o1.shape == o2.shape and lse1.shape == lse2.shape == o1.shape[:-1])


def supports_score(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, group_reduce: str) -> bool:
    d = kmin.shape[-1]
    return (group_reduce in ("max", "sum") and q.dtype in _TAGS and kmin.dtype in _TAGS
            and kmax.dtype == kmin.dtype and kmax.shape == kmin.shape and kmax.stride() == kmin.stride()
            and q.shape[-1] == d and _group_ok(q.shape[0], kmin.shape[0], d)
            and _rows_ok(kmin, d) and _rows_ok(kmax, d))


def _splits(n_chunks: int, chunk_tokens: int, hkv: int, device, num_splits: int | None) -> tuple[int, int]:
    """(chunks_per_split, n_splits): about two blocks per SM, at least 64 tokens per block."""
    if num_splits is None:
        target = max(1, math.ceil(2 * _sm_count(device) / hkv))
        per = max(math.ceil(n_chunks / target), math.ceil(64 / chunk_tokens))
    else:
        per = math.ceil(n_chunks / max(1, num_splits))
    per = max(per, math.ceil(n_chunks / _MAX_SPLITS), 1)
    per = min(per, max(2048, math.ceil(n_chunks / _MAX_SPLITS)))   # slot list (4 B each) fits shared memory
    return per, math.ceil(n_chunks / per)


def _attend(q, k_base, v_base, slots, strides, c_shift, n_chunks, n_tokens, hkv, d, dtype, scale,
            out, num_splits, n_valid=None, alt=(0, 0)):
    """Common launch of attend_kernel. strides: (slot, head, row) in elements."""
    device = q.device
    hq = q.shape[0]
    group = hq // hkv
    o, lse = out if out is not None else (_empty((hq, d), device), _empty((hq,), device))
    if n_chunks == 0:
        o.zero_()
        lse.fill_(float("-inf"))
        return o, lse
    per, n_splits = _splits(n_chunks, 1 << c_shift, hkv, device, num_splits)
    n_part = hkv * n_splits * group                                    # partial rows: [Hkv, P, G]
    scratch = _empty((n_part * (d + 1),), device) if n_splits > 1 else o  # scratch: [Hkv*P*G*D + Hkv*P*G]
    part_lse = scratch.data_ptr() + 4 * n_part * d
    idx = "int" if slots is None else _IDX[slots.dtype]
    name = f"attend_kernel<{_TAGS[q.dtype]}, {_TAGS[dtype]}, {d}, {group}, {idx}>"
    fn = _build.function("attend.cu", name, device.index, _options.attend_defines)
    vec = _VEC[dtype]
    args = (_ptr(q), np.uint64(k_base), np.uint64(v_base), _ptr(slots),
            np.int64(strides[0] // vec), np.int64(strides[1] // vec), np.int64(strides[2] // vec),
            np.int32(c_shift), np.int32(n_chunks), np.int64(n_tokens), np.int32(per), np.int32(n_splits),
            np.float32(scale), _ptr(scratch), np.uint64(part_lse), np.uint64(_tickets_for(device, hkv)),
            _ptr(o), _ptr(lse), _ptr(n_valid), np.uint64(alt[0]), np.uint64(alt[1]))
    _launch(fn, device, (n_splits, hkv), args, shared_mem=4 * per)
    return o, lse


def gather_attend(q, pool, slots, scale, alt_pool=None, *, out=None, num_splits=None):
    """CuPy gather-attend; `out` (o, lse) and `num_splits` exist for tests and benchmarks. Slots flagged
    with ALT_SLOT read `alt_pool` (same chunk layout), so a GPU pool and a host slab take one launch."""
    _, _, hkv, c, d = pool.shape
    q = q.contiguous()                                                 # q: [Hq, D]
    if slots.device != q.device or slots.dtype not in _IDX or not slots.is_contiguous():
        slots = slots.to(q.device, torch.long, non_blocking=True).contiguous()  # slots: [Hkv, K]
    half = hkv * c * d * pool.element_size()                           # bytes from a slot's K to its V
    alt = (0, 0) if alt_pool is None else (alt_pool.data_ptr(), alt_pool.data_ptr() + half)
    return _attend(q, pool.data_ptr(), pool.data_ptr() + half, slots,
                   (2 * hkv * c * d, c * d, d), c.bit_length() - 1, slots.shape[1], slots.shape[1] * c,
                   hkv, d, pool.dtype, scale, out, num_splits, alt=alt)


def dense_attend(q, k, v, scale, n_valid=None, *, out=None, num_splits=None):
    """CuPy attention over the keys of k, v: [Hkv, N, D] (strided views are fine when aligned); only the
    first n_valid (int64 [1] on the device, read when the kernel runs) when given."""
    hkv, n, d = k.shape
    if not (k.stride() == v.stride() and _rows_ok(k, d) and _rows_ok(v, d)):
        k, v = k.contiguous(), v.contiguous()                          # k, v: [Hkv, N, D]
    q = q.contiguous()                                                 # q: [Hq, D]
    row = k.stride(1)
    n_chunks = -(-n >> _DENSE_CHUNK_SHIFT)
    return _attend(q, k.data_ptr(), v.data_ptr(), None, (row << _DENSE_CHUNK_SHIFT, k.stride(0), row),
                   _DENSE_CHUNK_SHIFT, n_chunks, n, hkv, d, k.dtype, scale, out, num_splits, n_valid)


def merge_attn(o1, lse1, o2, lse2, *, out=None):
    """One-launch log-sum-exp merge of float32 partials: o [..., D], lse [...]."""
    o1, lse1, o2, lse2 = (t.contiguous() for t in (o1, lse1, o2, lse2))
    d = o1.shape[-1]
    o, lse = out if out is not None else (_empty(o1.shape, o1.device), _empty(lse1.shape, o1.device))
    total = o1.numel()
    if total == 0:
        return o, lse
    fn = _build.function("merge.cu", "merge_attn_kernel", o1.device.index)
    args = (_ptr(o1), _ptr(lse1), _ptr(o2), _ptr(lse2), _ptr(o), _ptr(lse), np.int64(lse1.numel()), np.int32(d))
    _launch(fn, o1.device, (math.ceil(total / _THREADS),), args)
    return o, lse


def chunk_bounds(q, kmin, kmax, n_valid, group_reduce="max", *, out=None):
    """CuPy Quest bounds -> [Hkv, n_valid] float32."""
    hkv, _, d = kmin.shape
    q = q.contiguous()                                                 # q: [Hq, D]
    bounds = out if out is not None else _empty((hkv, n_valid), q.device)  # bounds: [Hkv, n_valid]
    if n_valid == 0:
        return bounds
    group = q.shape[0] // hkv
    vec = _VEC[kmin.dtype]
    rows_per_step = 4 * (32 // (d // vec)) * (4 if group <= 4 else 2)  # SC_WARPS * RPW * U
    want = math.ceil(hkv * n_valid / (4 * _sm_count(q.device)))        # ~4 blocks per SM
    rows_per_block = max(rows_per_step, math.ceil(want / rows_per_step) * rows_per_step)
    sum_flag = "true" if group_reduce == "sum" else "false"
    name = f"chunk_bounds_kernel<{_TAGS[q.dtype]}, {_TAGS[kmin.dtype]}, {d}, {group}, {sum_flag}>"
    fn = _build.function("score.cu", name, q.device.index)
    args = (_ptr(q), _ptr(kmin), _ptr(kmax), np.int64(kmin.stride(0) // vec), np.int64(kmin.stride(1) // vec),
            np.int32(n_valid), np.int32(rows_per_block), _ptr(bounds))
    _launch(fn, q.device, (math.ceil(n_valid / rows_per_block), hkv), args)
    return bounds


_PLAN_THREADS = 256   # PLAN_THREADS in plan.cu


def supports_plan(ids, streaming, count, tier, slot, attended, candidates, chunk_hits) -> bool:
    return (ids.dtype == torch.int64 and ids.dim() == 2 and ids.is_contiguous() and count.dtype == torch.int64
            and streaming.dtype == torch.bool and streaming.is_contiguous() and tier.dtype == torch.int8
            and slot.dtype == torch.int64 and attended.dtype == candidates.dtype == torch.int64
            and attended.numel() >= 4 and candidates.numel() >= 4 and chunk_hits.dtype == torch.float32
            and all(t.is_contiguous() for t in (tier, slot, attended, candidates, chunk_hits)))


def plan_slots(sel, table, merged=False, with_ids=False):
    """One launch: the SlotLists [Hkv, F + M] of a layer's decode step (see plan.cu)."""
    from .reference import SlotLists
    ids = sel.ids
    hkv, m = ids.shape
    k = sel.n_sink + sel.n_window + m
    gpu_out = torch.empty((hkv, k), dtype=torch.int32, device=ids.device)   # gpu_out: [Hkv, K]
    host_out = gpu_out if merged else torch.empty_like(gpu_out)             # host_out: [Hkv, K]
    ids_out = torch.empty((hkv, k), dtype=torch.int64, device=ids.device) if with_ids else None  # [Hkv, K]
    # the selection columns count apart only when they are token-stage candidates
    sel_hits = table.candidates if sel.token_k else table.attended
    fn = _build.function("plan.cu", "plan_slots_kernel", ids.device.index)
    args = (_ptr(ids), np.int32(m), _ptr(table.count), np.int32(sel.n_sink), np.int32(sel.n_window),
            np.int32(sel.take), _ptr(sel.streaming), _ptr(table.tier), _ptr(table.slot), _ptr(table.attended),
            _ptr(sel_hits), _ptr(table.chunk_hits), _ptr(gpu_out), _ptr(host_out), _ptr(ids_out), np.int32(merged))
    _launch(fn, ids.device, (hkv,), args, threads=_PLAN_THREADS)
    return SlotLists(gpu_out, None if merged else host_out, ids_out)


_TOPK_THREADS, _TOPK_MAX_K = 1024, 4096   # TK_THREADS / TK_MAX_K in topk.cu


def supports_topk(scores, count, k, ids=None) -> bool:
    return (scores.dtype == torch.float32 and scores.dim() == 2 and scores.is_contiguous()
            and count.dtype == torch.int64 and count.is_cuda and 1 <= k <= min(_TOPK_MAX_K, scores.shape[1])
            and (ids is None or (ids.is_cuda and ids.dtype == torch.int64 and ids.shape == scores.shape
                                 and ids.is_contiguous())))


def topk_rows(scores, count, k, ids=None):
    """One launch: top-k row ids per head among the first `count` rows, best first -> int64 [Hkv, k] (with ids
    [Hkv, N]: ids[h, row] instead of the row)."""
    hkv, n = scores.shape
    out = torch.empty((hkv, k), dtype=torch.int64, device=scores.device)       # out: [Hkv, k]
    fn = _build.function("topk.cu", "topk_rows_kernel", scores.device.index)
    args = (_ptr(scores), np.int64(n), _ptr(count), np.int32(k), _ptr(out), _ptr(ids))
    _launch(fn, scores.device, (hkv,), args, threads=_TOPK_THREADS)
    return out


_ROW_THREADS = 256


def supports_rows(pool, alt_pool=None) -> bool:
    _, _, hkv, c, d = pool.shape
    row_bytes = d * pool.element_size()
    ok = (pool.is_contiguous() and pool.data_ptr() % 16 == 0 and row_bytes % 16 == 0
          and c > 0 and c & (c - 1) == 0)
    return ok and (alt_pool is None or (alt_pool.shape[1:] == pool.shape[1:] and alt_pool.dtype == pool.dtype
                                        and alt_pool.is_contiguous() and alt_pool.data_ptr() % 16 == 0))


def gather_rows(pool, slots, which, rows=None, alt_pool=None):
    """One launch: K or V rows of chunk slots (see gather.cu) -> [Hkv, R, D] in pool's dtype, on slots' device."""
    _, _, hkv, c, d = pool.shape
    device = slots.device
    slots = slots.to(torch.int32).contiguous()                                 # slots: [Hkv, K]
    n_rows = slots.shape[1] * c if rows is None else rows.shape[1]
    if rows is not None:
        rows = rows.to(device, torch.int64).contiguous()                       # rows: [Hkv, R]
    out = torch.empty((hkv, n_rows, d), dtype=pool.dtype, device=device)       # out: [Hkv, R, D]
    if _options.poison:
        out.view(torch.uint8).fill_(0xFF)
    vecs = d * pool.element_size() // 16
    if n_rows == 0:
        return out
    fn = _build.function("gather.cu", "gather_rows_kernel", device.index)
    alt = None if alt_pool is None or alt_pool.shape[0] == 0 else alt_pool
    args = (_ptr(pool if pool.shape[0] else None), _ptr(alt), _ptr(slots), np.int32(slots.shape[1]), _ptr(rows),
            np.int32(n_rows), np.int32(hkv), np.int32(c.bit_length() - 1), np.int32(vecs), np.int32(which), _ptr(out))
    _launch(fn, device, (math.ceil(n_rows * vecs / _ROW_THREADS), hkv), args, threads=_ROW_THREADS)
    return out
