"""Mechanism: a tier only stores chunks in slots and copies them. Policy lives in `policy.py`.

Chunk layout (shared by every tier, the store and the kernels):
    one chunk = one layer, all KV heads, `chunk_tokens` tokens, K then V:
        chunk: [2, Hkv, C, D]   (index 0 = K post-RoPE, 1 = V), contiguous, so it moves in one copy
    a tier's storage is viewed as [num_slots, 2, Hkv, C, D]; per-head parts [C, D] are contiguous too,
    so a kernel can read only the heads it selected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class ChunkShape:
    num_kv_heads: int
    chunk_tokens: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (2, self.num_kv_heads, self.chunk_tokens, self.head_dim)

    @property
    def numel(self) -> int:
        return 2 * self.num_kv_heads * self.chunk_tokens * self.head_dim

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@runtime_checkable
class Tier(Protocol):
    """A fixed-capacity array of chunk slots. Five methods; no placement decisions."""

    name: str          # "gpu" | "host" | "disk"
    capacity: int      # number of slots

    def alloc(self, n: int) -> list[int]:
        """Reserve n free slots (raises CapacityError when fewer are free)."""

    def free(self, slots: Sequence[int]) -> None:
        """Return slots to the free list."""

    def write(self, slots: Sequence[int], src: torch.Tensor, stream=None):
        """Store src: [n, 2, Hkv, C, D] into slots; returns a completion handle (event/future/None)."""

    def read(self, slots: Sequence[int], dst: torch.Tensor, stream=None):
        """Copy slots into dst: [n, 2, Hkv, C, D]; returns a completion handle. Bit-identical to what was written."""

    @property
    def num_free(self) -> int:
        """Free slots."""


def to_chunks(k: torch.Tensor, v: torch.Tensor, C: int) -> torch.Tensor:
    """k, v: [Hkv, n*C, D] -> chunks [n, 2, Hkv, C, D] (contiguous), the layout every tier stores."""
    Hkv, N, D = k.shape
    kv = torch.stack([k, v])  # kv: [2, Hkv, n*C, D]
    return kv.view(2, Hkv, N // C, C, D).permute(2, 0, 1, 3, 4).contiguous()  # [n, 2, Hkv, C, D]


def from_chunks(chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """chunks [n, 2, Hkv, C, D] -> k, v: [Hkv, n*C, D]."""
    n, _, Hkv, C, D = chunks.shape
    kv = chunks.permute(1, 2, 0, 3, 4).reshape(2, Hkv, n * C, D)  # kv: [2, Hkv, n*C, D]
    return kv[0], kv[1]
