"""Bulk reads of a layer's stored chunks onto the compute device, for prefill attention over history.

`read_device(layer, ids)` returns the chunks' K and V as [Hkv, n*C, D] tensors on the compute device, in the
model's dtype: GPU-pool chunks are gathered from the pool, host chunks straight from the pinned slab through
UVA (packed int8/int4 slots are dequantized in registers, so only the packed bytes cross PCIe), drive chunks
are read (CRC-verified) into pinned memory first. Keys come grouped by tier unless asked in id order: attention
over a set of keys does not depend on their order (RoPE is already in the keys). Bit-identical to `read`.
"""
from __future__ import annotations

import torch

from offload.kernels.quant import dequantize_chunks, gather_rows_q
from offload.tiers.base import from_chunks
from offload.tiers.device import to_device
from offload.tiers.placement import DISK, GPU, HOST
from offload.tiers.slots import runs
from offload.tiers.sync import stream_wait


def _copy_runs(slab: torch.Tensor, slots: list[int], device: torch.device):
    """Host slots -> a device copy of just those slots, made by the copy engines (no SM time, unlike a UVA read,
    so it overlaps attention fully), and their new slot numbers 0..m-1. Prefill writes a layer's chunks in
    order, so its slots come in a few long runs: one DMA each. None when the slots are scattered."""
    spans = runs(slots)                                                        # (position, first slot, count)
    if len(spans) > max(8, len(slots) // 16):
        return None                     # scattered slots (after decode moved chunks): a UVA gather is cheaper
    out = torch.empty((len(slots), *slab.shape[1:]), dtype=slab.dtype, device=device)  # out: [m, ...]
    for at, first, n in spans:
        out[at:at + n].copy_(slab[first:first + n], non_blocking=True)
    return out, torch.arange(len(slots))


class StreamMixin:
    # packed (int8/int4) host chunks reach the device by DMA of their slots' runs (True) or by a UVA gather in
    # place (False); bench/prefill_stream.py measures both
    stream_copy: bool = True

    def read_device(self, layer: int, chunk_ids, ordered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunks `chunk_ids` of `layer` -> (k, v), each [Hkv, n*C, D] on the compute device, grouped by tier
        (ordered=True: in chunk_ids' order, one more copy when the chunks span tiers).

        Runs on the current stream (a caller may put it on a side stream to overlap compute); waits only for
        in-flight writes of the slots it reads."""
        self._open_check()
        ids = (chunk_ids.to(torch.long) if isinstance(chunk_ids, torch.Tensor)   # list() of a tensor costs ~1 us an id
               else torch.as_tensor(list(chunk_ids), dtype=torch.long))         # ids: [n]
        tiers, slots = self._lookup(layer, ids)                                 # [n] each
        stream = torch.cuda.current_stream(self.device) if self._copy is not None else None
        ks, vs, groups = [], [], []
        for t in (GPU, HOST, DISK):
            sel = slots[tiers == t]                                             # sel: [m]
            if not sel.numel():
                continue
            ss = sel.tolist()
            if t == DISK:
                buf = torch.empty((len(ss), *self.cold_shape.shape), dtype=self.cold_shape.dtype,
                                  pin_memory=stream is not None)                # buf: [m, 2, Hkv, C, D] or [m, B]
                self.tiers[DISK].read(ss, buf, after=self._state[DISK].readers_wait(ss)).result()
                self._stats["disk2h_bytes"] += buf.numel() * buf.element_size()
                dev = buf.to(self.device, non_blocking=True)
                chunks = dev if self.packed is None else dequantize_chunks(dev, self.packed, self.shape.dtype)
                k, v = from_chunks(chunks)                                      # k, v: [Hkv, m*C, D]
            else:
                stream_wait(stream, self._state[t].readers_wait(ss))
                pool = self.tiers[t].pool if t == GPU else self.tiers[t].slab
                fmt = self.packed if t == HOST else None
                copied = None
                # packed slots only: a bf16 copy would double the block's device bytes beyond what the planner holds
                if t == HOST and stream is not None and self.stream_copy and self.packed is not None:
                    copied = _copy_runs(pool, ss, self.device)                  # ([m, ...] on the device, 0..m-1)
                    if copied is not None:
                        pool, sel = copied
                st = sel.to(torch.int32).expand(self.shape.num_kv_heads, -1).contiguous()  # st: [Hkv, m]
                st = to_device(st, self.device)   # pinned, queued: a pageable copy would sync the stream
                k = gather_rows_q(pool, st, 0, fmt=fmt, dtype=self.shape.dtype)  # k: [Hkv, m*C, D]
                v = gather_rows_q(pool, st, 1, fmt=fmt, dtype=self.shape.dtype)  # v: [Hkv, m*C, D]
                if t == HOST:
                    self._stats["h2d_stream_bytes" if copied is not None else "uva_bytes"] += len(ss) * self.cold_shape.nbytes
            ks.append(k.to(self.device, self.shape.dtype))
            vs.append(v.to(self.device, self.shape.dtype))
            groups.append(torch.nonzero(tiers == t).flatten())                # positions in chunk_ids: [m]
        if len(ks) == 1:
            return ks[0], vs[0]
        k, v = torch.cat(ks, 1), torch.cat(vs, 1)                               # [Hkv, n*C, D] each
        if ordered:
            inv = to_device(torch.argsort(torch.cat(groups)), self.device)     # inv: [n] output chunk per id
            hkv, _, d = k.shape
            k = k.view(hkv, -1, self.shape.chunk_tokens, d).index_select(1, inv).view(hkv, -1, d)
            v = v.view(hkv, -1, self.shape.chunk_tokens, d).index_select(1, inv).view(hkv, -1, d)
        return k, v
