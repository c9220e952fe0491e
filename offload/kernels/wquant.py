"""Dequantize-GEMV over quantized weights (offload.model.qlinear): the CuPy kernel and its torch reference.

    y = gemv(x, w)              # x: [1, in] on the GPU -> [1, out] in x.dtype; None when no kernel applies
    y = gemv_reference(x, w)    # the same product through a float32 dequantized copy (any device)
    dequantize_into(w, out)     # out: [out, in] on the GPU (bf16/f16/f32) = w dequantized; False: not handled

The GEMV kernel reads each weight block once (wgemv.cu, its launch shape picked per part by wgemv_table); it
is launched on torch's current stream, so it is captured in the decode step's CUDA graph like the other kernels. dequantize_into is the prefill's: one
launch per part writes the dense scratch cuBLAS multiplies (the torch reference: QuantWeight.dequantize).
"""
from __future__ import annotations

import torch

from . import KERNELS_AVAILABLE, _backend

_CODES = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3, "Q6_K": 4}
_BLOCK = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q4_K": 256, "Q6_K": 256}
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_PLANES = {"Q8_0": ("qs", "d"), "Q4_0": ("qs", "d"), "Q4_1": ("qs", "dm"), "Q4_K": ("qs", "meta"),
           "Q6_K": ("ql", "qh", "sc", "d")}


def gemv_reference(x: torch.Tensor, w) -> torch.Tensor:
    """x: [1, in] -> [1, out]: float32 dequantized weights times float32 x, cast to x.dtype."""
    return (x.float() @ w.dequantize(torch.float32).t()).to(x.dtype)


def _planes_ok(w, device) -> bool:
    for p in w.parts:
        if p.fmt not in _CODES or w.cols % _BLOCK[p.fmt]:
            return False
        for t in p.planes.values():
            if not (t.is_cuda and t.device == device and t.is_contiguous() and t.data_ptr() % 16 == 0):
                return False
    return True


def supports(x: torch.Tensor, w) -> bool:
    return (KERNELS_AVAILABLE and x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous()
            and x.dtype in _DTYPES and x.data_ptr() % 16 == 0 and _planes_ok(w, x.device))


def dequantize_into(w, out: torch.Tensor) -> bool:
    """Fill out: [out, in] with w dequantized by the kernel; False (nothing written) when it does not apply."""
    if not (KERNELS_AVAILABLE and out.is_cuda and out.dtype in _DTYPES and out.is_contiguous()
            and out.data_ptr() % 16 == 0 and tuple(out.shape) == tuple(w.shape) and _planes_ok(w, out.device)):
        return False
    if _backend() is None:
        return False
    from . import _cupy_wquant
    r = 0
    for p in w.parts:
        _cupy_wquant.dequant_part([p.planes[n] for n in _PLANES[p.fmt]], _CODES[p.fmt], out[r:r + p.rows], p.rows, w.cols)
        r += p.rows
    return True


def gemv(x: torch.Tensor, w) -> torch.Tensor | None:
    """The kernel's product, or None (the caller then takes the dequantize-and-matmul path)."""
    if not supports(x, w):
        return None
    backend = _backend()
    if backend is None:
        return None
    from . import _cupy_wquant
    y = torch.empty(1, w.shape[0], dtype=x.dtype, device=x.device)  # y: [1, out]
    r = 0
    for p in w.parts:
        _cupy_wquant.gemv_part(x, [p.planes[n] for n in _PLANES[p.fmt]], _CODES[p.fmt], y[:, r:r + p.rows],
                               p.rows, w.cols, p.fmt)
        r += p.rows
    return y
