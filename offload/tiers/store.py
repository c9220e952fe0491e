"""TieredKVStore: KV chunks of every layer across GPU -> pinned host -> disk, with a chunk table.

    store = TieredKVStore(ChunkShape(Hkv, C, D, dtype), num_layers, (gpu, host, disk), device, disk_dir)
    store.put(layer, first_chunk_idx, kv)            # kv: [n, 2, Hkv, C, D] new full chunks
    plan = store.fetch(layer, chunk_ids)             # chunk_ids: int64 [Hkv, K] (-1 = padding) or [K]
    plan = store.plan(layer, selection)              # a decode step's DecodePlan (tiers/decode.py)
    pending = store.prefetch(layer + 1, ids)         # disk reads start now; pending.result() -> FetchPlan
    store.read(layer, [i, j])                        # [n, 2, Hkv, C, D] on the host, bit-identical
    k, v = store.read_device(layer, [i, j])          # [Hkv, n*C, D] each on the device (prefill history)
    store.stats(); store.close()

Ordering (CUDA): put() makes the copy stream wait for everything already queued on the compute
stream, runs all its GPU<->host copies on the copy stream, and makes the compute stream wait until kv
has been read, so the caller may overwrite kv right after put() returns. Disk writes run on the I/O
threads from a pinned staging ring (or straight from the host slab) and never block the caller
unless a host slot they read is needed again. Contract: enqueue the attention that uses a FetchPlan
before the next put(); a PendingFetch may span puts (its result() looks the chunks up again).
The store is used from one thread.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import Future

import torch

from offload.errors import CapacityError, ConfigError
from offload.kernels.quant import dequantize_chunks, packed_format
from offload.tiers.base import ChunkShape
from offload.tiers.cold import ColdMixin, StoredChunks
from offload.tiers.decode import DecodeMixin, DecodePlan
from offload.tiers.device import DevicePool
from offload.tiers.disk import DiskStore
from offload.tiers.fetch import FetchMixin, FetchPlan, PendingFetch
from offload.tiers.moves import MovesMixin
from offload.tiers.stream import StreamMixin
from offload.tiers.host import HostPool
from offload.tiers.hot import HotMixin
from offload.tiers.placement import DISK, GPU, HOST, TIER_NAMES, Residents, plan_put
from offload.tiers.policy import make_policy
from offload.tiers.sync import SlotStates, new_event

__all__ = ["TieredKVStore", "FetchPlan", "PendingFetch", "DecodePlan", "StoredChunks"]

_STAGE_BYTES = 32 << 20      # one staging buffer of the put -> disk ring
_STAGE_BUFFERS = 4


def _capacities(caps) -> tuple[int, int, int]:
    if hasattr(caps, "capacities"):
        caps = caps.capacities
    if isinstance(caps, dict):
        caps = (caps.get("gpu", 0), caps.get("host", 0), caps.get("disk", 0))
    gpu, host, disk = (int(c) for c in caps)
    return gpu, host, disk


class TieredKVStore(MovesMixin, FetchMixin, DecodeMixin, StreamMixin, ColdMixin, HotMixin):
    def __init__(self, shape: ChunkShape, num_layers: int, capacities, device: torch.device | str = "cpu",
                 disk_dir: str | None = None, policy="lru", sink_chunks: int = 1, window_chunks: int = 4,
                 promote: bool = True, io_threads: int = 4, disk_direct: bool = True, kv_dtype: str = "bf16",
                 promote_hot: bool = False):
        caps = _capacities(capacities)
        # int8 / int4: the host and disk tiers hold packed chunks (quantized when a chunk leaves the GPU pool)
        self.packed = None if kv_dtype == "bf16" else packed_format(kv_dtype, shape)
        cold = self.packed.storage if self.packed is not None else shape       # what a host/disk slot holds
        self.cold_shape = cold
        self.shape, self.num_layers, self.capacities = shape, num_layers, caps
        self.device = torch.device(device)
        self.promote = promote
        self.promote_hot = promote_hot      # decode: host chunks selected often trade places with cold GPU ones
        self.policy = make_policy(policy, sink_chunks, window_chunks)
        self.gpu_headroom = caps[GPU] // 64     # demotion batch slack: ~1.5% of the device tier
        self.host_headroom = caps[HOST] // 64 if caps[DISK] else 0   # and of the host tier, when it spills to disk
        pinned = num_layers * (self.policy.sink_chunks + self.policy.window_chunks)
        if caps[GPU] < pinned:
            raise CapacityError(f"GPU tier of {caps[GPU]} chunks is smaller than the pinned sinks + local windows "
                                f"({num_layers} layers x {pinned // max(num_layers, 1)} chunks); "
                                "raise --gpu-mem or shorten the window")
        if caps[DISK] and not disk_dir:
            raise ConfigError(f"a disk tier of {caps[DISK]} chunks needs a directory; pass --disk-dir")
        cuda = self.device.type == "cuda"
        self._copy = torch.cuda.Stream(self.device) if cuda else None
        self.tiers: list = [DevicePool(shape, caps[GPU], self.device), HostPool(cold, caps[HOST], pin=cuda), None]
        if caps[DISK]:
            self.tiers[DISK] = DiskStore(cold, caps[DISK], disk_dir, io_threads=io_threads, direct=disk_direct)
        per = max(1, _STAGE_BYTES // cold.nbytes)
        self._ring = HostPool(cold, per * _STAGE_BUFFERS, pin=cuda) if caps[DISK] else None
        self._ring_busy: list[Future | None] = [None] * _STAGE_BUFFERS
        self._ring_next, self._ring_per = 0, per
        # per tier, who owns each slot: (layer, chunk id), -1 = free; residents are a nonzero() away
        self._owner = [(torch.full((c,), -1, dtype=torch.long), torch.full((c,), -1, dtype=torch.long))
                       for c in caps]                                              # [S_tier] each
        self._tier = [torch.full((0,), -1, dtype=torch.int8) for _ in range(num_layers)]  # [chunks] per layer
        self._slot = [torch.full((0,), -1, dtype=torch.long) for _ in range(num_layers)]  # [chunks] per layer
        self._num = torch.zeros(num_layers, dtype=torch.long)                 # chunks per layer
        self._state = [SlotStates(), SlotStates(), SlotStates()]
        self._writes: list[Future] = []
        self._stats: Counter = Counter()
        self._version = 0          # bumped when a chunk is overwritten, so stale prefetches are dropped
        self.placement_version = 0  # bumped whenever a chunk lands in a slot (see `residency`)
        self._closed = False

    # ---- chunk table ----------------------------------------------------------------------------
    def _grow(self, layer: int, size: int) -> None:
        t = self._tier[layer]
        if t.numel() < size:
            cap = max(size, 2 * t.numel())
            pad = cap - t.numel()
            self._tier[layer] = torch.cat([t, torch.full((pad,), -1, dtype=torch.int8)])            # [cap]
            self._slot[layer] = torch.cat([self._slot[layer], torch.full((pad,), -1, dtype=torch.long)])  # [cap]

    def _place(self, tier: int, slots: list[int], layers: torch.Tensor, chunks: torch.Tensor) -> None:
        self.placement_version += 1
        self._mark_dirty(layers, chunks)       # the decode mirror copies just these rows (tiers/decode.py)
        idx = torch.tensor(slots, dtype=torch.long)                            # idx: [m]
        self._owner[tier][0][idx], self._owner[tier][1][idx] = layers, chunks
        for layer in layers.unique().tolist():
            sel = layers == layer                                              # sel: [m] bool
            self._tier[layer][chunks[sel]] = tier
            self._slot[layer][chunks[sel]] = idx[sel]

    def _vacate(self, tier: int, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forget who owns these slots and free them; returns their (layers, chunks)."""
        idx = torch.tensor(slots, dtype=torch.long)                            # idx: [m]
        layers, chunks = self._owner[tier][0][idx].clone(), self._owner[tier][1][idx].clone()
        self._owner[tier][0][idx] = -1
        self._owner[tier][1][idx] = -1
        self.tiers[tier].free(slots)
        return layers, chunks

    def _residents(self, tier: int) -> Residents:
        layers, chunks = self._owner[tier]
        slots = torch.nonzero(layers >= 0).flatten()                           # slots: [m]
        return Residents(slots, layers[slots], chunks[slots])

    def _lookup(self, layer: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tier int8, slot int64) per id; -1 for padding. Unknown ids raise."""
        valid = ids >= 0
        if bool((ids[valid] >= self._num[layer]).any()):
            raise ValueError(f"layer {layer} has {int(self._num[layer])} chunks; asked for chunk "
                             f"{int(ids[valid].max())}")
        safe = ids.clamp(min=0)
        tiers = torch.where(valid, self._tier[layer][safe], torch.tensor(-1, dtype=torch.int8))  # [Hkv, K]
        if bool(((tiers < 0) & valid).any()):
            raise ValueError(f"chunk {int(ids[valid & (tiers < 0)][0])} of layer {layer} was never put")
        return tiers, torch.where(valid, self._slot[layer][safe], -1)                            # [Hkv, K]

    # ---- put ------------------------------------------------------------------------------------
    def put(self, layer: int, first_chunk_idx: int, kv: torch.Tensor, wait_kv: bool = True) -> None:
        """Store new full chunks kv: [n, 2, Hkv, C, D] as chunks first_chunk_idx.. of `layer`.

        wait_kv (CUDA): True = later compute waits until kv is copied, so the caller may overwrite kv at
        once. False = the caller never writes kv again (a fresh tensor); copies then overlap later compute.
        """
        n = self._batch("kv", kv, self.shape)
        if n == 0:
            return
        ids = self._admit(layer, first_chunk_idx, n, (GPU, HOST, DISK), "new",
                          "raise --disk-mem (or --host-mem / --gpu-mem) or lower --ctx")
        self._place_new(kv, torch.full((n,), layer, dtype=torch.long), ids, wait_kv)

    def _batch(self, name: str, t: torch.Tensor, shape) -> int:
        """Rows in t, a batch of chunks [n, *shape.shape] of shape.dtype (else a ValueError naming `name`), once
        the store is open and no earlier disk write failed."""
        self._open_check()
        want = tuple(shape.shape)
        if t.dim() != 1 + len(want) or tuple(t.shape[1:]) != want or t.dtype != shape.dtype:
            raise ValueError(f"{name} must be [n, {', '.join(map(str, want))}] {shape.dtype}, "
                             f"got {list(t.shape)} {t.dtype}")
        self._raise_failed_writes()
        return t.shape[0]

    def _admit(self, layer: int, first_chunk_idx: int, n: int, tiers: tuple, what: str, fix: str) -> torch.Tensor:
        """Chunks first_chunk_idx.. (n) of a layer about to go into `tiers`: refused before anything changes when
        they lack room (past this check placement always succeeds), else the old copies dropped, the chunks
        counted and touched. Returns their ids [n]."""
        ids = torch.arange(first_chunk_idx, first_chunk_idx + n)                # ids: [n]
        self._grow(layer, first_chunk_idx + n)
        room = (sum(self.tiers[t].num_free for t in tiers if self.tiers[t] is not None)
                + int((self._tier[layer][ids] >= 0).sum()))
        if room < n:
            where = " + ".join("GPU" if t == GPU else TIER_NAMES[t] for t in tiers)
            raise CapacityError(f"KV store is full: {n} {what} chunks, room for {room} in {where}; {fix}")
        self._drop(layer, ids)
        self._num[layer] = max(int(self._num[layer]), first_chunk_idx + n)
        self.policy.touch(layer, ids, torch.zeros(n))                          # inserted: recency, no mass
        return ids

    def put_column(self, chunk_idx: int, kv: torch.Tensor, wait_kv: bool = True) -> None:
        """Chunk chunk_idx of every layer at once, kv: [L, 2, Hkv, C, D] (a decode step's chunk boundary): one
        placement decision and one pass of bookkeeping instead of L puts (the boundary's host time, issue 12).
        Stores what put(layer, chunk_idx, kv[layer:layer + 1], wait_kv) for each layer would; which of the L
        chunks land on which tier is decided once for all of them."""
        self._open_check()
        L = self.num_layers
        if tuple(kv.shape) != (L, *self.shape.shape) or kv.dtype != self.shape.dtype:
            raise ValueError(f"kv must be [{L}, {', '.join(map(str, self.shape.shape))}] {self.shape.dtype}, "
                             f"got {list(kv.shape)} {kv.dtype}")
        self._raise_failed_writes()
        one = torch.tensor([chunk_idx])                                          # one: [1]
        for layer in range(L):
            self._grow(layer, chunk_idx + 1)
        stored = [layer for layer in range(L) if int(self._tier[layer][chunk_idx]) >= 0]
        room = sum(t.num_free for t in self.tiers if t is not None) + len(stored)
        if room < L:
            raise CapacityError(f"KV store is full: {L} new chunks, room for {room} in GPU + host + disk; "
                                "raise --disk-mem (or --host-mem / --gpu-mem) or lower --ctx")
        for layer in stored:
            self._drop(layer, one)
        self._num.clamp_(min=chunk_idx + 1)
        for layer in range(L):
            self.policy.touch(layer, one, torch.zeros(1))                      # in layer order, as L puts would
        self._place_new(kv, torch.arange(L), one.expand(L).clone(), wait_kv)

    def _place_new(self, kv: torch.Tensor, layer_ids: torch.Tensor, ids: torch.Tensor, wait_kv: bool) -> None:
        """kv [n, 2, Hkv, C, D] become chunks ids [n] of layers layer_ids [n] (their table rows are free)."""
        n = kv.shape[0]
        free = [t.num_free if t is not None else 0 for t in self.tiers]
        layer = int(layer_ids[0]) if bool((layer_ids == layer_ids[0]).all()) else layer_ids
        mv = plan_put(self.policy, layer, ids, self._num, lambda: self._residents(GPU), free[GPU],
                      lambda: self._residents(HOST), free[HOST], free[DISK], self.gpu_headroom, self.host_headroom)
        fence = None
        if self._copy is not None:
            compute = torch.cuda.current_stream(self.device)
            fence = new_event(compute)
            self._copy.wait_stream(compute)       # copies follow the compute that produced kv / read slots
            if kv.is_cuda:
                kv.record_stream(self._copy)
        self._host_to_disk(mv.host_to_disk, fence)
        self._to_disk_staged(self.tiers[GPU].pool, mv.gpu_to_disk, None)
        self._move(GPU, mv.gpu_to_host, HOST)
        self._to_disk_staged(kv, mv.new_disk, (layer_ids, ids))
        self._new_into(HOST, kv, mv.new_host, layer_ids, ids)
        self._new_into(GPU, kv, mv.new_gpu, layer_ids, ids)
        nb = self.shape.nbytes
        moved_out = len(mv.gpu_to_host) + len(mv.gpu_to_disk) + len(mv.new_host) + len(mv.new_disk)
        self._stats["d2h_bytes"] += nb * moved_out
        self._stats["put_chunks"] += n
        if self._copy is not None and wait_kv:
            torch.cuda.current_stream(self.device).wait_event(new_event(self._copy))   # kv is consumed

    def adopt(self, layer: int, first_chunk_idx: int, extents) -> None:
        """Chunks first_chunk_idx.. of `layer` already lie in a file (tiers/attached.py FileExtents, one per
        chunk, this tier's slot layout): they go on the disk tier as they are, read in place, nothing written."""
        self._open_check()
        n = len(extents.offsets)
        if self.tiers[DISK] is None or self.packed is not None:
            raise ConfigError("only a bf16 disk tier reads chunks in place; load them with put()")
        ids = torch.arange(first_chunk_idx, first_chunk_idx + n)                # ids: [n]
        self._grow(layer, first_chunk_idx + n)
        if bool((self._tier[layer][ids] >= 0).any()):
            raise ValueError(f"layer {layer} already holds some of chunks {first_chunk_idx}..{first_chunk_idx + n - 1}")
        slots = self.tiers[DISK].alloc(n)
        self.tiers[DISK].adopt(slots, extents)
        self._num[layer] = max(int(self._num[layer]), first_chunk_idx + n)
        self.policy.touch(layer, ids, torch.zeros(n))                          # inserted: recency, no mass
        self._place(DISK, slots, torch.full((n,), layer, dtype=torch.long), ids)
        self._stats["adopted_chunks"] += n

    # ---- read, stats, close ---------------------------------------------------------------------
    def read(self, layer: int, chunk_idx_list) -> torch.Tensor:
        """Chunks as stored, from whatever tier: [n, 2, Hkv, C, D] on the host (waits for in-flight writes)."""
        ids = torch.as_tensor(list(chunk_idx_list), dtype=torch.long)           # ids: [n]
        out = torch.empty((ids.numel(), *self.shape.shape), dtype=self.shape.dtype)  # out: [n, 2, Hkv, C, D]

        def deliver(t, sel, tmp):
            out[sel] = tmp if t == GPU or self.packed is None else dequantize_chunks(tmp, self.packed, self.shape.dtype)

        self._read_slots(layer, ids, deliver)
        return out

    def stats(self) -> dict:
        s = dict(self._stats)
        decode = self.decode_counts()           # selections of decode plans, counted on the device
        hits = {name: s.get(f"hits_{name}", 0) + decode.get(name, 0) for name in TIER_NAMES}
        total = sum(hits.values())
        for t, name in enumerate(TIER_NAMES):
            s[f"hits_{name}"] = hits[name]
            s[f"hit_rate_{name}"] = hits[name] / total if total else 0.0
            used = 0 if self.tiers[t] is None else self.capacities[t] - self.tiers[t].num_free
            nb = (self.shape if t == GPU else self.cold_shape).nbytes
            s[f"bytes_in_use_{name}"] = used * nb
            s[f"capacity_bytes_{name}"] = self.capacities[t] * nb
            s[f"kv_dtype_{name}"] = "bf16" if t == GPU or self.packed is None else self.packed.kv_dtype
        for k in ("d2h_bytes", "h2d_bytes", "h2disk_bytes", "disk2h_bytes", "promoted_chunks", "promoted_hot_chunks",
                  "fetches", "put_chunks"):
            s.setdefault(k, 0)
        return s

    def close(self) -> None:
        """Finish in-flight copies and I/O, delete the disk files, unpin host memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._copy is not None:
            torch.cuda.synchronize(self.device)   # no kernel may still read the slab through UVA once unpinned
        if self.tiers[DISK] is not None:
            self.tiers[DISK].close()
        for pool in (self.tiers[HOST], self._ring):
            if pool is not None:
                pool.close()
        self.tiers[GPU] = None

    def _open_check(self) -> None:
        if self._closed:
            raise ValueError("this TieredKVStore is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

