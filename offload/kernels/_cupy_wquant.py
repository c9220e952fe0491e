"""CuPy launchers of wquant.cu (the prefill's dequantize, the first GEMV), wgemv.cu (the tuned GEMV) and
wgemv_tc.cu (the tensor-core GEMV of the 4-bit formats); imported by `wquant` once CuPy has loaded."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from . import _build, wgemv_table
from ._cupy import SMEM_DEFAULT, allow_smem, _TAGS, _launch, _ptr, _sm_count

WARPS = 4                  # WQ_ROWS in wquant.cu
ROWS_PER_WARP = 2          # WQ_RPW (a -DWQ_RPW=n in the defines overrides it)
_SMEM_MAX = 227 * 1024     # what Hopper and Ampere allow a block after raising it

# benchmarks and tests set -D tuning options of wquant.cu's gemv_kernel here (e.g. "-DWQ_RPW=4"); when set,
# that kernel runs instead of the table's pick
wquant_defines: tuple[str, ...] = ()
# benchmarks and tests: run this variant (a wgemv_table.Variant) for every part instead of the table's pick
forced_variant: wgemv_table.Variant | None = None


def gemv_part(x: torch.Tensor, planes: list[torch.Tensor], code: int, y: torch.Tensor, rows: int, cols: int,
              fmt: str) -> None:
    """y: [1, rows] (a view into the fused output) = x: [1, cols] times the part's rows."""
    if wquant_defines:
        return _gemv_v1(x, planes, code, y, rows, cols, wquant_defines)
    v = forced_variant or wgemv_table.pick(fmt, rows, cols)
    if v.kernel == "tc":
        if wgemv_table.tc_applies(fmt, cols, x.dtype == torch.bfloat16):
            return _gemv_tc(x, planes, code, y, rows, cols, v)
        v = wgemv_table.fallback(fmt, rows, cols)
    if v.kernel == "v1":
        return _gemv_v1(x, planes, code, y, rows, cols, v.defines)
    smem = 4 * ((cols + cols // 16 if v.xsmem else 0) + v.warps * v.rpw)
    if smem > _SMEM_MAX:   # x does not fit in shared memory: read it through L1 instead
        v = dataclasses.replace(v, xsmem=0)
        smem = 4 * v.warps * v.rpw
    fn = _build.function("wgemv.cu", f"gemv2_kernel<{_TAGS[x.dtype]}, {code}>", x.device.index, v.defines)
    if smem > SMEM_DEFAULT and not allow_smem(fn, smem):   # this CuPy cannot raise the limit: x through L1
        v = dataclasses.replace(v, xsmem=0)
        smem = 4 * v.warps * v.rpw
        fn = _build.function("wgemv.cu", f"gemv2_kernel<{_TAGS[x.dtype]}, {code}>", x.device.index, v.defines)
    tiles = math.ceil(rows / v.tile_rows)
    grid = tiles if not v.ctas_per_sm else min(tiles, v.ctas_per_sm * _sm_count(x.device))
    ptrs = [_ptr(p) for p in planes] + [_ptr(None)] * (4 - len(planes))
    args = (*ptrs, _ptr(x), _ptr(y), np.int32(rows), np.int32(cols), np.int32(tiles))
    _launch(fn, x.device, (grid,), args, shared_mem=smem, threads=32 * v.warps)


def _gemv_tc(x, planes, code, y, rows, cols, v) -> None:
    """wgemv_tc.cu: bf16 x: [1, cols], y: [1, rows]; static shared memory only."""
    fn = _build.function("wgemv_tc.cu", f"tc_gemv_kernel<BF16, {code}>", x.device.index, v.defines)
    tiles = math.ceil(rows / v.tile_rows)
    grid = tiles if not v.ctas_per_sm else min(tiles, v.ctas_per_sm * _sm_count(x.device))
    ptrs = [_ptr(p) for p in planes] + [_ptr(None)] * (4 - len(planes))
    args = (*ptrs, _ptr(x), _ptr(y), np.int32(rows), np.int32(cols), np.int32(tiles))
    _launch(fn, x.device, (grid,), args, threads=32 * v.warps)


def precompile(jobs, device_index: int, workers: int = 8) -> dict:
    """Compile the GEMV kernels of jobs ((Variant, format code, torch dtype) each) several at a time, so a tune
    run or a test module does not wait for each NVRTC call in turn; returns {job: error text} for failures."""
    from concurrent.futures import ThreadPoolExecutor

    from .wquant import _CODES
    codes = {c: f for f, c in _CODES.items()}

    def key(job):   # variants that differ only in their grid share a kernel
        v, code, dtype = job
        if v.kernel == "tc":   # (a tc job that does not apply compiles its fallback when first launched)
            ok = wgemv_table.tc_applies(codes[code], 64, dtype == torch.bfloat16)
            return ("wgemv_tc.cu", f"tc_gemv_kernel<BF16, {code}>", v.defines) if ok else None
        kernel = ("wquant.cu", "gemv_kernel") if v.kernel == "v1" else ("wgemv.cu", "gemv2_kernel")
        return kernel[0], f"{kernel[1]}<{_TAGS[dtype]}, {code}>", v.defines

    def one(k):
        try:
            _build.function(k[0], k[1], device_index, k[2])
        except Exception as e:   # the caller reports it; the launch would raise the same
            return f"{type(e).__name__}: {str(e)[:300]}"
    keys = [k for k in dict.fromkeys(key(j) for j in jobs) if k is not None]
    with ThreadPoolExecutor(max(1, workers)) as ex:
        errs = dict(zip(keys, ex.map(one, keys)))
    return {j: errs[key(j)] for j in jobs if key(j) is not None and errs[key(j)]}


def _gemv_v1(x, planes, code, y, rows, cols, defines) -> None:
    fn = _build.function("wquant.cu", f"gemv_kernel<{_TAGS[x.dtype]}, {code}>", x.device.index, defines)
    rpw = next((int(d.split("=", 1)[1]) for d in defines if d.startswith("-DWQ_RPW=")), ROWS_PER_WARP)
    ptrs = [_ptr(p) for p in planes] + [_ptr(None)] * (4 - len(planes))
    args = (*ptrs, _ptr(x), _ptr(y), np.int32(rows), np.int32(cols))
    _launch(fn, x.device, (math.ceil(rows / (WARPS * rpw)),), args, threads=32 * WARPS)


def dequant_part(planes: list[torch.Tensor], code: int, out: torch.Tensor, rows: int, cols: int) -> None:
    """out: [rows, cols] (contiguous rows of the dense scratch) = the part's rows, dequantized."""
    fn = _build.function("wquant.cu", f"dequant_kernel<{_TAGS[out.dtype]}, {code}>", out.device.index, wquant_defines)
    ptrs = [_ptr(p) for p in planes] + [_ptr(None)] * (4 - len(planes))
    units = rows * (cols // 32)
    blocks = min(math.ceil(units / 256), 64 * _sm_count(out.device))
    _launch(fn, out.device, (blocks,), (*ptrs, _ptr(out), np.int32(rows), np.int32(cols)), threads=256)
