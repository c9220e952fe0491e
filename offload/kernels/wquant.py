"""Dequantize-GEMV over quantized weights (offload.model.qlinear): the CuPy kernel and its torch reference.

    y = gemv(x, w)              # x: [1, in] on the GPU -> [1, out] in x.dtype; None when no kernel applies
    y = gemv_reference(x, w)    # the same product through a float32 dequantized copy (any device)

The kernel reads each weight block once (wquant.cu); it is launched on torch's current stream, so it is
captured in the decode step's CUDA graph like the other kernels.
"""
from __future__ import annotations

import torch

from . import KERNELS_AVAILABLE, _backend

_CODES = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3, "Q6_K": 4}
_BLOCK = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q4_K": 256, "Q6_K": 256}
_PLANES = {"Q8_0": ("qs", "d"), "Q4_0": ("qs", "d"), "Q4_1": ("qs", "dm"), "Q4_K": ("qs", "meta"),
           "Q6_K": ("ql", "qh", "sc", "d")}


def gemv_reference(x: torch.Tensor, w) -> torch.Tensor:
    """x: [1, in] -> [1, out]: float32 dequantized weights times float32 x, cast to x.dtype."""
    return (x.float() @ w.dequantize(torch.float32).t()).to(x.dtype)


def supports(x: torch.Tensor, w) -> bool:
    if not (KERNELS_AVAILABLE and x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous()
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.data_ptr() % 16 == 0):
        return False
    for p in w.parts:
        if p.fmt not in _CODES or w.cols % _BLOCK[p.fmt]:
            return False
        for t in p.planes.values():
            if not (t.is_cuda and t.device == x.device and t.is_contiguous() and t.data_ptr() % 16 == 0):
                return False
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
                               p.rows, w.cols)
        r += p.rows
    return y
