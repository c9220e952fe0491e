"""Step 2 of a decode step (select -> plan -> attend -> merge): the store turns a Selection into a DecodePlan.

    store.open_decode(max_chunks)                # once: the chunk table mirrored on the device at full size
    store.begin_decode(n_chunks)                 # per forward: re-mirror if chunks moved, set the count
    plan = store.plan(layer, selection)          # per layer: one plan_slots launch (+ drive reads if needed)
    store.feedback(teach)                        # once per chunk of tokens: selection hits -> eviction policy,
                                                 # and hot host chunks up to the GPU pool (tiers/hot.py)

The device mirror is rewritten in place, so a captured step reads where chunks are now and chunk moves or
appends need no recapture. Every selected chunk is looked up by the same kernel (`kernels.plan_slots`),
for exact and sparse steps, chunk and token selection, with or without chunks on the drive; a layer with
chunks on the drive also reads them back (`FetchMixin.prefetch`; a host sync, so such steps are not captured)
and adds the staged chunks as one more part in the same column layout. Selection hits are counted on the
device and reach the policy through `learn`, the one route (direct `fetch` callers go through it too).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from offload import kernels
from offload.tiers.fetch import PendingFetch
from offload.tiers.placement import DISK, GPU, HOST
from offload.tiers.prefetch import PrefetchRule
from offload.tiers.sync import new_event


class Part(NamedTuple):
    """Chunks one gather reads: slots int32 [Hkv, K] of pool [S, 2, Hkv, C, D] (-1 = padding or in another
    part; ALT_SLOT-flagged slots are read from alt, the host slab next to the GPU pool)."""
    pool: torch.Tensor
    slots: torch.Tensor
    alt: torch.Tensor | None


@dataclass(frozen=True)
class ChunkTable:
    """One layer's device chunk table and the step's hit counters, as plan_slots reads and bumps them."""
    count: torch.Tensor          # int64 [1] full chunks (every layer)
    tier: torch.Tensor           # int8 [max chunks] 0 gpu, 1 host, 2 disk
    slot: torch.Tensor           # int64 [max chunks]
    attended: torch.Tensor       # int64 [4] selections attended whole: padding, gpu, host, disk
    candidates: torch.Tensor     # int64 [4] token-stage candidates (keys read): padding, gpu, host, disk
    chunk_hits: torch.Tensor     # float32 [max chunks] selections per chunk since the last feedback


@dataclass(frozen=True)
class DecodePlan:
    """What one layer's decode query reads besides the tail. All parts share one column layout.

    whole:      parts attended whole (the GPU pool and host slab as one merged list when both hold chunks,
                then the chunks staged from the drive)
    candidates: token-stage parts (keys scored, token_k best tokens per KV head attended); empty if token_k == 0
    """
    whole: tuple[Part, ...]
    candidates: tuple[Part, ...] = ()
    token_k: int = 0
    token_reduce: str = "sum"
    disk_bytes: int = 0          # read from the drive for this plan
    packed: object = None        # PackedFormat of the host slab and drive parts ([S, B] uint8) when int8/int4
    token_mass: float = 0.0      # > 0: token_k is a cap, each head attends the fewest tokens reaching this mass
    token_floor: int = 0
    rank_tokens: object = None   # Selection.rank_tokens: candidates ranked from estimates, their keys not read
    candidate_ids: torch.Tensor | None = None   # int64 [Hkv, K] chunk id of each candidate column (-1: none)
    token_rows: torch.Tensor | None = None      # int64 [1]: the ranked stage adds the token rows it attends here

    def candidate_chunks(self) -> torch.Tensor | None:
        """[Hkv] candidate chunks per KV head, or None without a token stage."""
        if not self.token_k:
            return None
        return sum((p.slots >= 0).sum(1) for p in self.candidates)


def _pinned_like(t: torch.Tensor) -> torch.Tensor:
    """A host tensor shaped like t, pinned when t is on CUDA (a non_blocking copy from the device then runs async)."""
    return torch.zeros(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)


class _Mirror:
    """Ships changed chunk-table rows to the device mirror: a persistent pinned staging buffer (a pinned
    copy made per call would be a cudaHostAlloc each time), reused once its previous copy has finished."""
    ROW_BYTES = 24                 # key, tier, slot: int64 each

    def __init__(self, num_layers: int, max_chunks: int, device: torch.device):
        self.max_chunks, self.device = max_chunks, device
        self.cuda = device.type == "cuda"
        self.dirty: list[torch.Tensor] = []          # keys layer * max_chunks + chunk, int64 [m] each
        self._stage = _pinned_like(torch.empty(3, 64, dtype=torch.long, device=device))   # [3, cap]
        self._done = None                            # event: the staging buffer's last copy finished

    def take(self) -> torch.Tensor | None:
        if not self.dirty:
            return None
        keys = torch.cat(self.dirty).unique()                                  # keys: [m] sorted, distinct
        self.dirty = []
        return keys if keys.numel() else None

    def send(self, keys, tier, slot, dev_tier: torch.Tensor, dev_slot: torch.Tensor) -> None:
        """dev_tier/dev_slot.view(-1)[keys] = tier, slot, queued on the compute stream (in place: a captured
        step reads the new rows at its next replay)."""
        m = keys.numel()
        if self._done is not None:
            self._done.synchronize()                 # the staging rows of the last mirror are read (long ago)
        if self._stage.shape[1] < m:
            self._stage = _pinned_like(torch.empty(3, max(m, 2 * self._stage.shape[1]), dtype=torch.long,
                                                   device=self.device))
        stage = self._stage[:, :m]                                             # stage: [3, m]
        stage[0], stage[1], stage[2] = keys, tier, slot
        rows = stage.to(self.device, non_blocking=True) if self.cuda else stage   # rows: [3, m]
        dev_tier.view(-1).index_copy_(0, rows[0], rows[1].to(torch.int8))
        dev_slot.view(-1).index_copy_(0, rows[0], rows[2])
        self._done = new_event(torch.cuda.current_stream(self.device)) if self.cuda else None


class DecodeMixin:
    def open_decode(self, max_chunks: int) -> None:
        """Allocate the device mirror of the chunk table and the hit counters for up to max_chunks per layer."""
        L, dev = self.num_layers, self.device
        self._dev_tier = torch.full((L, max_chunks), -1, dtype=torch.int8, device=dev)    # [L, max chunks]
        self._dev_slot = torch.full((L, max_chunks), -1, dtype=torch.long, device=dev)    # [L, max chunks]
        self._dev_count = torch.zeros(1, dtype=torch.long, device=dev)                    # [1]
        self._attended = torch.zeros(4, dtype=torch.long, device=dev)                     # [4]
        self._candidates = torch.zeros(4, dtype=torch.long, device=dev)                   # [4]
        self._chunk_hits = torch.zeros(L, max_chunks, device=dev)                         # [L, max chunks]
        self._token_rows = torch.zeros(2, dtype=torch.long, device=dev)   # token stage: scored (head, chunk)s, rows
        self._host_tier = torch.full((L, max_chunks), -1, dtype=torch.int8)   # the mirror's tiers, on the host
        self._on_disk = [0] * L
        self._last_disk, self._prefetched = [None] * L, {}   # previous step's drive chunks [m]; pending reads
        self._disk_cols = [0] * L      # previous step's selections on the drive: room for the chunks not predicted
        self.prefetch_rule = PrefetchRule(L)   # which layers read ahead (replace it to change the rule)
        self._mirror = _Mirror(L, max_chunks, dev)
        self._hits_host = _pinned_like(self._chunk_hits)  # [L, max chunks] the last feedback's hits, copied async
        self._hits_ready = None                            # event (CUDA) or True once _hits_host holds hits
        self._hits_next = 0                                # first layer whose hits the policy has not seen
        for layer in range(L):           # the first mirror: every chunk stored so far
            n = int(self._num[layer])
            self._mark_dirty(torch.full((n,), layer, dtype=torch.long), torch.arange(n))

    def _mark_dirty(self, layers: torch.Tensor, chunks: torch.Tensor) -> None:
        """Chunks whose (tier, slot) changed: the next begin_decode copies exactly these rows to the device."""
        if hasattr(self, "_mirror"):
            self._mirror.dirty.append(layers.reshape(-1) * self._mirror.max_chunks + chunks.reshape(-1))

    def begin_decode(self, n_chunks: int) -> None:
        """Copy the chunk-table rows that changed since the last call to the device mirror (no host sync; a
        persistent pinned staging buffer), and set the count."""
        keys = self._mirror.take()                                            # keys: [m] layer * max + chunk
        if keys is not None:
            layers, chunks = keys // self._mirror.max_chunks, keys % self._mirror.max_chunks   # [m] each
            tier = torch.empty(keys.numel(), dtype=torch.long)                # tier: [m]
            slot = torch.empty(keys.numel(), dtype=torch.long)                # slot: [m]
            touched = layers.unique().tolist()
            for layer in touched:
                sel = layers == layer                                         # sel: [m] bool
                tier[sel] = self._tier[layer][chunks[sel]].long()
                slot[sel] = self._slot[layer][chunks[sel]]
            self._mirror.send(keys, tier, slot, self._dev_tier, self._dev_slot)
            self._host_tier.view(-1)[keys] = tier.to(torch.int8)
            for layer in touched:
                self._on_disk[layer] = int((self._host_tier[layer] == DISK).sum())
            self._stats["mirror_rows"] += keys.numel()
            self._stats["mirror_bytes"] += self._mirror.ROW_BYTES * keys.numel()
        self._dev_count.fill_(n_chunks)
        self._apply_hits(wait=False, layers=2)   # the last feedback's hits, a few layers a step (no waiting)

    def decode_on_disk(self) -> bool:
        """Whether a step must read chunks from the drive (host syncs: it cannot be captured)."""
        return any(self._on_disk)

    def table(self, layer: int) -> ChunkTable:
        return ChunkTable(self._dev_count, self._dev_tier[layer], self._dev_slot[layer], self._attended,
                          self._candidates, self._chunk_hits[layer])

    def plan(self, layer: int, sel) -> DecodePlan:
        """The DecodePlan of Selection sel (offload.indexes.selector) for `layer`; valid until the next put."""
        gpu_pool, host_pool = self.tiers[GPU].pool, self.tiers[HOST].slab
        merged = gpu_pool.shape[0] > 0 and host_pool.shape[0] > 0   # one list, host slots flagged: one launch
        disk = self._on_disk[layer] > 0
        self._prefetch_next(layer)      # before this layer's lookup and attention are queued
        ranked = sel.token_k and sel.rank_tokens is not None
        lists = kernels.plan_slots(sel, self.table(layer), merged, with_ids=disk or ranked)  # [Hkv, F + M] each
        if lists.host is None:
            parts = [Part(gpu_pool, lists.gpu, host_pool)]
        else:
            parts = [Part(p, s, None) for p, s in ((gpu_pool, lists.gpu), (host_pool, lists.host)) if p.shape[0]]
        disk_bytes = 0
        if disk:
            staged = self._read_disk_part(layer, lists.ids)
            parts += [Part(p, s, None) for p, s in staged.parts]
            disk_bytes = staged.bytes["disk"]
        w = sel.whole_columns
        if not sel.token_k:
            return DecodePlan(tuple(parts), disk_bytes=disk_bytes, packed=self.packed)
        plan = DecodePlan(tuple(Part(p, s[:, :w], a) for p, s, a in parts),
                          tuple(Part(p, s[:, w:], a) for p, s, a in parts), sel.token_k, sel.token_reduce, disk_bytes,
                          self.packed, sel.token_mass, sel.token_floor, sel.rank_tokens if ranked else None,
                          lists.ids[:, w:] if ranked else None, self._token_rows[1:] if ranked else None)
        if ranked:      # no candidate key is read; the stage counts its rows itself (in its select kernel on the GPU)
            return plan
        n_cand = plan.candidate_chunks()                                       # n_cand: [Hkv]
        C = self.shape.chunk_tokens
        # candidates' keys read and scored, token rows attended
        self._token_rows += torch.stack([n_cand.sum(), (n_cand * C).clamp(max=sel.token_k).sum()])
        return plan

    def _prefetch_next(self, layer: int) -> None:
        """Start the drive reads of the next layer (after the last layer: layer 0 of the next step) from what
        it read from the drive last step, if the prefetch rule wants them, so they overlap this layer's plan
        and attention."""
        nxt = (layer + 1) % self.num_layers
        last = self._last_disk[nxt]
        if nxt in self._prefetched or not self._on_disk[nxt] or last is None or not last.numel():
            return
        if self.prefetch_rule.wanted(nxt):
            self._prefetched[nxt] = self.prefetch(nxt, last, teach=False, spare=self._disk_cols[nxt])
            self._stats["prefetch_layers"] += 1
        else:
            self._stats["prefetch_skipped_layers"] += 1

    def _read_disk_part(self, layer: int, ids: torch.Tensor):
        """FetchPlan of the chunks of ids [Hkv, K] the mirror shows on the drive (wherever they are by now):
        chunks a prefetch already read are taken from its buffer, only the rest are read now."""
        pending = self._prefetched.pop(layer, None)
        ids = ids.cpu()                                                        # ids: [Hkv, K] (host sync)
        tier = self._host_tier[layer][ids.clamp(min=0)]                        # tier: [Hkv, K]
        on_disk = torch.where((ids >= 0) & (tier == DISK), ids, -1)            # on_disk: [Hkv, K]
        need = on_disk[on_disk >= 0].unique()                                  # need: [m] sorted
        if self._last_disk[layer] is not None:
            self.prefetch_rule.observe(layer, self._last_disk[layer], need)
        self._last_disk[layer], self._disk_cols[layer] = need, int((on_disk >= 0).sum())
        staged = None
        if pending is not None:
            staged = pending._staged if pending._version == self._version else None
            early = staged.chunks if staged is not None else need[:0]          # early: [r]
            hit = int(torch.isin(need, early).sum())
            self._stats["prefetch_hit_chunks"] += hit
            self._stats["prefetch_miss_chunks"] += need.numel() - hit
            self._stats["prefetch_unused_chunks"] += early.numel() - hit
        # one fetch of this step's drive chunks over the prefetch's buffer: its chunks are not read twice
        return PendingFetch(self, layer, on_disk, None, staged, self._version, teach=False).result()

    def feedback(self, teach: bool = True) -> None:
        """Hand the selection hits counted on the device to the policy, without a host sync: the counters are
        copied to pinned memory on the compute stream and reach the policy once the copy is done (at the
        next put or feedback that finds it finished); teach=False drops them."""
        self._apply_hits(wait=True)      # the previous feedback's copy: long finished (a chunk of tokens ago)
        self._promote_hot()              # what those steps kept selecting on the host trades places (tiers/hot.py)
        if teach:
            self._hits_host.copy_(self._chunk_hits, non_blocking=True)      # [L, max chunks]
            self._hits_ready = self._copy_done()
        self._chunk_hits.zero_()          # queued after the copy on the same stream

    def _copy_done(self):
        """What tells that the compute stream's queued copies have landed: an event on CUDA (True on the CPU)."""
        return new_event(torch.cuda.current_stream(self.device)) if self.device.type == "cuda" else True

    def _apply_hits(self, wait: bool, layers: int | None = None) -> None:
        """Teach the policy the hits of the last feedback once their copy has landed (wait: block for it);
        `layers`: at most that many layers now (decode steps spread the host work), None = all left."""
        ready = getattr(self, "_hits_ready", None)
        if ready is None:
            return
        if ready is not True:
            if not ready.query():
                if not wait:
                    return
                ready.synchronize()
            self._hits_ready = ready = True
        hits, todo = self._hits_host, self.num_layers - self._hits_next                    # hits: [L, max chunks]
        for layer in range(self._hits_next, self._hits_next + min(todo, todo if layers is None else layers)):
            ids = hits[layer].nonzero().flatten()                              # ids: [m]
            if ids.numel():
                self.learn(layer, ids, hits[layer, ids])
                self._note_hot(layer, ids)
            self._hits_next = layer + 1
        if self._hits_next == self.num_layers:
            self._hits_ready, self._hits_next = None, 0
            self._stats["feedback_applied"] += 1

    def learn(self, layer: int, chunk_ids: torch.Tensor, hits: torch.Tensor | None) -> None:
        """The one route of selection feedback to the eviction policy: chunk_ids [m] were selected, with
        weights hits [m] (counts or attention mass; None = plain recency)."""
        if hits is not None:
            hits = hits.detach().to("cpu", torch.float64)
        self.policy.touch(layer, chunk_ids.detach().to("cpu", torch.long), hits)

    def decode_stats(self, token_stage: bool) -> dict:
        """Selections of decode steps per tier and the bytes they read (stats(); one sync)."""
        sel = self.decode_counts()
        gpu, host, disk = sel["gpu"], sel["host"], sel["disk"]
        head_bytes = self.shape.nbytes // self.shape.num_kv_heads             # K and V of one head's chunk
        # a host slot holds what the cold tiers store: packed int8/int4 codes and scales read in place
        cold_head_bytes = self.cold_shape.nbytes // self.shape.num_kv_heads
        total = max(1, gpu + host + disk)
        # a drive selection uses one head's part of a chunk, but the drive is read in whole chunks
        out = dict(attended_gpu_selections=gpu, attended_host_selections=host, attended_disk_selections=disk,
                   attended_bytes_gpu=gpu * head_bytes, attended_bytes_host=host * cold_head_bytes,
                   attended_bytes_disk=disk * cold_head_bytes,
                   selected_hit_rate_gpu=round(gpu / total, 4), selected_hit_rate_host=round(host / total, 4))
        if token_stage:
            scored, rows = self._token_rows.tolist()
            # keys of every candidate chunk are read to score; K and V of the attended rows only
            out.update(candidate_gpu_selections=sel["cand_gpu"], candidate_host_selections=sel["cand_host"],
                       scored_key_bytes=scored * head_bytes // 2,
                       token_attended_bytes=rows * head_bytes // self.shape.chunk_tokens)
        return out

    def decode_counts(self) -> dict:
        """Selections of decode steps so far, per tier: attended whole, and token-stage candidates."""
        if not hasattr(self, "_attended"):
            return {}
        _, gpu, host, disk = self._attended.tolist()
        _, cgpu, chost, cdisk = self._candidates.tolist()
        return {"gpu": gpu, "host": host, "disk": disk, "cand_gpu": cgpu, "cand_host": chost, "cand_disk": cdisk}
