"""Fused kernels of the decode step (issue 16): one launch where the torch form of offload/model/llama.py takes
2-11, since a one-token step spends more time launching small kernels than reading their bytes.

    out = rms_norm(x, w, eps)                 # x: [T, H]; None when no kernel applies (caller: torch reference)
    total, out = add_rms_norm(x, y, w, eps)   # total = x + y, out = rms_norm(total): the residual add fused in
    q, k = rope_qk(qkv, cos, sin, hq, hkv)    # qkv: [T, (Hq + 2Hkv) * D] -> q: [Hq, T, D], k: [Hkv, T, D]
    out = silu_mul(gate_up)                   # gate_up: [T, 2I] -> silu(gate) * up: [T, I]
    done = kv_append(kc, vc, k, v, pos)       # one token's k, v into a cache at a device-side position (bool)
    o = dense_decode(q, k, v, n_valid)        # one query over a static cache: CuPy split attention (attend.cu)

Each returns None unless the fused path is on, the tensors are CUDA, of one dtype (bf16 / f16 / f32), contiguous,
and CuPy loads: the caller then runs its torch form, which is also each kernel's reference (tests/test_fused_decode.py).
The model takes these for decode rows only (T == 1); prefill keeps cuBLAS-friendly torch ops.

The path is on by default; OFFLOAD_FUSED_DECODE=0 turns it off (A/B timing, bisecting). `fused_decode(False)` does
the same in-process, for what is built or captured inside it (a CUDA graph keeps the kernels it captured).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from . import _backend

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_enabled = os.environ.get("OFFLOAD_FUSED_DECODE", "1").strip() not in ("0", "false", "off", "no")


def enabled() -> bool:
    return _enabled


@contextmanager
def fused_decode(on: bool):
    """Run the enclosed code with the fused decode kernels on or off."""
    global _enabled
    saved, _enabled = _enabled, bool(on)
    try:
        yield
    finally:
        _enabled = saved


def _kernels():
    """The CuPy launchers (_cupy_fused) while the path is on and CuPy loads, else None."""
    from . import KERNELS_AVAILABLE
    if not (_enabled and KERNELS_AVAILABLE) or _backend() is None:
        return None
    from . import _cupy_fused
    return _cupy_fused


def _launcher(*ts: torch.Tensor):
    """_kernels() when every tensor is a contiguous CUDA tensor of one supported dtype on one device."""
    t0 = ts[0]
    if not (t0.is_cuda and t0.dtype in _DTYPES):
        return None
    if not all(t.device == t0.device and t.dtype == t0.dtype and t.is_contiguous() for t in ts):
        return None
    return _kernels()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor | None:
    """x: [T, H], w: [H] -> [T, H] (llama.rms_norm), or None."""
    if x.dim() != 2 or w.shape != x.shape[1:]:
        return None
    k = _launcher(x, w)
    return None if k is None else k.rms_norm(x, w, eps)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float):
    """x, y: [T, H] -> (x + y, rms_norm(x + y, w)): both [T, H], or None."""
    if x.dim() != 2 or y.shape != x.shape or w.shape != x.shape[1:]:
        return None
    k = _launcher(x, y, w)
    return None if k is None else k.rms_norm(x, w, eps, res=y)


def rope_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int, hkv: int):
    """qkv: [T, (Hq + 2Hkv) * D], cos/sin: [T, D] -> (q [Hq, T, D], k [Hkv, T, D]) with RoPE applied
    (llama.apply_rope, rotate-half), or None. v needs no kernel: it is a view of qkv."""
    if qkv.dim() != 2 or cos.dim() != 2 or cos.shape != sin.shape or cos.shape[0] != qkv.shape[0]:
        return None
    D = cos.shape[1]
    if D % 2 or qkv.shape[1] != (hq + 2 * hkv) * D:
        return None
    k = _launcher(qkv, cos, sin)
    return None if k is None else k.rope_qk(qkv, cos, sin, hq, hkv)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """gate_up: [T, 2I] (gate | up, the fused projection's output) -> F.silu(gate) * up: [T, I], or None."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        return None
    k = _launcher(gate_up)
    return None if k is None else k.silu_mul(gate_up)


def kv_append(kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> bool:
    """kc[:, pos], vc[:, pos] = k, v for caches kc, vc: [Hkv, S, D] and one token's k, v: [Hkv, 1, D] (strided views
    are fine: v is a view of the fused qkv), pos: int64 [1] on the device: one launch for index_copy_'s two.
    False (nothing written) when the kernel does not apply."""
    if not (_enabled and kc.is_cuda and kc.dim() == 3 and vc.shape == kc.shape and vc.stride() == kc.stride()
            and k.shape == v.shape == (kc.shape[0], 1, kc.shape[2]) and pos.dtype == torch.int64 and pos.numel() == 1):
        return False
    if not all(t.stride(-1) == 1 and t.dtype == kc.dtype and t.device == kc.device for t in (vc, k, v)) \
            or kc.stride(-1) != 1 or kc.dtype not in _DTYPES or pos.device != kc.device:
        return False
    launcher = _kernels()
    if launcher is None:
        return False
    launcher.kv_append(kc, vc, k, v, pos)
    return True


def dense_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor | None:
    """One decode query q: [Hq, 1, D] over the first n_valid (int64 [1] on the device, read when the kernel runs)
    keys of a cache k, v: [Hkv, S, D] -> o: [Hq, 1, D] in q's dtype (ops.decode_attend_masked), or None.
    The CuPy split attention reads only the valid keys, in float32, and merges its splits in the same launch."""
    if not (_enabled and q.is_cuda and q.dim() == 3 and q.shape[1] == 1):
        return None
    cp = _backend()
    q1 = q[:, 0]  # q1: [Hq, D]
    if cp is None or not cp.supports_dense(q1, k, v, n_valid):
        return None
    o, _ = cp.dense_attend(q1, k, v, q.shape[-1] ** -0.5, n_valid)  # o: [Hq, D] float32
    return o.to(q.dtype)[:, None]  # [Hq, 1, D]
