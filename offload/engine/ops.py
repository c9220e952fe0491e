"""Attention math shared by the backends: causal prefill attention and graph-safe decode attention.

Prefill attention on CUDA runs on cuDNN's fused attention (GQA K/V read without expansion, log-sum-exp
returned) and merges the history part and the chunk's causal square exactly through their log-sum-exps.
The memory-efficient SDPA op is the fallback when cuDNN is missing, rejects the shapes, or fails its
one-time numerical probe; the CPU always runs exact float32 torch math.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable

import torch
import torch.nn.functional as F

KERNELS = ("auto", "cudnn", "efficient")
_kernel = os.environ.get("OFFLOAD_PREFILL_KERNEL", "auto")
_cudnn_state: dict[tuple, str] = {}     # (device, dtype, D) -> "ok" | why cuDNN is off there


@contextlib.contextmanager
def prefill_kernel(name: str):
    """Pin the CUDA prefill kernel ('auto' = cuDNN when it passed its probe, 'efficient' = the old op)."""
    global _kernel
    if name not in KERNELS:
        raise ValueError(f"prefill kernel {name!r}: use one of {', '.join(KERNELS)}")
    old, _kernel = _kernel, name
    try:
        yield
    finally:
        _kernel = old


def kernel_report() -> dict:
    """Which CUDA kernel prefill attention used per (device, dtype, head_dim), and why cuDNN was off if it was."""
    return {f"{d}/{str(t).removeprefix('torch.')}/d{h}": s for (d, t, h), s in _cudnn_state.items()}


def causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int) -> torch.Tensor:
    """Exact causal attention of T queries at positions q_offset.. over S = q_offset + T keys at 0..S-1.

    q: [Hq, T, D], k/v: [Hkv, S, D] -> o: [Hq, T, D]. Never builds a mask or O(T x S) scores on the GPU:
    the history (keys before q_offset, all visible) and the chunk's own keys (causal square) are attended
    separately and merged exactly through their log-sum-exps.
    """
    if q_offset == 0 and not q.is_cuda:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                              enable_gqa=q.shape[0] != k.shape[0])[0]
    return causal_attend_lse(q, k, v, q_offset)[0].to(q.dtype)  # [Hq, T, D]


def causal_attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int):
    """causal_attend with its log-sum-exp, for merging with attention over more keys: (o [Hq, T, D], lse [Hq, T])."""
    o2, lse2 = attend_lse(q, k[:, q_offset:], v[:, q_offset:], causal=True)   # o2: [Hq, T, D]
    if q_offset == 0:
        return o2, lse2
    o1, lse1 = attend_lse(q, k[:, :q_offset], v[:, :q_offset], causal=False)  # o1: [Hq, T, D]
    return merge_lse(o1, lse1, o2, lse2)  # f32 o: [Hq, T, D], lse: [Hq, T]


def causal_attend_blocks(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                         history: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """causal_attend when a layer's history does not fit on the device at once: the chunk's own keys
    k_new/v_new [Hkv, T, D] plus history blocks (k, v) [Hkv, S_i, D] in any order (e.g. read from the
    store a few GiB at a time); the result equals causal_attend over the concatenation. q: [Hq, T, D]."""
    o, lse = attend_lse(q, k_new, v_new, causal=True)  # o: [Hq, T, D], lse: [Hq, T]
    for kb, vb in history:
        if kb.shape[1]:
            o, lse = merge_lse(o, lse, *attend_lse(q, kb, vb, causal=False))
    return o.to(q.dtype)  # [Hq, T, D]


def merge_lse(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor):
    """Exact softmax merge of two attentions over disjoint key sets: o: [H, T, D], lse: [H, T] -> float32 (o, lse).
    The decode kernels' merge (one fused launch on CUDA, the torch reference elsewhere)."""
    from offload.kernels import merge_attn
    return merge_attn(o1.float(), lse1.float(), o2.float(), lse2.float())


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its natural-log log-sum-exp. q: [Hq, T, D], k/v: [Hkv, S, D] (causal needs S == T)
    -> o [Hq, T, D] (q's dtype on CUDA, float32 on the CPU), lse [Hq, T] float32."""
    Hq, T, D = q.shape
    if q.is_cuda:
        if _kernel != "efficient" and _cudnn_usable(q, k):
            try:
                return _cudnn(q, k, v, causal)
            except RuntimeError as e:   # shapes cuDNN rejects (remembered: one failure, then the fallback)
                _cudnn_state[_key(q)] = "rejected: " + str(e).splitlines()[0][:160]
        return _efficient(q, k, v, causal)
    G = Hq // k.shape[0]
    qq = q.reshape(k.shape[0], G * T, D)  # qq: [Hkv, G*T, D]: a query group shares its KV head
    s = torch.matmul(qq.float(), k.float().transpose(1, 2)) * D ** -0.5  # s: [Hkv, G*T, S]
    if causal:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1).repeat(G, 1)  # mask: [G*T, T]
        s = s.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # lse: [Hkv, G*T]
    o = torch.matmul(torch.softmax(s, dim=-1), v.float())  # o: [Hkv, G*T, D]
    return o.reshape(Hq, T, D), lse.reshape(Hq, T)


