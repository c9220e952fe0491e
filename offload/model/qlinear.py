"""Weights that stay quantized on the device, and the linear layer that reads them.

A `QuantWeight` is a [out, in] matrix held as one or more row ranges ("parts"), each in one GGUF block
format (qformats.py): fused q|k|v of a Q4_K_M file is Q4_K rows followed by Q6_K rows. `linear(x, w)`:
    - one token on the GPU (decode): a CuPy dequantize-GEMV kernel per part reads the blocks once;
    - otherwise (prefill chunks, the CPU): the matrix is dequantized into a per-slot scratch of the
      compute dtype (one matrix per slot: wqkv, wo, gate_up, down, lm_head) and multiplied by torch, so a
      layer-by-layer prefill dequantizes each layer once, not once per chunk.
Rows are read through `w[idx]` (the embedding lookup): only those rows are dequantized.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from offload.model import qformats

# rows dequantized at a time into the scratch: bounds the float32 temporaries (~64 MiB at K=4096)
_DEQUANT_ROWS = 4096


class Part:
    """Rows [start, start + rows) of a QuantWeight in one block format: planes uint8 [rows, ...]."""

    def __init__(self, fmt: str, planes: dict[str, torch.Tensor]):
        self.fmt, self.planes = fmt, planes
        self.rows = next(iter(planes.values())).shape[0]

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        sl = slice(start, self.rows if stop is None else stop)
        return qformats.dequantize(self.fmt, {k: v[sl] for k, v in self.planes.items()})  # [n, K] float32

    @property
    def nbytes(self) -> int:
        return sum(p.numel() for p in self.planes.values())


class Scratch:
    """The dense copy of one matrix per slot, in the compute dtype; remembers whose copy it holds."""

    def __init__(self):
        self.buffers: dict[str, tuple[int, torch.Tensor]] = {}

    def dense(self, w: "QuantWeight", dtype: torch.dtype) -> torch.Tensor:
        owner, buf = self.buffers.get(w.slot, (None, None))
        if owner == id(w) and buf.dtype == dtype:
            return buf
        if buf is None or buf.shape != w.shape or buf.dtype != dtype or buf.device != w.device:
            self.buffers.pop(w.slot, None)
            buf = torch.empty(w.shape, dtype=dtype, device=w.device)  # buf: [out, in]
        w.dequantize_into(buf)
        self.buffers[w.slot] = (id(w), buf)
        return buf

    def clear(self) -> None:
        self.buffers.clear()


class QuantWeight:
    """A quantized [out, in] matrix. slot names its scratch buffer; scratch is shared by a model's weights."""

    def __init__(self, parts: list[Part], cols: int, slot: str = "w", scratch: Scratch | None = None,
                 dtype: torch.dtype = torch.float32):
        self.parts, self.cols, self.slot, self.scratch = parts, cols, slot, scratch
        self.dtype = dtype   # what row reads (w[idx]) return: the model's compute dtype
        self.shape = torch.Size((sum(p.rows for p in parts), cols))

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, fmt: str, raw: torch.Tensor, cols: int) -> "QuantWeight":
        """raw: uint8 [rows, nblocks * block_bytes] as the file stores it."""
        return cls([Part(fmt, qformats.from_gguf_bytes(fmt, raw))], cols)

    @classmethod
    def quantize(cls, fmt: str, w: torch.Tensor):
        """w: float [out, in] -> quantized in `fmt` (or the format qformats.fit picks for its row length; w
        itself when none fits), on w's device, a row range at a time."""
        fmt = qformats.fit(fmt, w.shape[1])
        if fmt is None:
            return w
        planes = [qformats.quantize(fmt, w[s:s + _DEQUANT_ROWS]) for s in range(0, w.shape[0], _DEQUANT_ROWS)]
        return cls([Part(fmt, {k: torch.cat([p[k] for p in planes]) for k in planes[0]})], w.shape[1])

    @staticmethod
    def cat(ws: list["QuantWeight"], slot: str) -> "QuantWeight":
        """Rows of ws one after another (fused q|k|v, gate|up); neighbouring parts of one format merge."""
        parts: list[Part] = []
        for p in (p for w in ws for p in w.parts):
            if parts and parts[-1].fmt == p.fmt:
                parts[-1] = Part(p.fmt, {k: torch.cat([parts[-1].planes[k], v]) for k, v in p.planes.items()})
            else:
                parts.append(p)
        return QuantWeight(parts, ws[0].cols, slot)

    def permute_rows(self, perm: torch.Tensor) -> "QuantWeight":
        """Rows in the order perm (a permutation inside one part: llama.cpp's rotary rows of q or k)."""
        assert len(self.parts) == 1
        p = self.parts[0]
        return QuantWeight([Part(p.fmt, {k: v[perm.to(v.device)] for k, v in p.planes.items()})], self.cols, self.slot)

    def to(self, device=None, dtype=None) -> "QuantWeight":
        """Moves the planes; dtype is ignored (the blocks keep their format; outputs take x's dtype)."""
        if device is None or torch.device(device) == self.device:
            return self
        parts = [Part(p.fmt, {k: v.to(device) for k, v in p.planes.items()}) for p in self.parts]
        return QuantWeight(parts, self.cols, self.slot, self.scratch, self.dtype)

    def attach(self, slot: str, scratch: Scratch, dtype: torch.dtype) -> "QuantWeight":
        """Name the scratch slot this matrix dequantizes into and the dtype rows are read in (model build)."""
        self.slot, self.scratch, self.dtype = slot, scratch, dtype
        return self

    # ---- reading ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(iter(self.parts[0].planes.values())).device

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(p.fmt for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """out: [out, in] of any float dtype: one kernel launch per part on the GPU, else the torch reference."""
        if out.is_cuda:
            from offload.kernels import wquant
            if wquant.dequantize_into(self, out):
                return out
        return self._reference_into(out)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The torch reference (what the kernels are tested against): [out, in] in dtype."""
        return self._reference_into(torch.empty(self.shape, dtype=dtype, device=self.device))  # [out, in]

    def _reference_into(self, out: torch.Tensor) -> torch.Tensor:
        r = 0
        for p in self.parts:   # a row range at a time: small float32 temporaries
            for s in range(0, p.rows, _DEQUANT_ROWS):
                e = min(p.rows, s + _DEQUANT_ROWS)
                out[r + s:r + e].copy_(p.dequantize(s, e))
            r += p.rows
        return out

    def __getitem__(self, idx) -> torch.Tensor:
        """Rows idx (a slice or an index tensor), dequantized: [n, in] in self.dtype (the embedding lookup).
        Long index lists go a run at a time, so a 128K-token prompt needs no float32 copy of all its rows."""
        if isinstance(idx, slice):   # embed[token:token + 1] each eager decode step: no arange over the vocabulary
            idx = torch.arange(*idx.indices(self.shape[0]), device=self.device)
        idx = torch.as_tensor(idx, device=self.device).reshape(-1)
        if idx.numel() <= _DEQUANT_ROWS:
            return self._rows(idx)
        out = torch.empty(idx.numel(), self.cols, dtype=self.dtype, device=self.device)  # out: [n, in]
        for s in range(0, idx.numel(), _DEQUANT_ROWS):
            out[s:s + _DEQUANT_ROWS] = self._rows(idx[s:s + _DEQUANT_ROWS])
        return out

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            p = self.parts[0]
            return qformats.dequantize(p.fmt, {k: v[idx] for k, v in p.planes.items()}).to(self.dtype)
        out, r = None, 0
        for p in self.parts:   # each part answers the rows it holds (no host sync: graph-safe)
            local = (idx - r).clamp(0, p.rows - 1)
            rows = qformats.dequantize(p.fmt, {k: v[local] for k, v in p.planes.items()})  # rows: [n, in]
            inside = ((idx >= r) & (idx < r + p.rows))[:, None]
            rows = torch.where(inside, rows, torch.zeros_like(rows))
            out = rows if out is None else out + rows
            r += p.rows
        return out.to(self.dtype)


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, in] -> [T, out]; w a dense tensor or a QuantWeight."""
    if not isinstance(w, QuantWeight):
        return F.linear(x, w, bias)
    if x.is_cuda and x.shape[0] == 1:
        from offload.kernels import wquant
        y = wquant.gemv(x.contiguous(), w)  # y: [1, out], None when no kernel covers these inputs
        if y is not None:
            return y if bias is None else y + bias
    scratch = w.scratch if w.scratch is not None else Scratch()
    return F.linear(x, scratch.dense(w, x.dtype), bias)


def weight_formats(w) -> tuple[str, ...]:
    """The formats a weight is held in: ('Q4_K', 'Q6_K') for mixed parts, the dtype's name for a dense tensor."""
    if isinstance(w, QuantWeight):
        return w.formats
    return (str(w.dtype).removeprefix("torch."),)
