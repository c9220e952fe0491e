"""Attention over a `TieredKVStore`: exact offloaded attention ("full") and sparse retrieval ("sparse").

Where KV lives: the tail (the newest < C tokens of every layer, plus room for a short forward) on the compute
device; every full chunk [2, Hkv, C, D] in the store, whose policy keeps sinks and recent chunks on the device.
A decode token, per layer (each step in its own file; the whole step is one CUDA graph when nothing is on disk):
    select   Selector.select -> Selection: chunk ids per KV head      offload/indexes/selector.py
    plan     store.plan -> DecodePlan: slots per tier, drive reads    offload/tiers/decode.py (kernels/plan.cu)
    attend   kernels.attend_plan: tail + every part + token stage     offload/kernels/plan_attend.py
    merge    kernels.merge_all: exact log-sum-exp merge of the parts  offload/kernels/__init__.py
Prefill (T > token_path_max) keeps a bounded window of the layer on the device and streams older history from
the store (engine/staging.py), which also cuts new full chunks into the store and the layer's index. This
class keeps the tail and drives the staging.
"""
from __future__ import annotations

import contextlib
import time

import torch

from offload import kernels
from offload.attention import AttentionBackend, PersistableKV
from offload.engine.staging import PrefillStage
from offload.errors import CapacityError
from offload.kernels import Tail
from offload.tiers.base import from_chunks


