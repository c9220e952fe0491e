"""Attention over a `TieredKVStore`: exact offloaded attention ("full") and sparse retrieval ("sparse").

Where KV lives:
    tail    the newest < C tokens of every layer (plus room for a short forward), on the compute device
    store   every full chunk [2, Hkv, C, D]; the store's policy keeps sinks and recent chunks on the device
Decode, per layer:  o = merge(dense_attend(q, tail), gather_attend(q, fetched chunks) for each FetchPlan part)
"full" fetches every chunk; "sparse" fetches sinks + window + the index's selection per KV head. With
select_unit="token" the index proposes token_candidates x budget chunks, their keys are scored exactly and
only the budget's best tokens per KV head are attended (kernels.token_attend), merged like any other part.
Prefill (T > token_path_max) stages the layer's whole history on the device, attends with SDPA, then cuts the
new full chunks into the store and feeds them to the layer's index.
"""
from __future__ import annotations

import math
import time

import torch

from offload import kernels
from offload.engine.attention import AttentionBackend, PersistableKV
from offload.engine.ops import causal_attend
from offload.errors import CapacityError


def to_chunks(k: torch.Tensor, v: torch.Tensor, C: int) -> torch.Tensor:
    """k, v: [Hkv, n*C, D] -> chunks [n, 2, Hkv, C, D] (contiguous)."""
    Hkv, N, D = k.shape
    kv = torch.stack([k, v])  # kv: [2, Hkv, n*C, D]
    return kv.view(2, Hkv, N // C, C, D).permute(2, 0, 1, 3, 4).contiguous()  # [n, 2, Hkv, C, D]


def from_chunks(chunks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """chunks [n, 2, Hkv, C, D] -> k, v: [Hkv, n*C, D]."""
    n, _, Hkv, C, D = chunks.shape
    kv = chunks.permute(1, 2, 0, 3, 4).reshape(2, Hkv, n * C, D)  # kv: [2, Hkv, n*C, D]
    return kv[0], kv[1]


class TieredAttention(AttentionBackend, PersistableKV):
    def __init__(self, *, num_layers: int, num_q_heads: int, num_kv_heads: int, head_dim: int, ctx: int,
                 device, dtype, store, chunk_tokens: int, mode: str = "full", make_index=None,
                 budget=None, sink_tokens: int = 64, window_tokens: int = 256, token_path_max: int = 64,
                 select_unit: str = "chunk", token_candidates: float = 4.0, token_reduce: str = "sum"):
        self.L, self.Hq, self.Hkv, self.D = num_layers, num_q_heads, num_kv_heads, head_dim
        self.ctx, self.device, self.dtype, self.store = ctx, torch.device(device), dtype, store
        self.C, self.mode, self.token_path_max = chunk_tokens, mode, token_path_max
        self.scale = head_dim ** -0.5
        self.n_sink = -(-sink_tokens // chunk_tokens)
        self.n_window = -(-window_tokens // chunk_tokens)
        self.budget = budget    # offload.indexes.Budget: selected chunks on top of sinks + window
        # "token": the index proposes token_candidates x budget chunks; the top budget x C tokens are attended
        self.select_unit, self.token_candidates, self.token_reduce = select_unit, token_candidates, token_reduce
        streaming = budget.streaming_heads if budget is not None else {}
        self._streaming = torch.tensor([[h in streaming.get(layer, ()) for h in range(num_kv_heads)]
                                        for layer in range(num_layers)], device=device)  # [L, Hkv] bool
        self.indexes = [make_index() for _ in range(num_layers)] if mode == "sparse" else None
        cap = chunk_tokens + token_path_max
        self.tail_k = torch.zeros(num_layers, num_kv_heads, cap, head_dim, device=device, dtype=dtype)  # [L, Hkv, cap, D]
        self.tail_v = torch.zeros_like(self.tail_k)  # tail_v: [L, Hkv, cap, D]
        self.n_chunks = 0        # full chunks in the store (every layer)
        self.tail_len = 0        # committed tokens in the tail
        self._len, self._new = 0, 0
        self._stage = None       # (layer, k [Hkv, N, D], v, offset) while a long forward runs layer by layer
        self._next_tail = None
        self._sel_s, self._tok_s, self._steps, self._fetched = 0.0, 0.0, 0, 0
        self._tok = torch.zeros(2, dtype=torch.long, device=device)   # token stage: scored (head, chunk)s, rows
        # the store's chunk table mirrored on the device at full size, rewritten in place: a captured step
        # reads where chunks are now, so chunk moves and appends need no recapture
        max_chunks = -(-ctx // chunk_tokens)
        self._tier_dev = torch.full((num_layers, max_chunks), -1, dtype=torch.int8, device=device)  # [L, max chunks]
        self._slot_dev = torch.full((num_layers, max_chunks), -1, dtype=torch.long, device=device)  # [L, max chunks]
        self._n_dev = torch.zeros(1, dtype=torch.long, device=device)   # _n_dev: [1] full chunks, on the device
        self._window_offsets = torch.arange(-self.n_window, 0, device=device)  # [n_window]
        self._res, self._res_version = [None] * num_layers, -1     # Residency per layer (pools, disk count)
        self._last_ids, self._prefetched = [None] * num_layers, {}  # previous step's selection; pending reads
        # chunk selections per tier (pad, gpu, host, disk): attended whole, then token-stage candidates (keys read)
        self._hits = torch.zeros(8, dtype=torch.long, device=device)
        self.tail_pos = torch.zeros(1, dtype=torch.long, device=device)  # tail_pos: [1] where decode writes
        self.tail_count = torch.ones(1, dtype=torch.long, device=device)  # tail_count: [1] = tail_pos + 1
        # selections per chunk since the last put, handed to the store's policy once per chunk of tokens
        self._sel_hits = torch.zeros(num_layers, -(-ctx // chunk_tokens), device=device)  # [L, max chunks]

    @property
    def length(self) -> int:
        return self._len

    def begin(self, num_new: int) -> None:
        if self._len + num_new > self.ctx:
            raise CapacityError(f"context full: {self._len} + {num_new} tokens exceed ctx {self.ctx}; "
                                "raise --ctx or start a new session")
        self._new = num_new
        self._token_path = num_new <= self.token_path_max and not (self.mode == "full" and num_new > 1)
        if self._token_path:
            self._refresh_residency()
            self.tail_pos.fill_(self.tail_len)
            self.tail_count.fill_(self.tail_len + 1)
            self._n_dev.fill_(self.n_chunks)
        self._steps += num_new == 1

    def graph_key(self):
        """What a captured decode step depends on; None when the step cannot be captured (disk reads)."""
        if not self._token_path or self._new != 1 or any(r.on_disk for r in self._res if r is not None):
            return None
        if self.mode == "full":
            return ("full", self.n_chunks)           # every chunk is attended: shapes follow the count
        fixed = self.n_sink + self.n_window
        budgets = tuple(self.budget.chunks(self._len + 1, self.C, layer) for layer in range(self.L))
        if self.select_unit == "token":          # the candidate count follows n until it reaches its cap
            budgets += tuple(self._candidates(b) for b in budgets)
        index_keys = tuple(getattr(idx, "graph_key", lambda: ("count", self.n_chunks))() for idx in self.indexes)
        if any(k is None for k in index_keys):
            return None                              # the index syncs with the host inside select
        # a layer whose budget still covers every chunk attends them all: its shapes follow the count
        small = tuple(self.n_chunks if self.n_chunks <= fixed + b else -1 for b in budgets)
        return ("sparse", budgets, small, index_keys)

    # ---- per-layer attention ------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self._token_path:
            return self._attend_tokens(layer, q, k, v)
        return self._attend_staged(layer, q, k, v)

    def _attend_tokens(self, layer: int, q, k, v) -> torch.Tensor:
        """Each new token attends to the tail (itself included) and the fetched chunks. q: [Hq, T, D]."""
        T = q.shape[1]
        if T == 1:
            return self._attend_one(layer, q, k, v)
        t0 = self.tail_len
        self.tail_k[layer, :, t0:t0 + T] = k
        self.tail_v[layer, :, t0:t0 + T] = v
        outs = []
        for t in range(T):
            qt = q[:, t]  # qt: [Hq, D]
            o, lse = kernels.dense_attend(qt, self.tail_k[layer, :, :t0 + t + 1], self.tail_v[layer, :, :t0 + t + 1],
                                          self.scale)  # o: [Hq, D], lse: [Hq]
            outs.append(self._attend_store(layer, qt, o, lse))
        return torch.stack(outs, dim=1).to(q.dtype)  # [Hq, T, D]

    def _attend_one(self, layer: int, q, k, v) -> torch.Tensor:
        """One decode token with static shapes and device-side positions, so a CUDA graph can replay it."""
        tk, tv = self.tail_k[layer], self.tail_v[layer]  # tk, tv: [Hkv, cap, D]
        tk.index_copy_(1, self.tail_pos, k)
        tv.index_copy_(1, self.tail_pos, v)
        qt = q[:, 0]  # qt: [Hq, D]
        o, lse = kernels.dense_attend(qt, tk, tv, self.scale, self.tail_count)  # o: [Hq, D], first tail_count keys
        o = self._attend_store(layer, qt, o, lse)  # o: [Hq, D]
        return o.to(q.dtype)[:, None]  # [Hq, 1, D]

    def _attend_store(self, layer: int, qt, o, lse) -> torch.Tensor:
        """Merge the store's parts into the tail's (o [Hq, D], lse [Hq]): whole chunks, then the token stage."""
        parts, token = self._select_parts(layer, qt)
        for pool, slots, alt in parts:
            o2, lse2 = kernels.gather_attend(qt, pool, slots, self.scale, alt)  # o2: [Hq, D]
            o, lse = kernels.merge_attn(o, lse, o2, lse2)
        if token is not None:
            t = time.perf_counter()
            cand, k_tok, n_cand = token
            # base_lse: what is attended anyway, so "sum" ranks tokens by their share of the whole softmax
            o2, lse2 = kernels.token_attend(qt, cand, k_tok, self.scale, self.token_reduce, base_lse=lse)
            o, lse = kernels.merge_attn(o, lse, o2, lse2)
            self._tok += torch.stack([n_cand.sum(), (n_cand * self.C).clamp(max=k_tok).sum()])
            self._tok_s += time.perf_counter() - t
        return o

    def _refresh_residency(self) -> None:
        """Mirror the store's chunk table on the device, so decode looks slots up without a host sync."""
        if self.store.placement_version == self._res_version:
            return
        pinned = self.device.type == "cuda"
        for layer in range(self.L):
            r = self.store.residency(layer)
            n = r.tier.numel()
            # pinned sources: a copy from pageable memory would make the host wait for the GPU's queue
            self._tier_dev[layer, :n].copy_(r.tier.pin_memory() if pinned else r.tier, non_blocking=True)
            self._slot_dev[layer, :n].copy_(r.slot.pin_memory() if pinned else r.slot, non_blocking=True)
            self._res[layer] = r
        self._res_version = self.store.placement_version

    def _parts(self, layer: int, ids: torch.Tensor):
        """(pool, slots [Hkv, K], alt pool) to attend for ids [Hkv, K]; -1 = padding."""
        r, tier, slot = self._res[layer], self._tier_dev[layer], self._slot_dev[layer]  # tier, slot: [max chunks]
        if r.on_disk:   # some chunks need a drive read: the store stages them (host sync)
            pending = self._prefetched.pop(layer, None)
            if pending is not None:
                pending.result()          # the predicted chunks are now read (and promoted where host has room)
            nxt = layer + 1
            if nxt < self.L and self._res[nxt].on_disk and self._last_ids[nxt] is not None:
                # layer l+1 will likely want what it wanted last step: its drive reads overlap this layer
                self._prefetched[nxt] = self.store.prefetch(nxt, self._last_ids[nxt])
            self._last_ids[layer] = ids
            plan = self.store.fetch(layer, ids)
            self._fetched += sum(plan.bytes.values())
            return [(pool, slots, None) for pool, slots in plan.parts]
        lists = kernels.reference.slot_lookup(ids, tier, slot, self._hits[:4], self._sel_hits[layer])  # [Hkv, K] x2
        if r.gpu_pool.shape[0] > 0 and r.host_pool.shape[0] > 0:   # one list, host slots flagged: one launch
            lists = (kernels.reference.merge_slot_lists(*lists),)  # [Hkv, K]
        return self._pool_parts(r, lists)

    @staticmethod
    def _pool_parts(r, lists):
        """(pool, slots, alt pool) to attend: one merged list reads both tiers in one launch."""
        if len(lists) == 1:
            return [(r.gpu_pool, lists[0], r.host_pool)]
        return [(pool, slots, None) for pool, slots in zip((r.gpu_pool, r.host_pool), lists) if pool.shape[0] > 0]

    def _select_parts(self, layer: int, q: torch.Tensor):
        """What query q [Hq, D] attends besides the tail: ([(pool, slots [Hkv, K], alt pool)], token stage or
        None), the token stage being (candidate (pool, slots, alt) parts, tokens to keep per KV head, [Hkv] counts)."""
        n = self.n_chunks
        if n == 0:
            return [], None
        r = self._res[layer]
        fixed = self.n_sink + self.n_window
        budget = self.budget.chunks(self._len + 1, self.C, layer) if self.mode == "sparse" else n
        if self.mode == "sparse" and not r.on_disk and n > fixed + budget:
            # one launch on the GPU: selection combined, slots looked up (one list when both tiers hold
            # chunks), hits counted (token-stage candidates apart: only their keys are read)
            t = time.perf_counter()
            sel, want, k_tok = self._propose(layer, q, budget)  # sel: [Hkv, want + fixed]
            merged = r.gpu_pool.shape[0] > 0 and r.host_pool.shape[0] > 0
            lists = kernels.plan_slots(sel, self._n_dev, self.n_sink, self.n_window, want, self._streaming[layer],
                                       self._tier_dev[layer], self._slot_dev[layer], self._hits,
                                       self._sel_hits[layer], merged, selection_hits_apart=bool(k_tok))
            # lists: [Hkv, fixed + want + fixed] each
            self._sel_s += time.perf_counter() - t
            parts = self._pool_parts(r, lists)
            return (parts, None) if not k_tok else self._split_token_stage(parts, fixed, k_tok)
        ids, whole, k_tok = self._chunk_ids(layer, q, budget)  # ids: [Hkv, whole + candidates]
        parts = self._parts(layer, ids)          # one fetch for both, so disk reads and prefetch see it all
        return (parts, None) if whole == ids.shape[1] else self._split_token_stage(parts, whole, k_tok)

    @staticmethod
    def _split_token_stage(parts, whole: int, k_tok: int):
        """Columns [:whole] of every part are attended whole, the rest go to the token stage."""
        cand = [(pool, slots[:, whole:], alt) for pool, slots, alt in parts]
        n_cand = sum((slots >= 0).sum(1) for _, slots, _ in cand)  # n_cand: [Hkv] candidate chunks per head
        return [(pool, slots[:, :whole], alt) for pool, slots, alt in parts], (cand, k_tok, n_cand)

    def _propose(self, layer: int, q: torch.Tensor, budget: int):
        """(sel [Hkv, W + fixed] the index's best-first chunk ids, W chunks to take from it, tokens to keep per KV
        head from them: 0 = attend the W chunks whole; else the token stage scores the W candidates' keys)."""
        token = self.select_unit == "token"
        want = self._candidates(budget) if token else budget
        sel = self.indexes[layer].select(q, want + self.n_sink + self.n_window)  # sel: [Hkv, W + fixed]
        return sel.to(self.device).contiguous(), want, budget * self.C if token else 0

    def _chunk_ids(self, layer: int, q: torch.Tensor, budget: int):
        """(ids [Hkv, A + M], A, k) for the disk and exact paths: the first A columns are attended whole; the
        M after them are the token stage's candidate chunks, of which the top k tokens per KV head are attended."""
        n = self.n_chunks
        everything = torch.arange(n, device=self.device).expand(self.Hkv, n)  # [Hkv, n]
        fixed = self.n_sink + self.n_window
        if self.mode == "full" or n <= fixed + budget:
            return everything, n, 0
        t = time.perf_counter()
        sel, want, k_tok = self._propose(layer, q, budget)  # sel: [Hkv, W + fixed]
        ids = kernels.reference.combine_selection(sel, self._n_dev, self.n_sink, self.n_window, want,
                                                  self._streaming[layer])  # ids: [Hkv, fixed + W + fixed]
        self._sel_s += time.perf_counter() - t
        return (ids, fixed, k_tok) if k_tok else (ids, ids.shape[1], 0)

    def _candidates(self, budget: int) -> int:
        """Chunks the token stage scores for a layer whose budget is `budget` chunks."""
        return min(self.n_chunks - self.n_sink - self.n_window, math.ceil(budget * self.token_candidates))

    def _attend_staged(self, layer: int, q, k, v) -> torch.Tensor:
        """Long forward: the layer's whole history sits on the device while this layer runs."""
        if self._stage is None or self._stage[0] != layer:
            self._commit_stage()
            self._open_stage(layer)
        _, sk, sv, off = self._stage
        T = q.shape[1]
        sk[:, off:off + T] = k
        sv[:, off:off + T] = v
        self._stage = (layer, sk, sv, off + T)
        return causal_attend(q, sk[:, :off + T], sv[:, :off + T], off)  # [Hq, T, D]

    def _open_stage(self, layer: int) -> None:
        total = self._len + self._new
        sk = torch.empty(self.Hkv, total, self.D, device=self.device, dtype=self.dtype)  # sk: [Hkv, total, D]
        sv = torch.empty_like(sk)  # sv: [Hkv, total, D]
        n = self.n_chunks * self.C
        if self.n_chunks:
            hk, hv = from_chunks(self.store.read(layer, list(range(self.n_chunks))).to(self.device))
            sk[:, :n], sv[:, :n] = hk, hv
        sk[:, n:self._len] = self.tail_k[layer, :, :self.tail_len]
        sv[:, n:self._len] = self.tail_v[layer, :, :self.tail_len]
        self._stage = (layer, sk, sv, self._len)

    def _commit_stage(self) -> None:
        if self._stage is None:
            return
        layer, sk, sv, off = self._stage
        n_full = off // self.C
        if n_full > self.n_chunks:
            s, e = self.n_chunks * self.C, n_full * self.C
            self._store_chunks(layer, self.n_chunks, sk[:, s:e], sv[:, s:e])
        rest = off - n_full * self.C
        self.tail_k[layer, :, :rest] = sk[:, n_full * self.C:off]
        self.tail_v[layer, :, :rest] = sv[:, n_full * self.C:off]
        self._next_tail = (n_full, rest)
        self._stage = None

    def _store_chunks(self, layer: int, first: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [Hkv, n*C, D] new full chunks of one layer -> store (+ index)."""
        step = max(1, (64 << 20) // (2 * k[:, :self.C].numel() * k.element_size()))  # ~64 MiB of chunks a put
        for s in range(0, k.shape[1] // self.C, step):
            sl = slice(s * self.C, min(k.shape[1], (s + step) * self.C))
            self.store.put(layer, first + s, to_chunks(k[:, sl], v[:, sl], self.C))
        if self.indexes is not None:
            idx = self.indexes[layer]
            if idx.num_chunks == 0 and first == 0:
                idx.build(k)
                if hasattr(idx, "reserve"):
                    # decode appends then fill reserved rows: no regrowth (and no graph recapture) until 2x
                    idx.reserve(2 * idx.num_chunks)
            else:
                idx.extend(k)

    def end(self) -> None:
        if self._token_path:
            self.tail_len += self._new
            if self.tail_len >= self.C:
                self._teach_policy()
            while self.tail_len >= self.C:   # cut full chunks off the front of the tail
                for layer in range(self.L):
                    self._store_chunks(layer, self.n_chunks, self.tail_k[layer, :, :self.C],
                                       self.tail_v[layer, :, :self.C])
                    rest = self.tail_len - self.C
                    self.tail_k[layer, :, :rest] = self.tail_k[layer, :, self.C:self.tail_len].clone()
                    self.tail_v[layer, :, :rest] = self.tail_v[layer, :, self.C:self.tail_len].clone()
                self.n_chunks += 1
                self.tail_len -= self.C
        else:
            self._commit_stage()
            self.n_chunks, self.tail_len = self._next_tail
        self._len += self._new
        self._new = 0

    def _teach_policy(self) -> None:
        """Pass the selection hits gathered on the device to the store's policy (one sync per chunk of tokens)."""
        n = self.n_chunks
        if self.mode != "sparse" or n == 0:
            return
        hits = self._sel_hits[:, :n].cpu()  # hits: [L, n]
        for layer in range(self.L):
            ids = hits[layer].nonzero().flatten()  # ids: [m]
            if ids.numel():
                self.store.learn(layer, ids, hits[layer, ids])
        self._sel_hits.zero_()

    # ---- persistence, stats -------------------------------------------------------------------
    def read_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        parts_k, parts_v = [], []
        if self.n_chunks:
            hk, hv = from_chunks(self.store.read(layer, list(range(self.n_chunks))))
            parts_k.append(hk.to(self.device))
            parts_v.append(hv.to(self.device))
        parts_k.append(self.tail_k[layer, :, :self.tail_len])
        parts_v.append(self.tail_v[layer, :, :self.tail_len])
        return torch.cat(parts_k, 1), torch.cat(parts_v, 1)  # [Hkv, length, D] each

    def load_kv(self, layers) -> None:
        n = 0
        for layer, (k, v) in enumerate(layers):  # k, v: [Hkv, N, D]
            n = k.shape[1]
            if layer == 0:
                self.begin(n)
                self._token_path = False
            self._stage = (layer, k.to(self.device, self.dtype), v.to(self.device, self.dtype), n)
            self._commit_stage()
        if n:
            self.end()

    def stats(self) -> dict:
        out = {"selection_ms_per_step": round(1000 * self._sel_s / max(self._steps, 1), 3),
               "fetched_bytes": self._fetched, "chunks": self.n_chunks}
        out.update(self.store.stats())
        pad, gpu, host, disk, _, cand_gpu, cand_host, _ = self._hits.tolist()
        head_bytes = 2 * self.C * self.D * self.tail_k.element_size()
        total = max(1, gpu + host + disk + out.get("hits_disk", 0))
        out.update(attended_gpu_selections=gpu, attended_host_selections=host,
                   attended_bytes_gpu=gpu * head_bytes, attended_bytes_host=host * head_bytes,
                   selected_hit_rate_gpu=round(gpu / total, 4), selected_hit_rate_host=round(host / total, 4))
        if self.select_unit == "token" and self.mode == "sparse":
            scored, rows = self._tok.tolist()
            # keys of every candidate chunk are read to score; K and V of the attended rows only
            out.update(candidate_gpu_selections=cand_gpu, candidate_host_selections=cand_host,
                       scored_key_bytes=scored * head_bytes // 2, token_attended_bytes=rows * head_bytes // self.C,
                       token_stage_ms_per_step=round(1000 * self._tok_s / max(self._steps, 1), 3))
        return out

    def close(self) -> None:
        self.store.close()
