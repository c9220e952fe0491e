"""CuPy launcher of wquant.cu (imported by `wquant` once CuPy has loaded)."""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _build
from ._cupy import _TAGS, _launch, _ptr, _sm_count

WARPS = 4                  # WQ_ROWS in wquant.cu
ROWS_PER_WARP = 2          # WQ_RPW (a -DWQ_RPW=n in wquant_defines overrides it)

# benchmarks and tests set -D tuning options of wquant.cu here (e.g. "-DWQ_RPW=4", "-DWQ_UNROLL=4")
wquant_defines: tuple[str, ...] = ()


def _rows_per_warp() -> int:
    for d in wquant_defines:
        if d.startswith("-DWQ_RPW="):
            return int(d.split("=", 1)[1])
    return ROWS_PER_WARP


def gemv_part(x: torch.Tensor, planes: list[torch.Tensor], code: int, y: torch.Tensor, rows: int, cols: int) -> None:
    """y: [1, rows] (a view into the fused output) = x: [1, cols] times the part's rows."""
    fn = _build.function("wquant.cu", f"gemv_kernel<{_TAGS[x.dtype]}, {code}>", x.device.index, wquant_defines)
    ptrs = [_ptr(p) for p in planes] + [_ptr(None)] * (4 - len(planes))
    args = (*ptrs, _ptr(x), _ptr(y), np.int32(rows), np.int32(cols))
    _launch(fn, x.device, (math.ceil(rows / (WARPS * _rows_per_warp())),), args, threads=32 * WARPS)


def dequant_part(planes: list[torch.Tensor], code: int, out: torch.Tensor, rows: int, cols: int) -> None:
    """out: [rows, cols] (contiguous rows of the dense scratch) = the part's rows, dequantized."""
    fn = _build.function("wquant.cu", f"dequant_kernel<{_TAGS[out.dtype]}, {code}>", out.device.index, wquant_defines)
    ptrs = [_ptr(p) for p in planes] + [_ptr(None)] * (4 - len(planes))
    units = rows * (cols // 32)
    blocks = min(math.ceil(units / 256), 64 * _sm_count(out.device))
    _launch(fn, out.device, (blocks,), (*ptrs, _ptr(out), np.int32(rows), np.int32(cols)), threads=256)
