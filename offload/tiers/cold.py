"""Chunks as a host or disk slot holds them, in and out without re-quantizing.

A compressed (int8 / int4) store keeps GPU chunks in bf16 and host / disk chunks packed. A prompt cache of
such a session saves each chunk in the form it has (offload/prompt_cache.py): packed bytes where it is packed,
bf16 where it is not. Saving dequantized bf16 instead would be 4x the bytes (128 GiB at 1M tokens) and a
resume would quantize the dequantized values again, which need not give the same bytes back. Here:
    stored = store.read_stored(layer, ids)      # StoredChunks: which are packed, their bytes, the rest in bf16
    store.put_cold(layer, first, packed_bytes)  # packed chunks straight into host (then disk) slots
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from offload.errors import ConfigError
from offload.tiers.placement import DISK, GPU, HOST
from offload.tiers.sync import stream_wait


@dataclass(frozen=True)
class StoredChunks:
    packed: torch.Tensor              # bool [n]: chunk i is in cold[i] (packed bytes), else in raw[i]
    raw: torch.Tensor                 # [n, 2, Hkv, C, D] host; rows of packed chunks are undefined
    cold: torch.Tensor | None         # [n, B] uint8 host, rows of raw chunks undefined; None for a bf16 store


class ColdMixin:
    def _read_slots(self, layer: int, ids: torch.Tensor, deliver, into=None) -> None:
        """Read chunks ids [n] of a layer from their tiers; deliver(tier, rows [m], tmp) gets each tier's part
        as its slots hold it (bf16 chunks from the GPU, cold slots from host and disk). into(tier, rows) may
        give the contiguous tensor to read that part into (None: a fresh one)."""
        self._open_check()
        tiers, slots = self._lookup(layer, ids)
        for t in (GPU, HOST, DISK):
            sel = torch.nonzero(tiers == t).flatten()                           # sel: [m]
            if not sel.numel():
                continue
            ss = slots[sel].tolist()
            slot_shape = self.shape if t == GPU else self.cold_shape
            tmp = into(t, sel) if into is not None else None
            if tmp is None:
                tmp = torch.empty((len(ss), *slot_shape.shape), dtype=slot_shape.dtype)  # tmp: [m, 2, Hkv, C, D] or [m, B]
            wait = self._state[t].readers_wait(ss)
            if t == DISK:
                self.tiers[DISK].read(ss, tmp, after=wait).result()
            else:
                stream_wait(None, wait)
                ev = self.tiers[t].read(ss, tmp, stream=self._copy)
                if ev is not None:
                    ev.synchronize()
            deliver(t, sel, tmp)

    def read_stored(self, layer: int, chunk_idx_list) -> StoredChunks:
        """Chunks as stored: packed bytes for packed host / disk chunks, bf16 for the rest (waits for writes)."""
        ids = torch.as_tensor(chunk_idx_list, dtype=torch.long).flatten()       # ids: [n]
        n = ids.numel()
        # empty, not zeros: a compressed store's raw rows are mostly unused, and untouched pages cost nothing
        raw = torch.empty((n, *self.shape.shape), dtype=self.shape.dtype)      # raw: [n, 2, Hkv, C, D]
        packed = torch.zeros(n, dtype=torch.bool)                               # packed: [n]
        cold = (None if self.packed is None else
                torch.empty((n, *self.cold_shape.shape), dtype=self.cold_shape.dtype))  # cold: [n, B]

        def dest(t):
            return raw if t == GPU or cold is None else cold

        def into(t, sel):       # a run of rows (a layer's packed middle, its GPU ends): read straight into place
            a, b = int(sel[0]), int(sel[-1]) + 1
            return dest(t)[a:b] if b - a == sel.numel() else None

        def deliver(t, sel, tmp):
            out = dest(t)
            if tmp.data_ptr() != out[int(sel[0])].data_ptr():
                out[sel] = tmp
            if out is cold:
                packed[sel] = True

        self._read_slots(layer, ids, deliver, into)
        return StoredChunks(packed, raw, cold)

    def put_cold(self, layer: int, first_chunk_idx: int, cold: torch.Tensor) -> None:
        """Packed chunks cold [n, B] (host, as read_stored gave them) become chunks first_chunk_idx.. of `layer`,
        byte for byte, in host slots and then disk slots. They stay off the GPU until the policy promotes them
        (a chunk is packed only after it left the GPU pool, so this is where it was)."""
        self._open_check()
        if self.packed is None:
            raise ConfigError("put_cold stores packed chunks; this store keeps bf16 KV (use put)")
        n = self._batch("cold", cold, self.cold_shape)
        if n == 0:
            return
        ids = self._admit(layer, first_chunk_idx, n, (HOST, DISK), "packed",
                          "raise --host-mem or --disk-mem, or lower --ctx")
        host, disk = self.tiers[HOST], self.tiers[DISK]
        layers = torch.full((n,), layer, dtype=torch.long)                      # layers: [n]
        nh = min(n, host.num_free)
        if nh:
            slots = host.alloc(nh)
            stream_wait(self._copy, self._state[HOST].writers_wait(slots))
            ev = host.write(slots, cold[:nh], stream=self._copy)
            self._state[HOST].filled_by(slots, ev)
            self._place(HOST, slots, layers[:nh], ids[:nh])
        if nh < n:
            ds = disk.alloc(n - nh)
            fut = disk.write(ds, cold[nh:].contiguous(), after=self._state[DISK].writers_wait(ds))
            self._writes.append(fut)
            self._state[DISK].filled_by(ds, fut)
            self._place(DISK, ds, layers[nh:], ids[nh:])
            self._stats["h2disk_bytes"] += (n - nh) * self.cold_shape.nbytes
        self._stats["put_chunks"] += n
