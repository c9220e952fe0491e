"""Fetch side of the TieredKVStore: chunk ids -> a FetchPlan of (pool, slots) parts attention can read.

Device hits are read from the device pool, host hits from the pinned host slab itself (a GPU kernel
reads it through UVA, zero copy; on the CPU it is just the slab), disk hits are read (CRC-verified)
into a host staging buffer, which on CUDA is copied to a device tensor on the copy stream. Disk hits
are then promoted into free host slots, never by evicting (that would turn a read into a write).
`prefetch` starts the disk reads and returns at once; `result()` looks every chunk up again, so
chunks moved by a put() in between are found where they are now, and reads the chunks the prefetch did not
into the spare rows of its buffer: the drive chunks of a plan are one part whatever was read ahead, so the
attention (its parts and their rounding) never depends on prefetching.
"""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

import torch

from offload.tiers.device import to_device
from offload.tiers.sync import gather
from offload.tiers.placement import DISK, GPU, HOST, TIER_NAMES
from offload.tiers.sync import new_event, stream_wait


@dataclass(frozen=True)
class FetchPlan:
    """What attention reads for one layer. Attend over every part and merge (log-sum-exp).

    parts: (pool [S, 2, Hkv, C, D], slots int32 [Hkv, K]) pairs; slot -1 = padding or in another part.
        A pool is the device pool (CUDA), the pinned host slab (CPU tensor, read through UVA on CUDA)
        or a staging tensor of disk hits. No parts when every id is padding.
    hits: {"gpu"|"host"|"disk": number of (KV head, chunk) selections served by that tier}
    bytes: {"gpu"|"host": K/V bytes attention reads from that tier, "disk": bytes read from the drive}
    """
    parts: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    hits: dict
    bytes: dict


