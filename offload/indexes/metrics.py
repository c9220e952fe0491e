"""Ground truth for selection quality: attention mass per chunk and its recall by a selection."""
from __future__ import annotations

import math

import torch


def chunk_attention_mass(query: torch.Tensor, keys: torch.Tensor, chunk_tokens: int,
                         scale: float | None = None) -> torch.Tensor:
    """Exact softmax mass of each chunk, per KV head summed over its query group -> [Hkv, n] float64.

    query [Hq, D], keys [Hkv, n*C, D]; each query head's softmax runs over all n*C keys, so a row sums
    to G = Hq // Hkv.
    """
    hq, d = query.shape
    hkv, n_tok, _ = keys.shape
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    qg = query.double().reshape(hkv, hq // hkv, d)                              # qg: [Hkv, G, D]
    p = torch.softmax(torch.einsum("hgd,hnd->hgn", qg, keys.double()) * scale, dim=-1)  # p: [Hkv, G, N]
    per_chunk = p.reshape(hkv, hq // hkv, n_tok // chunk_tokens, chunk_tokens).sum(dim=3)  # [Hkv, G, n]
    return per_chunk.sum(dim=1)                                                 # mass: [Hkv, n]


def mass_recall(mass: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mass of the selected chunks / mass of the best len(ids) chunks, per KV head -> [Hkv] in [0, 1]."""
    k = ids.shape[1]
    got = mass.gather(1, ids.to(mass.device)).sum(dim=1)                        # got: [Hkv]
    best = torch.topk(mass, k, dim=1).values.sum(dim=1)                         # best: [Hkv]
    return torch.where(best > 0, got / best, torch.ones_like(best))