def _key(q: torch.Tensor) -> tuple:
    return (str(q.device), q.dtype, q.shape[-1])


def _cudnn(q, k, v, causal: bool):
    """cuDNN fused attention; GQA K/V [Hkv, S, D] go in as they are (no repeat_interleave)."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q[None], k[None], v[None], None, True, 0.0, causal, False, scale=q.shape[-1] ** -0.5)
    Hq, T, _ = q.shape
    return out[0][0], out[1].reshape(Hq, T).float()  # o: [Hq, T, D], lse: [Hq, T] (natural log: probed)


def _efficient(q, k, v, causal: bool):
    """The memory-efficient SDPA op (the pre-cuDNN path): causal expands the chunk's K/V, history folds the
    query group into the query axis so one KV head is read once."""
    Hq, T, D = q.shape
    Hkv = k.shape[0]
    G = Hq // Hkv
    if causal:
        k = k.repeat_interleave(G, dim=0)  # k: [Hq, T, D], only the chunk's own keys
        v = v.repeat_interleave(G, dim=0)  # v: [Hq, T, D]
        qq = q  # qq: [Hq, T, D]
    else:
        qq = q.reshape(Hkv, G * T, D)  # qq: [Hkv, G*T, D]
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        qq[None], k[None], v[None], None, True, 0.0, causal, scale=D ** -0.5)
    o, lse = out[0][0], out[1][0, :, :qq.shape[1]]  # o: [H', M, D], lse: [H', M] (padded to 32: cut)
    return o.reshape(Hq, T, D), lse.reshape(Hq, T).float()


def _cudnn_usable(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Static limits (half types, head_dim a multiple of 8 up to 128, whole query groups), then a probe per
    (device, dtype, head_dim) that checks output and LSE base against float32 math once, before trusting it."""
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] % 8 or q.shape[-1] > 128 \
            or q.shape[0] % k.shape[0] or not hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"):
        return False
    key = _key(q)
    if key not in _cudnn_state:
        _cudnn_state[key] = _probe(q.device, q.dtype, q.shape[-1])
    return _cudnn_state[key] == "ok"


def _probe(device, dtype, D: int) -> str:
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(8, 96, D, generator=g).to(device, dtype)  # q: [8, 96, D], 2 KV heads: GQA 4
    k = torch.randn(2, 160, D, generator=g).to(device, dtype)  # k: [2, 160, D]
    v = torch.randn(2, 160, D, generator=g).to(device, dtype)  # v: [2, 160, D]
    try:
        for causal, kk, vv in ((False, k, v), (True, k[:, :96], v[:, :96])):
            o, lse = _cudnn(q, kk, vv, causal)
            ro, rlse = attend_lse(q.cpu(), kk.cpu(), vv.cpu(), causal)  # float32 reference
            if not torch.allclose(lse.cpu(), rlse, atol=2e-2, rtol=0):
                return "probe: log-sum-exp differs from float32 math (layout or base)"
            if not torch.allclose(o.float().cpu(), ro, atol=3e-2, rtol=0):
                return "probe: output differs from float32 math"
    except RuntimeError as e:
        return "unavailable: " + str(e).splitlines()[0][:160]
    return "ok"


def decode_attend_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One decode query over a fixed-size cache with a validity mask (static shapes, CUDA-graph safe).

    q: [Hq, 1, D], k/v: [Hkv, S, D], valid: [S] bool -> o: [Hq, 1, D]. One KV read serves the whole query group.
    """
    Hq, _, D = q.shape
    Hkv = k.shape[0]
    qg = q.reshape(Hkv, Hq // Hkv, D)  # qg: [Hkv, G, D]
    s = torch.matmul(qg, k.transpose(1, 2)).float() * D ** -0.5  # s: [Hkv, G, S]
    s = s.masked_fill(~valid, float("-inf"))  # s: [Hkv, G, S]
    p = torch.softmax(s, dim=-1).to(v.dtype)  # p: [Hkv, G, S]
    return torch.matmul(p, v).reshape(Hq, 1, D)  # [Hq, 1, D]