@dataclass
class _Staged:
    chunks: torch.Tensor      # int64 [m] distinct, in buffer row order
    buf: torch.Tensor         # [m + spare, 2, Hkv, C, D] or [m + spare, B] host (pinned on CUDA)
    future: Future

    def rows_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Buffer rows of ids [Hkv, K] (garbage where an id is not staged: the caller masks those)."""
        order = torch.argsort(self.chunks)                                     # order: [m]
        pos = torch.searchsorted(self.chunks[order], ids.clamp(min=0)).clamp(max=self.chunks.numel() - 1)
        return order[pos]                                                      # [Hkv, K]


class PendingFetch:
    """A fetch whose disk reads are running. result() -> FetchPlan (waits; raises TierIOError)."""

    def __init__(self, store, layer: int, ids: torch.Tensor, weights, staged: _Staged | None, version: int,
                 teach: bool = True):
        self._store, self._layer, self._ids, self._weights = store, layer, ids, weights
        self._staged, self._version, self._plan, self._teach = staged, version, None, teach

    def result(self) -> FetchPlan:
        if self._plan is None:
            self._plan = self._store._complete(self)
        return self._plan


class FetchMixin:
    def prefetch(self, layer: int, chunk_ids, weights: torch.Tensor | None = None,
                 teach: bool = True, spare: int = 0) -> PendingFetch:
        """Start fetching chunk_ids (int64 [Hkv, K], -1 = padding, or [K] for all heads) of `layer`.

        weights: optional per-selection scores [Hkv, K] (e.g. attention mass) for the eviction policy.
        teach=False: the caller counts these selections itself (the decode plan does, on the device), so
        they neither reach the policy nor the hit counters here.
        spare: rows of room in the staging buffer for chunks result() finds missing (read there, not apart).
        """
        self._open_check()
        ids = self._as_ids(chunk_ids)                                           # ids: [Hkv, K]
        tiers, _ = self._lookup(layer, ids)
        disk_chunks = ids[tiers == DISK].unique()                               # disk_chunks: [m] sorted
        staged = self._stage(layer, disk_chunks, spare) if disk_chunks.numel() else None
        return PendingFetch(self, layer, ids, weights, staged, self._version, teach)

    def fetch(self, layer: int, chunk_ids, weights: torch.Tensor | None = None) -> FetchPlan:
        """prefetch(...).result(): the plan, with every chunk readable on the compute device."""
        return self.prefetch(layer, chunk_ids, weights).result()

    def _as_ids(self, chunk_ids) -> torch.Tensor:
        ids = torch.as_tensor(chunk_ids).detach().to("cpu", torch.long)       # ids: [Hkv, K] or [K]
        hkv = self.shape.num_kv_heads
        if ids.dim() == 1:
            ids = ids.unsqueeze(0).expand(hkv, -1)                              # ids: [Hkv, K]
        if ids.dim() != 2 or ids.shape[0] != hkv:
            raise ValueError(f"chunk_ids must be [{hkv}, K] or [K], got {list(ids.shape)}")
        return ids.contiguous()

    def _stage(self, layer: int, chunks: torch.Tensor, spare: int = 0) -> _Staged:
        """Start reading chunks (distinct, all on disk) into a fresh host buffer with `spare` more rows."""
        buf = torch.empty((chunks.numel() + spare, *self.cold_shape.shape), dtype=self.cold_shape.dtype,
                          pin_memory=self._copy is not None)                    # buf: [m + spare, ...]
        return _Staged(chunks, buf, self._read_rows(layer, chunks, buf[:chunks.numel()]))

    def _stage_more(self, layer: int, s: _Staged, chunks: torch.Tensor) -> _Staged:
        """s plus chunks (on disk, not in s) as one staged buffer: read into s's spare rows, or, when they do
        not fit, s's rows and these in a new buffer (a host copy)."""
        n, m = s.chunks.numel(), chunks.numel()
        if n + m <= s.buf.shape[0]:
            fut = self._read_rows(layer, chunks, s.buf[n:n + m])
            return _Staged(torch.cat([s.chunks, chunks]), s.buf, gather([s.future, fut]))
        more = self._stage(layer, chunks, spare=n)
        s.future.result()                                                      # raises TierIOError
        more.buf[m:].copy_(s.buf[:n])
        return _Staged(torch.cat([chunks, s.chunks]), more.buf, more.future)

    def _read_rows(self, layer: int, chunks: torch.Tensor, rows: torch.Tensor) -> Future:
        dslots = self._slot[layer][chunks].tolist()
        fut = self.tiers[DISK].read(dslots, rows, after=self._state[DISK].readers_wait(dslots))
        self._state[DISK].drained_by(dslots, fut)
        self._stats["disk2h_bytes"] += len(dslots) * self.cold_shape.nbytes
        return fut

    def _complete(self, pf: PendingFetch) -> FetchPlan:
        self._open_check()
        layer, ids = pf._layer, pf._ids
        tiers, slots = self._lookup(layer, ids)                                 # [Hkv, K] each
        staged = pf._staged if pf._version == self._version else None
        disk_mask = tiers == DISK                                               # disk_mask: [Hkv, K]
        need = ids[disk_mask].unique()                                          # need: [m]
        have = staged.chunks if staged is not None else need[:0]               # have: [m']
        missing = need[~torch.isin(need, have)]                                 # missing: [m'']
        if missing.numel():
            staged = self._stage(layer, missing) if staged is None else self._stage_more(layer, staged, missing)
        staged = [staged] if staged is not None else []
        for s in staged:
            s.future.result()                                                   # raises TierIOError
        cuda = self._copy is not None
        compute = torch.cuda.current_stream(self.device) if cuda else None
        parts = []
        for t in (GPU, HOST):
            sel = tiers == t                                                    # sel: [Hkv, K]
            if bool(sel.any()):
                stream_wait(compute, self._state[t].readers_wait(slots[sel].unique().tolist()))  # [hits]
                pool = self.tiers[t].pool if t == GPU else self.tiers[t].slab
                parts.append((pool, self._slot_tensor(torch.where(sel, slots, -1))))  # slots: [Hkv, K]
        claimed = torch.zeros_like(disk_mask)                                   # claimed: [Hkv, K]
        disk_chunks_read = 0
        for s in staged:
            mine = disk_mask & torch.isin(ids, s.chunks) & ~claimed             # mine: [Hkv, K]
            claimed |= mine
            disk_chunks_read += s.chunks.numel()
            if not bool(mine.any()):
                continue
            part_slots = self._slot_tensor(torch.where(mine, s.rows_of(ids), -1))  # part_slots: [Hkv, K]
            parts.append((self._to_compute(s.buf[:s.chunks.numel()], compute), part_slots))
        if self.promote:
            self._promote(layer, staged, need)
        valid = ids >= 0
        if pf._teach:
            w = None
            if pf._weights is not None:
                w = torch.as_tensor(pf._weights).detach().cpu().expand_as(ids)[valid]  # w: [selections]
            self.learn(layer, ids[valid], w)
        head_bytes = self.shape.nbytes // self.shape.num_kv_heads
        hits = {name: int((tiers == t).sum()) for t, name in enumerate(TIER_NAMES)}
        nbytes = {"gpu": hits["gpu"] * head_bytes, "host": hits["host"] * head_bytes,
                  "disk": disk_chunks_read * self.cold_shape.nbytes}
        for name in TIER_NAMES:
            self._stats[f"hits_{name}"] += hits[name] if pf._teach else 0
        self._stats["uva_bytes"] += nbytes["host"]
        self._stats["fetches"] += 1
        return FetchPlan(tuple(parts), hits, nbytes)

    def _slot_tensor(self, slots: torch.Tensor) -> torch.Tensor:
        return to_device(slots.to(torch.int32), self.device)                  # [Hkv, K] int32

    def _to_compute(self, buf: torch.Tensor, compute) -> torch.Tensor:
        """A staging buffer as a compute-device tensor: itself on the CPU, an async H2D copy on CUDA."""
        if compute is None:
            return buf
        with torch.cuda.stream(self._copy):
            dev = torch.empty(buf.shape, dtype=buf.dtype, device=self.device)   # dev: [m, 2, Hkv, C, D]
            dev.copy_(buf, non_blocking=True)                                   # buf is pinned
        compute.wait_event(new_event(self._copy))
        dev.record_stream(compute)        # freed only after the attention that reads it
        self._stats["h2d_bytes"] += buf.numel() * buf.element_size()
        return dev

    def _promote(self, layer: int, staged: list, need: torch.Tensor) -> None:
        """Move just-read disk chunks that were asked for (need [m]) into free host slots (no eviction), so the
        next fetch skips the drive. Chunks read ahead and not asked for stay where they are: where a chunk
        lives never depends on what was predicted."""
        host = self.tiers[HOST]
        for s in staged:
            wanted = (self._tier[layer][s.chunks] == DISK) & torch.isin(s.chunks, need)    # wanted: [m]
            rows = torch.nonzero(wanted).flatten()                             # rows: [r]
            k = min(rows.numel(), host.num_free)
            if k == 0:
                continue
            rows = rows[:k]
            chunks = s.chunks[rows]
            dslots = self._slot[layer][chunks].tolist()
            hslots = host.alloc(k)
            stream_wait(None, self._state[HOST].writers_wait(hslots) + self._state[DISK].writers_wait(dslots))
            host.write(hslots, s.buf[rows])                                    # host -> host memcpy
            self._vacate(DISK, dslots)
            self._place(HOST, hslots, torch.full_like(chunks, layer), chunks)  # layers, chunks: [k]
            self._stats["promoted_chunks"] += k
