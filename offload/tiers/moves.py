"""How put() carries out a placement decision: the copies, in an order that never overwrites a slot early.

Order within one put: host -> disk demotions (straight from the slab), GPU -> disk (through the pinned
staging ring), GPU -> host, then the new chunks to disk, host and GPU. Every destination slot first
waits for whatever still fills or reads it (see sync.py); every source slot records the operation
that reads it, so its next owner waits in turn.
"""
from __future__ import annotations

import contextlib

import torch

from offload.kernels.quant import quantize_chunks
from offload.tiers.placement import DISK, GPU, HOST
from offload.tiers.slots import paired_runs, pieces, runs
from offload.tiers.sync import new_event, stream_wait

_DISK_PIECE_BYTES = 8 << 20      # host -> disk demotions: one write (and one completion handle) per piece


def _storage(tier) -> torch.Tensor:
    return tier.pool if tier.name == "gpu" else tier.slab


class MovesMixin:
    def _cold(self, kv: torch.Tensor) -> torch.Tensor:
        """kv [n, 2, Hkv, C, D] as a host/disk slot holds it: packed when kv_dtype is int8/int4 (on kv's device)."""
        return kv if self.packed is None else quantize_chunks(kv, self.packed)   # [n, 2, Hkv, C, D] or [n, B]

    def _copy_scope(self):
        return torch.cuda.stream(self._copy) if self._copy is not None else contextlib.nullcontext()

    def _drop(self, layer: int, ids: torch.Tensor) -> None:
        """Overwrite: free the slots of ids already stored."""
        tiers = self._tier[layer][ids]
        for t in (GPU, HOST, DISK):
            sel = tiers == t
            if bool(sel.any()):
                slots = self._slot[layer][ids[sel]].tolist()
                stream_wait(None, self._state[t].writers_wait(slots))
                self._vacate(t, slots)
                self._tier[layer][ids[sel]] = -1
                self._version += 1

    def _host_to_disk(self, host_slots: list[int], fence) -> None:
        if not host_slots:
            return
        disk, slab = self.tiers[DISK], self.tiers[HOST].slab
        order = sorted(host_slots)
        dslots = disk.alloc(len(order))
        piece = max(1, _DISK_PIECE_BYTES // self.cold_shape.nbytes)
        # one write per piece, each with its own future: a host slot freed here is reused (by this put or the next)
        # as soon as ITS piece is on the drive, not when the whole demotion is, so the drive writes behind the puts
        for h0, d0, n in pieces(paired_runs(order, dslots), piece):
            hs, ds = list(range(h0, h0 + n)), list(range(d0, d0 + n))
            after = self._state[HOST].readers_wait(hs) + self._state[DISK].writers_wait(ds) + [fence]
            fut = disk.write(ds, slab[h0:h0 + n], after=after)                   # slab rows: [n, 2, Hkv, C, D]
            self._writes.append(fut)
            self._state[DISK].filled_by(ds, fut)
            self._state[HOST].drained_by(hs, fut)
            layers, chunks = self._vacate(HOST, hs)
            self._place(DISK, ds, layers, chunks)
        self._stats["h2disk_bytes"] += len(order) * self.cold_shape.nbytes

    def _to_disk_staged(self, src: torch.Tensor, rows: list[int], new: tuple | None) -> None:
        """Write src[rows] to disk through the pinned staging ring. new=None: rows are GPU slots (demotion)."""
        disk, per = self.tiers[DISK], self._ring_per
        for lo in range(0, len(rows), per):
            part = rows[lo:lo + per]
            b = self._ring_next
            self._ring_next = (b + 1) % len(self._ring_busy)
            stream_wait(None, [self._ring_busy[b]])          # the ring buffer's previous disk write is done
            stage = self._ring.slab[b * per:b * per + len(part)]                # stage: [m, 2, Hkv, C, D]
            if new is None:
                stream_wait(self._copy, self._state[GPU].readers_wait(part))
            with self._copy_scope():
                for pos, row, n in runs(part):
                    stage[pos:pos + n].copy_(self._cold(src[row:row + n]), non_blocking=self._copy is not None)
            ev = new_event(self._copy)
            ds = disk.alloc(len(part))
            fut = disk.write(ds, stage, after=[ev] + self._state[DISK].writers_wait(ds))
            self._ring_busy[b] = fut
            self._writes.append(fut)
            self._state[DISK].filled_by(ds, fut)
            if new is None:
                self._state[GPU].drained_by(part, ev)
                layers, chunks = self._vacate(GPU, part)
            else:
                idx = torch.tensor(part, dtype=torch.long)                       # idx: [m]
                layers, chunks = new[0][idx], new[1][idx]
            self._place(DISK, ds, layers, chunks)
            self._stats["h2disk_bytes"] += len(part) * self.cold_shape.nbytes

    def _move(self, src_tier: int, src_slots: list[int], dst_tier: int) -> None:
        """Copy resident chunks between the GPU and host tiers (on the copy stream) and retarget the table."""
        if not src_slots:
            return
        order = sorted(src_slots)
        dst = self.tiers[dst_tier].alloc(len(order))
        stream_wait(self._copy, self._state[dst_tier].writers_wait(dst) + self._state[src_tier].readers_wait(order))
        if self.packed is not None and dst_tier == GPU:
            raise NotImplementedError("promotion of packed host chunks to the GPU pool")   # put() never asks
        src_t, dst_t = _storage(self.tiers[src_tier]), _storage(self.tiers[dst_tier])
        cold = self._cold if src_tier == GPU and dst_tier != GPU else (lambda x: x)
        with self._copy_scope():
            for s0, d0, n in paired_runs(order, dst):
                dst_t[d0:d0 + n].copy_(cold(src_t[s0:s0 + n]), non_blocking=self._copy is not None)  # [n, ...]
        ev = new_event(self._copy)
        self._state[dst_tier].filled_by(dst, ev)
        self._state[src_tier].drained_by(order, ev)
        layers, chunks = self._vacate(src_tier, order)
        self._place(dst_tier, dst, layers, chunks)

    def _new_into(self, tier: int, kv: torch.Tensor, rows: list[int], layers: torch.Tensor, ids: torch.Tensor) -> None:
        if not rows:
            return
        slots = self.tiers[tier].alloc(len(rows))
        stream_wait(self._copy, self._state[tier].writers_wait(slots))
        ev = None
        for pos, row, n in runs(rows):
            with self._copy_scope():              # quantized on the copy stream, which follows kv's producer
                src = kv[row:row + n] if tier == GPU else self._cold(kv[row:row + n])
            ev = self.tiers[tier].write(slots[pos:pos + n], src, stream=self._copy) or ev
        self._state[tier].filled_by(slots, ev)
        idx = torch.tensor(rows, dtype=torch.long)                               # idx: [m]
        self._place(tier, slots, layers[idx], ids[idx])

    def _raise_failed_writes(self) -> None:
        """Surface a failed asynchronous disk write (disk full, EIO) at the next put, once."""
        failed = next((f for f in self._writes if f.done() and f.exception() is not None), None)
        self._writes = [f for f in self._writes if not f.done()]
        if failed is not None:
            raise failed.exception()
