"""CuPy launcher of select.cu: the top k of M keys per KV head over many blocks per head (three launches), in
position order, ties to the lower position. Used by the token stage (ranks from shadow logits) and the shadow
index's coarse candidates (plain score rows); the torch reference is a stable descending sort
(reference.select_top)."""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _build
from ._cupy import _launch, _ptr

_SEL_THREADS, _SEL_SLICE, _SEL_MAX_SLICES, _ST_THREADS = 256, 1024, 64, 1024   # the #defines of select.cu
SELECT_MAX = _SEL_SLICE * _SEL_MAX_SLICES   # most keys per head (the threshold kernel counts per slice in shared memory)
THRESHOLD_DEFINES: tuple[str, ...] = ()   # -D options of the threshold kernel (tests shrink ST_BUCKET to reach its
                                          # other path, where the 16-bit bucket's keys are read where they lie)


def select_top(scores, m: int, k: int, *, parts=None, base_lse=None, cand=None, held=None, c: int = 1,
               rows: bool = False, rows_out=None, count=None, total: bool = False):
    """Top k of m keys per KV head -> (idx int64, rank f32, ok bool, pool row int32 or None), each [Hkv, k] in
    position order; with total, also int64 [Hkv]: mass_fixed of the held candidates' ranks summed (the token mass
    threshold's base, reference.mass_keep).

    Ranked tokens (cand int64 [Hkv, K] chunk ids, held int32 [Hkv, K] part slots or None, m = K * c): scores are
    shadow_logits' [Hkv, G, m] logits with parts [Hkv, B, G, 2] (the group's summed softmax shares, normalised with
    base_lse f32 [Hq] or None), or [Hkv, m] group-max ranks (parts None); a pick is ok where its chunk is held.
    Plain rows (cand None): scores f32 [Hkv, m], only the first `count` (int64 [1] on the device) are candidates.
    rows: also each pick's pool row (ranked tokens only); rows_out: int64 [1] += the ok picks."""
    hkv = scores.shape[0]
    g = 1 if parts is None else scores.shape[1]
    dev = scores.device
    nb = math.ceil(m / _SEL_SLICE)
    if not 0 < k <= m <= SELECT_MAX:
        raise ValueError(f"select_top takes 0 < k <= m <= {SELECT_MAX}, not k={k}, m={m}")
    idx = torch.empty((hkv, k), dtype=torch.int64, device=dev)                 # idx: [Hkv, k]
    val = torch.empty((hkv, k), dtype=torch.float32, device=dev)               # val: [Hkv, k]
    ok = torch.empty((hkv, k), dtype=torch.bool, device=dev)                   # ok: [Hkv, k]
    row = torch.empty((hkv, k), dtype=torch.int32, device=dev) if rows else None   # row: [Hkv, k]
    keys = torch.empty((hkv, m), dtype=torch.int32, device=dev)                # keys: [Hkv, m] (uint32 bits)
    hist = torch.empty((hkv, nb, 256), dtype=torch.int32, device=dev)          # hist: [Hkv, nb, 256]
    zeroed = torch.zeros((hkv << 16) + 2 * hkv, dtype=torch.int32, device=dev)   # one fill for both atomics' outputs
    hist16 = zeroed[:hkv << 16].view(hkv, 1 << 16)                             # hist16: [Hkv, 65536]
    mass_total = zeroed[hkv << 16:].view(torch.int64) if total else None       # mass_total: [Hkv]
    thresh = torch.empty((hkv, 2), dtype=torch.int32, device=dev)              # thresh: [Hkv, 2]
    offsets = torch.empty((hkv, nb, 2), dtype=torch.int32, device=dev)         # offsets: [Hkv, nb, 2]
    c_shift = np.int32(c.bit_length() - 1)
    cand_args = (_ptr(cand), np.int64(0 if cand is None else cand.stride(0)),
                 _ptr(held), np.int64(0 if held is None else held.stride(0)))
    rank = _build.function("select.cu", f"select_rank_kernel<{g}, {'true' if total else 'false'}>", dev.index)
    _launch(rank, dev, (nb, hkv), (_ptr(scores), _ptr(parts), np.int32(0 if parts is None else parts.shape[1]),
                                   _ptr(base_lse), *cand_args, _ptr(count), np.int32(m), c_shift, _ptr(keys),
                                   _ptr(hist), _ptr(hist16), _ptr(mass_total)), threads=_SEL_THREADS)
    threshold = _build.function("select.cu", "select_threshold_kernel", dev.index, THRESHOLD_DEFINES)
    _launch(threshold, dev, (hkv,), (_ptr(keys), _ptr(hist), _ptr(hist16), np.int32(m), np.int32(nb), np.int32(k),
                                     _ptr(thresh), _ptr(offsets)), threads=_ST_THREADS)
    compact = _build.function("select.cu", "select_compact_kernel", dev.index)
    _launch(compact, dev, (nb, hkv), (_ptr(keys), _ptr(thresh), _ptr(offsets), *cand_args, _ptr(count), np.int32(m),
                                      c_shift, np.int32(k), np.int32(hkv), _ptr(idx), _ptr(val), _ptr(ok), _ptr(row),
                                      _ptr(rows_out)), threads=_SEL_THREADS)
    return (idx, val, ok, row, mass_total) if total else (idx, val, ok, row)
