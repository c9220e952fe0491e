"""Attention math shared by the backends: causal prefill attention and graph-safe decode attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int) -> torch.Tensor:
    """Exact causal attention of T queries at positions q_offset.. over S keys at positions 0..S-1.

    q: [Hq, T, D], k/v: [Hkv, S, D] -> o: [Hq, T, D]. Never builds O(T x S) scores on the GPU (SDPA's
    flash / memory-efficient kernels); callers bound T (prefill chunk) so the CPU math path stays small.
    """
    Hq, T, _ = q.shape
    Hkv, S, _ = k.shape
    gqa = Hq != Hkv
    if q_offset == 0 and T == S:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, enable_gqa=gqa)[0]
    rows = torch.arange(T, device=q.device)[:, None] + q_offset  # rows: [T, 1]
    allowed = torch.arange(S, device=q.device)[None, :] <= rows  # allowed: [T, S]
    if gqa and q.is_cuda:
        # the memory-efficient kernel takes a mask but not GQA: expand KV heads instead
        k = k.repeat_interleave(Hq // Hkv, dim=0)  # k: [Hq, S, D]
        v = v.repeat_interleave(Hq // Hkv, dim=0)  # v: [Hq, S, D]
        gqa = False
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=allowed, enable_gqa=gqa)[0]


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
