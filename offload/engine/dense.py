"""Exact attention over a KV cache held whole on the compute device."""
from __future__ import annotations

import torch

from offload.attention import AttentionBackend, PersistableKV
from offload.engine.ops import causal_attend, decode_attend_masked
from offload.engine.sparse_prefill import PrefillStats, SparsePrefill, sparse_causal_attend
from offload.errors import CapacityError
from offload.kernels import fused


class DenseAttention(AttentionBackend, PersistableKV):
    """K and V of every layer in two tensors [L, Hkv, capacity, D].

    With `static=True` the cache is allocated at full ctx and decode reads a position tensor on the
    device, so a whole decode step can be captured in one CUDA graph. Otherwise the cache grows by
    doubling, so a small model with a large ctx does not reserve memory it never uses.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, ctx: int, device, dtype,
                 static: bool = False, sparse_prefill: SparsePrefill | None = None):
        self.ctx, self.static = ctx, static
        self.sparse_prefill, self.prefill_stats = sparse_prefill, PrefillStats()   # None = exact prefill
        self.shape = (num_layers, num_kv_heads, head_dim)
        self.device, self.dtype = torch.device(device), dtype
        cap = ctx if static else min(ctx, 1024)
        self.k = torch.zeros(num_layers, num_kv_heads, cap, head_dim, device=device, dtype=dtype)  # k: [L, Hkv, cap, D]
        self.v = torch.zeros_like(self.k)  # v: [L, Hkv, cap, D]
        self.pos_dev = torch.zeros(1, dtype=torch.long, device=device)  # pos_dev: [1]
        self.count_dev = torch.zeros(1, dtype=torch.long, device=device)  # count_dev: [1] = pos_dev + new tokens
        self.arange = torch.arange(cap, device=device)  # arange: [cap]
        self._len, self._new = 0, 0
        self._off = [0] * num_layers

    @property
    def length(self) -> int:
        return self._len

    def _grow(self, need: int) -> None:
        cap = self.k.shape[2]
        if need <= cap:
            return
        new_cap = min(self.ctx, max(need, 2 * cap))
        L, Hkv, D = self.shape
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.zeros(L, Hkv, new_cap, D, device=self.device, dtype=self.dtype)  # new: [L, Hkv, cap', D]
            new[:, :, :cap] = old
            setattr(self, name, new)
        self.arange = torch.arange(new_cap, device=self.device)

    def begin(self, num_new: int) -> None:
        if self._len + num_new > self.ctx:
            raise CapacityError(
                f"context full: {self._len} + {num_new} tokens exceed ctx {self.ctx}; raise --ctx or start a new session")
        self._grow(self._len + num_new)
        self._new = num_new
        self._off = [self._len] * len(self._off)
        self.pos_dev.fill_(self._len)
        self.count_dev.fill_(self._len + num_new)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T = q.shape[1]
        kc, vc = self.k[layer], self.v[layer]  # kc, vc: [Hkv, cap, D]
        if self.static and T == 1:
            if not fused.kv_append(kc, vc, k, v, self.pos_dev):   # one launch on CUDA
                kc.index_copy_(1, self.pos_dev, k)  # position read on the device: graph-safe
                vc.index_copy_(1, self.pos_dev, v)
            o = fused.dense_decode(q, kc, vc, self.count_dev)  # o: [Hq, 1, D]: one launch over the valid keys
            return o if o is not None else decode_attend_masked(q, kc, vc, self.arange <= self.pos_dev)  # [Hq, 1, D]
        off = self._off[layer]
        kc[:, off:off + T] = k
        vc[:, off:off + T] = v
        self._off[layer] = off + T
        if self.sparse_prefill is not None and T > 1:   # prefill only: a decode step is always exact
            return sparse_causal_attend(q, kc[:, :off + T], vc[:, :off + T], off, self.sparse_prefill,
                                        self.prefill_stats)  # [Hq, T, D]
        return causal_attend(q, kc[:, :off + T], vc[:, :off + T], off)  # [Hq, T, D]

    def end(self) -> None:
        self._len += self._new
        self._new = 0

    def read_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, :, :self._len], self.v[layer, :, :self._len]

    def load_kv(self, layers) -> None:
        n = None
        for i, (k, v) in enumerate(layers):  # k, v: [Hkv, N, D]
            n = k.shape[1]
            if i == 0:
                self.begin(n)
            self.k[i, :, :n] = k
            self.v[i, :, :n] = v
        if n is not None:
            self.end()

    def close(self) -> None:
        self.k = self.v = torch.empty(0)

    def stats(self) -> dict:
        out = {"kv_bytes_gpu" if self.device.type == "cuda" else "kv_bytes_device":
               self._len * self.k.shape[0] * self.k.shape[1] * self.k.shape[3] * 2 * self.k.element_size()}
        return out | (self.prefill_stats.as_dict() if self.sparse_prefill is not None else {})
