"""Synthetic post-RoPE keys and queries with the structure chunk selection relies on.

Text is a sequence of segments (tens to hundreds of tokens) about one topic each. A key is
    k_t = mu_h + topic(segment of t) * a + noise (spectrum decaying over dims), then RoPE at t
and a query asks for a few topics: q = nu_h + sum_j topic_j * b + noise, RoPE at its position.
mu_h (large, shared by all keys of a head) and nu_h differ, as key and query means do in real
models, which is what makes plain key-space ANN and mean landmarks imperfect. Topics live in the
low-frequency RoPE dims (as semantic content does in trained models), so they survive rotation.
"""
from __future__ import annotations

import math

import torch


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate-half RoPE of x [..., N, D] at positions [N]."""
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)  # inv_freq: [D/2]
    ang = positions.double()[:, None] * inv_freq[None]                         # ang: [N, D/2]
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()                  # cos, sin: [N, D/2]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]                                 # x1, x2: [..., N, D/2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)       # [..., N, D]


def synthetic_layer(num_tokens: int, num_kv_heads: int, num_q_heads: int, head_dim: int, *,
                    num_queries: int = 8, num_prefill_queries: int = 256, num_topics: int = 48,
                    mean_segment: int = 96, key_topic: float = 4.0, query_topic: float = 16.0,
                    topics_per_query: int = 2, rope_base: float = 500000.0, seed: int = 0):
    """-> keys [Hkv, N, D], decode queries [Hq, num_queries, D], prefill queries [Hq, Nq, D] (float32)."""
    gen = torch.Generator().manual_seed(seed)
    hkv, hq, d, g = num_kv_heads, num_q_heads, head_dim, num_q_heads // num_kv_heads
    slow = torch.zeros(d, dtype=torch.bool)                                    # slow: [D] low-freq dims
    slow[3 * d // 8: d // 2] = True                                            # rotate < 0.5 rad over 8K
    slow[7 * d // 8:] = True
    topics = torch.randn(hkv, num_topics, d, generator=gen) * slow             # topics: [Hkv, T, D]
    topics = topics / topics.norm(dim=-1, keepdim=True)
    # segments: lengths ~ exponential around mean_segment, each a random topic
    seg_topic = torch.empty(num_tokens, dtype=torch.long)
    pos = 0
    while pos < num_tokens:
        length = max(4, int(-mean_segment * math.log(1 - torch.rand(1, generator=gen).item())))
        seg_topic[pos: pos + length] = torch.randint(num_topics, (1,), generator=gen)
        pos += length
    spectrum = torch.linspace(1.0, 0.2, d)                                     # spectrum: [D]
    # the means sit mostly in slow dims: a big mean in fast dims would add per-token positional noise
    mean_scale = 0.15 + 1.0 * slow                                             # mean_scale: [D]
    mu = torch.randn(hkv, 1, d, generator=gen) * mean_scale                    # mu: [Hkv, 1, D]
    nu = torch.randn(hkv, 1, 1, d, generator=gen) * mean_scale                 # nu: [Hkv, 1, 1, D]
    heads = torch.arange(hkv)[:, None]                                         # heads: [Hkv, 1]
    noise = torch.randn(hkv, num_tokens, d, generator=gen) * spectrum          # noise: [Hkv, N, D]
    keys = mu + key_topic * topics[heads, seg_topic[None]] + noise             # keys: [Hkv, N, D]
    keys = _rope(keys, torch.arange(num_tokens), rope_base)                    # keys: [Hkv, N, D]

    def queries_at(positions: torch.Tensor) -> torch.Tensor:
        nq = positions.shape[0]
        # each query asks for topics present before it (the tokens it could attend to); the heads of a
        # GQA group share what they ask for and differ by their noise
        src = (torch.rand(hkv, 1, nq, topics_per_query, generator=gen) * positions.clamp(min=1)[:, None]).long()
        src = src.expand(hkv, g, nq, topics_per_query)
        want = seg_topic[src]                                                  # want: [Hkv, G, nq, t]
        ask = topics[torch.arange(hkv)[:, None, None, None], want].sum(dim=3)  # ask: [Hkv, G, nq, D]
        q = nu + query_topic * ask + torch.randn(hkv, g, nq, d, generator=gen) * spectrum  # q: [Hkv, G, nq, D]
        q = _rope(q, positions, rope_base)                                     # q: [Hkv, G, nq, D]
        return q.reshape(hq, nq, d)                                            # q: [Hq, nq, D]

    decode = queries_at(torch.full((num_queries,), num_tokens))                # decode: [Hq, nq, D]
    prefill_pos = torch.randint(num_tokens // 8, num_tokens, (num_prefill_queries,), generator=gen)
    prefill = queries_at(prefill_pos)                                          # prefill: [Hq, Nq, D]
    return keys, decode, prefill
