"""Pieces shared by the indexes: growable per-head buffers and argument checks."""
from __future__ import annotations

import torch

from offload.errors import ConfigError


class ChunkBuffer:
    """Per-KV-head rows preallocated as [Hkv, capacity, *tail]; grows by doubling.

    Preallocation keeps `extend` during decode from reallocating every chunk; the planner can pass the
    expected context as `capacity` so that a whole prefill fits without growth.
    """

    def __init__(self, num_kv_heads: int, tail: tuple[int, ...], device: torch.device | str,
                 dtype: torch.dtype, capacity: int = 0, pin: bool = False, limit: int = 0):
        self.pin = pin and torch.device(device).type == "cpu" and torch.cuda.is_available()
        self.limit = limit            # doubling stops here (the planner budgeted this many rows); 0 = none
        self.data = self._alloc(num_kv_heads, max(capacity, 0), tail, device, dtype)  # data: [Hkv, cap, *tail]
        self.size = 0

    def _alloc(self, hkv: int, cap: int, tail: tuple[int, ...], device, dtype) -> torch.Tensor:
        return torch.empty((hkv, cap, *tail), device=device, dtype=dtype, pin_memory=self.pin)

    def reserve(self, capacity: int) -> None:
        if capacity <= self.data.shape[1]:
            return
        old = self.data                                                   # old: [Hkv, cap, *tail]
        self.data = self._alloc(old.shape[0], capacity, tuple(old.shape[2:]), old.device, old.dtype)
        self.data[:, : self.size] = old[:, : self.size]

    def append(self, rows: torch.Tensor) -> None:
        """rows: [Hkv, n, *tail], converted to the buffer's device and dtype."""
        n = rows.shape[1]
        if self.size + n > self.data.shape[1]:
            grown = 2 * self.data.shape[1]
            if self.limit:
                grown = min(grown, self.limit)
            self.reserve(max(self.size + n, grown))
        self.data[:, self.size: self.size + n] = rows.to(device=self.data.device, dtype=self.data.dtype)
        self.size += n

    @property
    def valid(self) -> torch.Tensor:
        return self.data[:, : self.size]                                  # valid: [Hkv, size, *tail]

    @property
    def nbytes(self) -> int:
        # allocated, not used: the headroom of a doubling buffer occupies memory too
        return self.data.numel() * self.data.element_size()


def check_shape_args(num_kv_heads: int, num_q_heads: int, head_dim: int, chunk_tokens: int) -> int:
    """Validate the common constructor arguments; returns the GQA group size Hq // Hkv."""
    for name, value in (("num_kv_heads", num_kv_heads), ("num_q_heads", num_q_heads),
                        ("head_dim", head_dim), ("chunk_tokens", chunk_tokens)):
        if int(value) <= 0:
            raise ConfigError(f"{name}={value} must be > 0; pass the model's value")
    if num_q_heads % num_kv_heads:
        raise ConfigError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}; "
                          "pass the model's attention head counts")
    return num_q_heads // num_kv_heads


def check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; use one of {', '.join(map(repr, choices))}")


def check_budget(budget: int) -> None:
    if int(budget) <= 0:
        raise ConfigError(f"budget={budget} chunks must be > 0; give a positive budget, or mark the head "
                          "as a streaming head (Budget(streaming_heads=...)) to select nothing")


def split_chunks(keys: torch.Tensor, num_kv_heads: int, head_dim: int, chunk_tokens: int) -> torch.Tensor:
    """keys [Hkv, n*C, D] -> [Hkv, n, C, D]; a partial trailing chunk is a caller error."""
    if keys.dim() != 3 or keys.shape[0] != num_kv_heads or keys.shape[2] != head_dim:
        raise ValueError(f"keys {tuple(keys.shape)} must be [Hkv={num_kv_heads}, N, D={head_dim}]")
    if keys.shape[1] % chunk_tokens:
        raise ValueError(f"keys hold {keys.shape[1]} tokens, not a multiple of chunk_tokens={chunk_tokens}: "
                         "index only full chunks (the local window keeps the rest)")
    return keys.reshape(num_kv_heads, -1, chunk_tokens, head_dim)      # [Hkv, n, C, D]


def group_reduce(scores: torch.Tensor, how: str) -> torch.Tensor:
    """Combine a KV head's query group: scores [Hkv, G, ...] -> [Hkv, ...]."""
    return scores.amax(dim=1) if how == "max" else scores.sum(dim=1)
