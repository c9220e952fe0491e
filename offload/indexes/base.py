"""Chunk selection: which KV chunks matter for this decode query.

Shapes (one layer, batch 1):
    keys:    [Hkv, N, D]  post-RoPE keys of the layer, N a multiple of chunk_tokens
    queries: [Hq, Nq, D]  optional prefill queries (for query-aware indexes such as the ANN one)
    query:   [Hq, D]      the decode query (post-RoPE)
GQA: query head h belongs to KV head h // (Hq // Hkv). Selection is per KV head: the scores of a
KV head's query group are combined (see each implementation), and `select` returns ids per KV head.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ChunkIndex(Protocol):
    chunk_tokens: int

    def build(self, keys: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        """Index all full chunks of a layer's prefill keys: [Hkv, N, D]."""

    def extend(self, keys: torch.Tensor) -> None:
        """Append one or more new full chunks: [Hkv, n*C, D]."""

    def select(self, query: torch.Tensor, budget: int) -> torch.Tensor:
        """Top `budget` chunk ids per KV head for query [Hq, D] -> int64 [Hkv, min(budget, num_chunks)].

        Rows are unique and best first, so a head with a smaller budget takes a prefix of its row.
        budget <= 0 raises ConfigError (a head that selects nothing is a streaming head: see Budget).
        """

    def reserve(self, num_chunks: int) -> None:
        """Room for num_chunks without regrowth, so buffers keep their address and captured steps stay valid."""

    def gpu_bytes(self, num_chunks: int) -> int:
        """Compute-device bytes the index allocates for num_chunks chunks (the planner reserves them up front)."""

    def chunk_log_mass(self, query: torch.Tensor, cap: int = 0) -> torch.Tensor:
        """Estimated log attention mass per chunk and query head: query [Hq, D] -> float32 [Hkv, G, n_alloc]
        (-inf for rows not written); cap = the selection's width in chunks. Mass budgets use it (adaptive.py)."""

    def graph_key(self):
        """What a captured `select` depends on besides the device-side chunk count (e.g. buffer addresses and
        sizes); None when `select` syncs with the host, so the decode step cannot be captured whole."""

    @property
    def num_chunks(self) -> int:
        """Chunks indexed so far."""

    @property
    def nbytes(self) -> dict[str, int]:
        """Allocated metadata bytes by where they live: {"gpu": .., "host": ..} ("gpu" = the compute device)."""
