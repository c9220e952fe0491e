"""The one interface between the model and its KV cache / attention.

The model computes q, k, v for the new tokens, applies RoPE, and hands them to an
`AttentionBackend`, which stores k, v wherever it keeps KV and returns the attention output.
Exact dense, tiered exact-offload and sparse retrieval backends all implement this, so none of
them touches the model.

Shapes (batch 1, T new tokens, absolute positions start..start+T-1):
    q: [Hq, T, D]   k, v: [Hkv, T, D]   ->   o: [Hq, T, D]
Query head h reads KV head h // (Hq // Hkv).

It lives at the package top because both the model (which calls it) and the engine (which implements it)
depend on it; neither depends on the other through it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class AttentionBackend(ABC):
    """Start a forward (`begin`), attend per layer (`attend`), commit (`end`).

    static: True when `attend` keeps static shapes and device-side positions for every decode step, so the
    engine may capture the whole step once in a CUDA graph (the in-GPU dense cache).
    """

    static: bool = False

    @property
    @abstractmethod
    def length(self) -> int:
        """Tokens already committed to the cache."""

    @abstractmethod
    def begin(self, num_new: int) -> None:
        """Start a forward over `num_new` tokens at positions length..length+num_new-1."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v for `layer`; return causal attention of q over all cached + new keys."""

    @abstractmethod
    def end(self) -> None:
        """Commit the tokens of this forward (length += num_new)."""

    def graph_key(self):
        """What a captured decode step depends on (recapture when it changes); None: do not capture the step
        whole (the engine then runs the dense parts as graphs and attention eagerly). Asked after `begin(1)`."""
        return None

    def close(self) -> None:
        """Release memory and files."""

    def stats(self) -> dict:
        return {}


class PersistableKV(ABC):
    """Backends whose KV can be saved and restored (sessions)."""

    @abstractmethod
    def read_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Committed K and V of one layer: [Hkv, length, D] each, bit-identical to what was stored."""

    @abstractmethod
    def load_kv(self, layers) -> None:
        """Fill an empty cache from an iterable of (k, v) per layer, each [Hkv, N, D]; length becomes N."""
