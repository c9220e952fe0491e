"""CuPy launcher of wquant.cu (imported by `wquant` once CuPy has loaded)."""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _build
from ._cupy import _TAGS, _launch, _ptr

ROWS_PER_BLOCK = 4         # WQ_ROWS: one warp per output row


def gemv_part(x: torch.Tensor, planes: list[torch.Tensor], code: int, y: torch.Tensor, rows: int, cols: int) -> None:
    """y: [1, rows] (a view into the fused output) = x: [1, cols] times the part's rows."""
    fn = _build.function("wquant.cu", f"gemv_kernel<{_TAGS[x.dtype]}, {code}>", x.device.index)
    ptrs = [_ptr(p) for p in planes] + [_ptr(None)] * (4 - len(planes))
    args = (*ptrs, _ptr(x), _ptr(y), np.int32(rows), np.int32(cols))
    _launch(fn, x.device, (math.ceil(rows / ROWS_PER_BLOCK),), args, threads=32 * ROWS_PER_BLOCK)