class TieredAttention(AttentionBackend, PersistableKV):
    sparse_prefill = None    # a SparsePrefill config makes long forwards block-sparse over history (lossy)
    prefill_stats = None     # its PrefillStats
    def __init__(self, *, num_q_heads: int, head_dim: int, ctx: int, store, selector, token_path_max: int = 64,
                 stage_bytes: int = 1 << 30):
        self.selector, self.store = selector, store
        self.L, self.Hq, self.Hkv, self.D, self.C = store.num_layers, num_q_heads, selector.Hkv, head_dim, selector.C
        self.ctx, self.device, self.dtype = ctx, store.device, store.shape.dtype
        self.token_path_max, self.scale = token_path_max, head_dim ** -0.5
        cap = self.C + token_path_max
        self.tail_k = torch.zeros(self.L, self.Hkv, cap, head_dim, device=self.device, dtype=self.dtype)  # [L, Hkv, cap, D]
        self.tail_v = torch.zeros_like(self.tail_k)  # tail_v: [L, Hkv, cap, D]
        self.tail_pos = torch.zeros(1, dtype=torch.long, device=self.device)  # tail_pos: [1] where decode writes
        self.tail_count = torch.ones(1, dtype=torch.long, device=self.device)  # tail_count: [1] = tail_pos + 1
        self.n_chunks, self.tail_len, self._len, self._new = 0, 0, 0, 0   # full chunks (every layer), tail tokens
        self.staging = PrefillStage(store, selector, stage_bytes // (2 * self.Hkv * head_dim * self.tail_k.element_size()),
                                    stage_bytes // 4 // (2 * self.Hkv * head_dim * self.tail_k.element_size()))
        self._next_tail = None
        self._tok_s, self._steps, self._fetched, self._disk0 = 0.0, 0, 0, 0
        store.open_decode(-(-ctx // self.C))

    @property
    def length(self) -> int:
        return self._len

    @property
    def indexes(self):       # the selector's, one per layer (None for exact attention)
        return self.selector.indexes

    @indexes.setter
    def indexes(self, value) -> None:
        self.selector.indexes = value

    def begin(self, num_new: int) -> None:
        if self._len + num_new > self.ctx:
            raise CapacityError(f"context full: {self._len} + {num_new} tokens exceed ctx {self.ctx}; "
                                "raise --ctx or start a new session")
        self._new = num_new
        self._token_path = num_new <= self.token_path_max and (self.selector.sparse or num_new == 1)
        if self._token_path:
            self.store.begin_decode(self.n_chunks)
            self.tail_pos.fill_(self.tail_len)
            self.tail_count.fill_(self.tail_len + 1)
        if num_new == 1 and not self._steps:     # drive bytes read by decode steps count from here
            self._disk0 = self.store._stats["disk2h_bytes"]
        self._steps += num_new == 1

    def graph_key(self):
        """What a captured decode step depends on; None when the step cannot be captured (drive reads)."""
        if not self._token_path or self._new != 1 or self.store.decode_on_disk():
            return None
        return self.selector.graph_key(self.n_chunks, self._len + 1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self._token_path:
            return self._attend_staged(layer, q, k, v)
        T, t0 = q.shape[1], self.tail_len
        if T == 1:   # static shapes and device-side positions: a CUDA graph replays this
            self.tail_k[layer].index_copy_(1, self.tail_pos, k)
            self.tail_v[layer].index_copy_(1, self.tail_pos, v)
            tail = Tail(self.tail_k[layer], self.tail_v[layer], self.tail_count)
            return self._attend_one(layer, q[:, 0], tail).to(q.dtype)[:, None]  # [Hq, 1, D]
        self.tail_k[layer, :, t0:t0 + T], self.tail_v[layer, :, t0:t0 + T] = k, v
        outs = [self._attend_one(layer, q[:, t], Tail(self.tail_k[layer, :, :t0 + t + 1],
                                                      self.tail_v[layer, :, :t0 + t + 1])) for t in range(T)]
        return torch.stack(outs, dim=1).to(q.dtype)  # [Hq, T, D]

    def _attend_one(self, layer: int, q: torch.Tensor, tail: Tail) -> torch.Tensor:
        """select -> plan -> attend -> merge for one query q [Hq, D] -> o [Hq, D] f32."""
        plan = None
        if self.n_chunks:
            plan = self.store.plan(layer, self.selector.select(layer, q, self.n_chunks, self._len + 1))
            self._fetched += plan.disk_bytes
        t = time.perf_counter()
        o, _ = kernels.attend_plan(q, tail, plan, self.scale)  # o: [Hq, D]
        self._tok_s += time.perf_counter() - t if plan is not None and plan.token_k else 0.0
        return o

    def long_forward(self, num_new: int) -> bool:
        """A forward that streams history past the prefill window or fills a quarter of it: the engine runs it
        in larger chunks (fewer history reads, and a GPU queue long enough to hide the store's puts)."""
        return self._len + num_new > self.staging.cap or 4 * num_new >= self.staging.cap

    def _attend_staged(self, layer: int, q, k, v) -> torch.Tensor:
        """Long forward: the layer's window on the device, older history streamed (engine/staging.py)."""
        if self.staging.layer != layer:
            self._commit_stage()
            self.staging.open(layer, self.n_chunks, self._len, self.tail_k[layer, :, :self.tail_len],
                              self.tail_v[layer, :, :self.tail_len], self._new)
        return self.staging.attend(q, k, v, self.sparse_prefill, self.prefill_stats)  # [Hq, T, D]

    def _commit_stage(self) -> None:
        if self.staging.layer is None:
            return
        layer = self.staging.layer
        n_full, rest, tk, tv = self.staging.close()
        self.tail_k[layer, :, :rest], self.tail_v[layer, :, :rest] = tk, tv
        self._next_tail = (n_full, rest)

    def _cut_chunk(self) -> None:
        """The tail's first C tokens become chunk n_chunks of every layer (a chunk boundary of decode)."""
        C, n, rest = self.C, self.n_chunks, self.tail_len - self.C
        kv = torch.stack([self.tail_k[:, :, :C], self.tail_v[:, :, :C]], 1)    # kv: [L, 2, Hkv, C, D] (fresh)
        # a fresh tensor nobody writes again: the copies overlap the next steps instead of fencing them
        self.store.put_column(n, kv, wait_kv=False)                         # chunk n of every layer at once
        for layer in range(self.L):
            self.selector.index_chunks(layer, n, kv[layer, 0])               # keys [Hkv, C, D]
        self.tail_k[:, :, :rest] = self.tail_k[:, :, C:self.tail_len].clone()   # all layers in one copy
        self.tail_v[:, :, :rest] = self.tail_v[:, :, C:self.tail_len].clone()
        self.n_chunks, self.tail_len = n + 1, rest

    def end(self) -> None:
        if self._token_path:
            self.tail_len += self._new
            if self.tail_len >= self.C:        # selection hits reach the policy once per chunk of tokens
                self.store.feedback(teach=self.selector.sparse)
            while self.tail_len >= self.C:     # cut full chunks off the front of the tail
                self._cut_chunk()
        else:
            self._commit_stage()
            self.staging.release()            # the window's memory goes back before decode
            self.n_chunks, self.tail_len = self._next_tail
        self._len, self._new = self._len + self._new, 0

    # ---- persistence, stats -------------------------------------------------------------------
    def read_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        hk, hv = from_chunks(self.store.read(layer, range(self.n_chunks)))      # hk, hv: [Hkv, n*C, D] (host)
        return (torch.cat([hk.to(self.device), self.tail_k[layer, :, :self.tail_len]], 1),
                torch.cat([hv.to(self.device), self.tail_v[layer, :, :self.tail_len]], 1))  # [Hkv, length, D] each

    @contextlib.contextmanager
    def bulk_fill(self, n: int):
        """An empty session takes n tokens written straight to the store and the tail (a resumed cache file):
        inside, the caller puts chunks 0..n//C-1 of every layer and writes tail rows 0..n%C-1; then the length is n."""
        if self._len:
            raise ValueError("bulk_fill needs an empty session")
        self.begin(n)
        self._token_path = False       # the staged path's bookkeeping: end() takes the tail from _next_tail
        yield
        self._next_tail = (n // self.C, n % self.C)
        self.end()

    def load_kv(self, layers) -> None:
        n = 0
        for layer, (k, v) in enumerate(layers):  # k, v: [Hkv, N, D]
            n = k.shape[1]
            if layer == 0:
                self.begin(n)
                self._token_path = False
            self.staging.open(layer, 0, 0, k[:, :0].to(self.device, self.dtype), v[:, :0].to(self.device, self.dtype), n)
            for s in range(0, n, self.staging.cap // 2):      # pieces of at most half a window
                self.staging.append(k[:, s:s + self.staging.cap // 2].to(self.device, self.dtype),
                                    v[:, s:s + self.staging.cap // 2].to(self.device, self.dtype))
            self._commit_stage()
        if n:
            self.end()

    def stats(self) -> dict:
        out = {"selection_ms_per_step": round(1000 * self.selector.select_s / max(self._steps, 1), 3),
               "fetched_bytes": self._fetched, "chunks": self.n_chunks}
        token = self.selector.token_candidates is not None and self.selector.sparse
        out.update(self.store.stats(), **self.store.decode_stats(token))
        if self.prefill_stats is not None:
            out.update(self.prefill_stats.as_dict())
        if self._steps:      # every drive read of decode (prefetched or not) per token
            out["disk_read_bytes_per_token"] = round((out["disk2h_bytes"] - self._disk0) / self._steps)
        splits = [getattr(i, "select_split", None) for i in self.selector.indexes or ()]
        if splits and all(splits):      # the ANN index: where the selection's host time goes (to_host, search, rank)
            out["selection_split_ms_per_step"] = {part: round(1000 * sum(s[part] for s in splits) / max(self._steps, 1), 3)
                                                  for part in splits[0]}
        if token:
            out["token_stage_ms_per_step"] = round(1000 * self._tok_s / max(self._steps, 1), 3)
        return out

    def close(self) -> None:
        """Free the session's device memory now, not when the object is collected: its indexes are sized for the
        whole context (GiBs at 512K+), and the next session of the same LLM is planned into that room."""
        self.store.close()
        self.staging.release()
        if self.selector.indexes is not None:
            self.selector.indexes = [None] * len(self.selector.indexes)
        self.tail_k = self.tail_v = None
