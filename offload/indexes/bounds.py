"""Min/max key bounds of one index tier: int8 rounding outward, and growable stores of native or int8 rows.

int8 bounds are rounded outward (min down, max up) against a per-(head, chunk) scale, so after dequantisation
(in float32) they still bound every key of the chunk. A stored row (one chunk or coarse group, every KV head)
can be exported as raw bytes and appended back bit for bit (a prompt cache keeps an index without its keys).
"""
from __future__ import annotations

import math

import torch

from offload.indexes._common import ChunkBuffer

_INT8_LEVELS = 126.0   # one level of slack below 127 so that the outward fix-up step cannot overflow


def quantize_bounds(kmin: torch.Tensor, kmax: torch.Tensor):
    """kmin/kmax [Hkv, n, D] -> (qmin, qmax int8 [Hkv, n, D], scale f32 [Hkv, n]) with q*scale outside [kmin, kmax]."""
    lo, hi = kmin.float(), kmax.float()                                          # lo, hi: [Hkv, n, D]
    amax = torch.maximum(lo.abs().amax(dim=2), hi.abs().amax(dim=2))             # amax: [Hkv, n]
    scale = torch.where(amax > 0, amax / _INT8_LEVELS, torch.ones_like(amax))    # scale: [Hkv, n]
    s = scale[..., None]                                                         # s: [Hkv, n, 1]
    qmin = torch.floor(lo / s)                                                   # qmin: [Hkv, n, D]
    qmax = torch.ceil(hi / s)                                                    # qmax: [Hkv, n, D]
    # the division rounds; one more step where the float32 product lands on the wrong side
    qmin = torch.where(qmin * s > lo, qmin - 1, qmin)                            # qmin: [Hkv, n, D]
    qmax = torch.where(qmax * s < hi, qmax + 1, qmax)                            # qmax: [Hkv, n, D]
    return qmin.to(torch.int8), qmax.to(torch.int8), scale


def dequantize_bounds(qmin: torch.Tensor, qmax: torch.Tensor, scale: torch.Tensor):
    """int8 [Hkv, n, D] x f32 [Hkv, n] -> float32 kmin, kmax [Hkv, n, D]."""
    s = scale[..., None]                                                          # s: [Hkv, n, 1]
    return qmin.float() * s, qmax.float() * s


class BoundStore:
    """Min/max bounds of one tier, native dtype or int8, in growable buffers."""

    def __init__(self, hkv: int, d: int, device, dtype, int8: bool, capacity: int, pin: bool = False,
                 limit: int = 0):
        self.int8 = int8
        store_dtype = torch.int8 if int8 else dtype
        self.lo = ChunkBuffer(hkv, (d,), device, store_dtype, capacity, pin, limit)     # lo: [Hkv, cap, D]
        self.hi = ChunkBuffer(hkv, (d,), device, store_dtype, capacity, pin, limit)     # hi: [Hkv, cap, D]
        self.scale = ChunkBuffer(hkv, (), device, torch.float32, capacity if int8 else 0, pin, limit)

    @staticmethod
    def row_bytes(hkv: int, d: int, dtype: torch.dtype, int8: bool) -> int:
        """Bytes per stored row (one chunk or group, every KV head)."""
        return hkv * (2 * d + 4) if int8 else hkv * 2 * d * torch.empty((), dtype=dtype).element_size()

    def append(self, kmin: torch.Tensor, kmax: torch.Tensor) -> None:
        if self.int8:
            qmin, qmax, scale = quantize_bounds(kmin, kmax)
            self.lo.append(qmin), self.hi.append(qmax), self.scale.append(scale)
        else:
            self.lo.append(kmin), self.hi.append(kmax)

    def export_rows(self, first: int, count: int) -> torch.Tensor:
        """Stored rows first.. -> uint8 [count, row_bytes] on the CPU: every head's lo, then hi, then scale."""
        parts = [b.data[:, first:first + count].reshape(b.data.shape[0], count, -1)   # [Hkv, count, D or 1]
                 .transpose(0, 1).cpu().contiguous().view(torch.uint8).reshape(count, -1) for b in self._bufs()]
        return torch.cat(parts, dim=1)                                           # rows: [count, R] (a copy)

    def append_rows(self, rows: torch.Tensor) -> None:
        """Append rows uint8 [count, row_bytes] as export_rows wrote them, bit for bit."""
        count, at = rows.shape[0], 0
        for buf in self._bufs():
            hkv, tail = buf.data.shape[0], tuple(buf.data.shape[2:])             # tail: (D,) or () for scales
            width = hkv * math.prod(tail) * buf.data.element_size()
            piece = rows[:, at:at + width].contiguous().view(buf.data.dtype)     # piece: [count, Hkv*D or Hkv]
            buf.append(piece.reshape(count, hkv, *tail).transpose(0, 1))         # [Hkv, count, *tail]
            at += width

    def _bufs(self) -> list[ChunkBuffer]:
        return [self.lo, self.hi, self.scale] if self.int8 else [self.lo, self.hi]

    def bounds(self, ids: torch.Tensor | None = None, device: torch.device | None = None,
               allocated: bool = False):
        """Bounds of all stored rows, or of ids [Hkv, M] -> [Hkv, M, D] on `device` (float32 when int8).

        Rows are gathered where they are stored and dequantised after the copy, so an int8 tier moves
        1 byte per value. `allocated`: every allocated row, written or not (static shapes for graphs).
        """
        lo, hi = (self.lo.data, self.hi.data) if allocated else (self.lo.valid, self.hi.valid)  # [Hkv, n, D]
        scale = (self.scale.data if allocated else self.scale.valid) if self.int8 else None     # [Hkv, n]
        if ids is not None:
            heads = torch.arange(lo.shape[0], device=lo.device)[:, None]         # heads: [Hkv, 1]
            ids = ids.to(lo.device)                                              # ids: [Hkv, M]
            lo, hi = lo[heads, ids], hi[heads, ids]                              # lo, hi: [Hkv, M, D]
            scale = scale[heads, ids] if self.int8 else None                     # scale: [Hkv, M]
        if device is not None:
            lo, hi = lo.to(device, non_blocking=True), hi.to(device, non_blocking=True)
            scale = scale.to(device, non_blocking=True) if self.int8 else None
        return dequantize_bounds(lo, hi, scale) if self.int8 else (lo, hi)

    @property
    def size(self) -> int:
        return self.lo.size

    @property
    def nbytes(self) -> int:
        return self.lo.nbytes + self.hi.nbytes + self.scale.nbytes
