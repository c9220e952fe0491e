"""CuPy launchers of fused.cu (the decode layer's elementwise kernels); imported by `fused` once CuPy has loaded.
Inputs are checked by fused.py (same device, one dtype, contiguous); outputs are new tensors, so a CUDA graph
capture takes them from its private pool like any torch op's."""
from __future__ import annotations

import math

import numpy as np
import torch

from . import _build
from ._cupy import _TAGS, _launch, _ptr

_THREADS = 256


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, res: torch.Tensor | None = None):
    """x: [R, H] -> out [R, H] (res None) or (x + res, out): one block per row, ~4 elements a thread."""
    R, H = x.shape
    out = torch.empty_like(x)  # out: [R, H]
    total = torch.empty_like(x) if res is not None else None  # total: [R, H] = x + res
    threads = min(1024, 32 * math.ceil(H / 128))
    fn = _build.function("fused.cu", f"rms_norm_kernel<{_TAGS[x.dtype]}>", x.device.index)
    args = (_ptr(x), _ptr(res), _ptr(total), _ptr(w), _ptr(out), np.int32(H), np.float32(eps))
    if R:
        _launch(fn, x.device, (R,), args, threads=threads)
    return out if res is None else (total, out)


def rope_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int, hkv: int):
    """qkv: [R, (Hq + 2Hkv) * D], cos/sin: [R, D] -> q: [Hq, R, D], k: [Hkv, R, D] rotated."""
    R, D = cos.shape
    q = torch.empty(hq, R, D, dtype=qkv.dtype, device=qkv.device)  # q: [Hq, R, D]
    k = torch.empty(hkv, R, D, dtype=qkv.dtype, device=qkv.device)  # k: [Hkv, R, D]
    fn = _build.function("fused.cu", f"rope_qk_kernel<{_TAGS[qkv.dtype]}>", qkv.device.index)
    args = (_ptr(qkv), _ptr(cos), _ptr(sin), _ptr(q), _ptr(k), np.int32(hq), np.int32(hkv), np.int32(D))
    if R:
        _launch(fn, qkv.device, (math.ceil((hq + hkv) * (D // 2) / _THREADS), R), args, threads=_THREADS)
    return q, k


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [R, 2I] -> silu(gate) * up: [R, I]."""
    R, I2 = gate_up.shape
    out = torch.empty(R, I2 // 2, dtype=gate_up.dtype, device=gate_up.device)  # out: [R, I]
    n = out.numel()
    fn = _build.function("fused.cu", f"silu_mul_kernel<{_TAGS[gate_up.dtype]}>", gate_up.device.index)
    if n:
        _launch(fn, gate_up.device, (math.ceil(n / _THREADS),), (_ptr(gate_up), _ptr(out), np.int32(I2 // 2),
                                                                  np.int64(n)), threads=_THREADS)
    return out


def kv_append(kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
    """kc, vc: [Hkv, S, D] caches; k, v: [Hkv, 1, D] -> kc[:, pos], vc[:, pos] = k, v (pos: int64 [1] on the device)."""
    hkv, _, d = kc.shape
    fn = _build.function("fused.cu", f"kv_append_kernel<{_TAGS[kc.dtype]}>", kc.device.index)
    args = (_ptr(k), _ptr(v), np.int64(k.stride(0)), np.int64(v.stride(0)), _ptr(kc), _ptr(vc),
            np.int64(kc.stride(0)), np.int64(kc.stride(1)), _ptr(pos), np.int32(hkv), np.int32(d))
    _launch(fn, kc.device, (math.ceil(2 * hkv * d / _THREADS),), args, threads=_THREADS)
