"""Attention math shared by the backends: causal prefill attention and graph-safe decode attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int) -> torch.Tensor:
    """Exact causal attention of T queries at positions q_offset.. over S = q_offset + T keys at 0..S-1.

    q: [Hq, T, D], k/v: [Hkv, S, D] -> o: [Hq, T, D]. Never builds a mask or O(T x S) scores on the GPU:
    the history (keys before q_offset, all visible) and the chunk's own keys (causal square) are attended
    separately and merged exactly through their log-sum-exps.
    """
    if q_offset == 0:
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                              enable_gqa=q.shape[0] != k.shape[0])[0]
    o1, lse1 = attend_lse(q, k[:, :q_offset], v[:, :q_offset], causal=False)  # o1: [Hq, T, D]
    o2, lse2 = attend_lse(q, k[:, q_offset:], v[:, q_offset:], causal=True)   # o2: [Hq, T, D]
    m = torch.maximum(lse1, lse2)  # m: [Hq, T]
    w1, w2 = torch.exp(lse1 - m)[..., None], torch.exp(lse2 - m)[..., None]  # w: [Hq, T, 1]
    return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(q.dtype)  # [Hq, T, D]


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp. q: [Hq, T, D], k/v: [Hkv, S, D] (causal needs S == T) -> o, lse [Hq, T]."""
    Hq, T, D = q.shape
    Hkv = k.shape[0]
    G = Hq // Hkv
    if causal:
        k = k.repeat_interleave(G, dim=0)  # k: [Hq, T, D], only the chunk's own keys
        v = v.repeat_interleave(G, dim=0)  # v: [Hq, T, D]
        qq = q  # qq: [Hq, T, D]
    else:
        qq = q.reshape(Hkv, G * T, D)  # qq: [Hkv, G*T, D]: a query group shares its KV head, one KV read
    if q.is_cuda:
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            qq[None], k[None], v[None], None, True, 0.0, causal, scale=D ** -0.5)
        o, lse = out[0][0], out[1][0, :, :qq.shape[1]]  # o: [H', M, D], lse: [H', M]
    else:
        s = torch.matmul(qq.float(), k.float().transpose(1, 2)) * D ** -0.5  # s: [H', M, S]
        if causal:
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # lse: [H', M]
        o = torch.matmul(torch.softmax(s, dim=-1), v.float())  # o: [H', M, D]
    return o.reshape(Hq, T, D), lse.reshape(Hq, T).float()


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
