"""Prefill staging: one layer's KV on the device while a long forward runs, bounded whatever the context.

A long forward runs layer by layer (engine/runner.py). For the layer in progress the stage keeps a window of
tokens [s0, off) on the device: the newest history that fits, the tail, and the new tokens so far. Keys before
s0 sit in the store and are streamed in blocks (`store.read_device`, one block ahead on a side stream) and
merged exactly by log-sum-exp. When the window is full its full chunks go to the store (and the layer's index)
and it slides, so the device holds at most `cap` tokens of one layer: 1M tokens of one 8B layer are 4 GiB of
K and V, which do not fit beside 16 GiB of weights on a 24 GiB card. While the whole history fits (s0 = 0)
nothing streams and the result is the plain causal attention of before.
"""
from __future__ import annotations

import torch

from offload.engine.ops import attend_lse, causal_attend, causal_attend_lse, merge_lse
from offload.engine.sparse_prefill import sparse_causal_attend, sparse_causal_attend_lse, streamed_chunks
from offload.tiers.base import to_chunks


class PrefillStage:
    """The window of one layer at a time. open(layer, ...) -> attend(q, k, v) per forward chunk -> close()."""

    def __init__(self, store, selector, cap_tokens: int, block_tokens: int):
        self.store, self.selector, self.C = store, selector, selector.C
        self.cap = max(cap_tokens // self.C, 4) * self.C                   # window tokens, whole chunks
        self.block = max(block_tokens // self.C, 1)                        # chunks per streamed block
        self.layer = None
        self.k = self.v = None                                             # window: [Hkv, len, D] each
        self.s0 = self.off = self.stored = 0
        cuda = store.device.type == "cuda"
        self._side = torch.cuda.Stream(store.device) if cuda else None
        self.streamed_tokens = 0                                           # history keys read per chunk, summed

    # ---- window --------------------------------------------------------------------------------
    def open(self, layer: int, n_chunks: int, length: int, tail_k: torch.Tensor, tail_v: torch.Tensor,
             new: int) -> None:
        """Start `layer`: history = n_chunks stored chunks + tail_k/v [Hkv, length - n_chunks*C, D]."""
        C, hist = self.C, n_chunks * self.C
        size = min(self.cap, length + new)
        if self.k is None or self.k.shape[1] != size:
            self.k = self.v = None                                         # free the old window first
            self.k = torch.empty(tail_k.shape[0], size, tail_k.shape[2], device=tail_k.device,
                                 dtype=tail_k.dtype)                       # k: [Hkv, size, D]
            self.v = torch.empty_like(self.k)                              # v: [Hkv, size, D]
        # all of the history when it fits with the new tokens, else the newest half window of it
        keep = hist if length + new <= size else min(hist, (size // 2 - (length - hist)) // C * C)
        self.layer, self.s0, self.off, self.stored = layer, hist - max(keep, 0), length, hist
        for a in range(self.s0 // C, n_chunks, self.block):                # bounded temporaries
            b = min(a + self.block, n_chunks)
            k, v = self.store.read_device(layer, range(a, b), ordered=True)  # k, v: [Hkv, (b-a)*C, D]
            self.k[:, a * C - self.s0:b * C - self.s0], self.v[:, a * C - self.s0:b * C - self.s0] = k, v
        w = hist - self.s0
        self.k[:, w:length - self.s0], self.v[:, w:length - self.s0] = tail_k, tail_v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sparse=None, stats=None) -> torch.Tensor:
        """q: [Hq, T, D], k/v: [Hkv, T, D] at positions off.. -> o: [Hq, T, D] over every key up to them."""
        w = self.append(k, v) - self.s0
        kw, vw = self.k[:, :self.off - self.s0], self.v[:, :self.off - self.s0]  # [Hkv, w + T, D]
        if not self.s0:             # the whole history is in the window: no merge needed
            if sparse is not None:  # opt-in, lossy: block-sparse history (engine/sparse_prefill.py)
                return sparse_causal_attend(q, kw, vw, w, sparse, stats)  # [Hq, T, D]
            return causal_attend(q, kw, vw, w)  # [Hq, T, D]
        if sparse is not None:
            o, lse = sparse_causal_attend_lse(q, kw, vw, w, sparse, stats)
        else:
            o, lse = causal_attend_lse(q, kw, vw, w)                       # o: [Hq, T, D], lse: [Hq, T]
        ids = None
        if sparse is not None and sparse.stream_tokens and self.selector.sparse:   # opt-in, lossy
            n = self.s0 // self.C
            ids = streamed_chunks(q, self.selector.indexes[self.layer], n, self.C, self.selector.n_sink, sparse)
            if stats is not None:
                stats.streamed_kept += ids.numel()
                stats.streamed_total += n
        return self._streamed(q, o, lse, ids)[0].to(q.dtype)  # [Hq, T, D]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Write k/v [Hkv, T, D] at position off (sliding the window first if full); returns their position."""
        T = k.shape[1]
        if self.off + T - self.s0 > self.k.shape[1]:
            if 2 * T > self.k.shape[1]:       # a forward chunk larger than half the window: widen it
                self._widen(-(-(2 * T + self.C) // self.C) * self.C)
            if self.off + T - self.s0 > self.k.shape[1]:
                self._slide(T)
        w = self.off - self.s0
        self.k[:, w:w + T], self.v[:, w:w + T] = k, v
        self.off += T
        return self.off - T

    def close(self) -> tuple[int, int, torch.Tensor, torch.Tensor]:
        """Store the layer's new full chunks; returns (full chunks, tail tokens, tail k, tail v [Hkv, rest, D])."""
        self._store_upto(self.off // self.C * self.C)
        n_full = self.off // self.C
        a = n_full * self.C - self.s0
        out = (n_full, self.off - n_full * self.C, self.k[:, a:self.off - self.s0], self.v[:, a:self.off - self.s0])
        self.layer = None
        return out

    def release(self) -> None:
        self.k = self.v = None

    # ---- internals -----------------------------------------------------------------------------
    def _store_upto(self, end: int) -> None:
        """Tokens [stored, end) of the window (whole chunks) -> store + index."""
        if end <= self.stored:
            return
        C, layer = self.C, self.layer
        step = max(1, (32 << 20) // (2 * self.k[:, :C].numel() * self.k.element_size()))  # ~32 MiB a put
        for s in range(self.stored, end, step * C):
            e = min(end, s + step * C)
            kk, vv = self.k[:, s - self.s0:e - self.s0], self.v[:, s - self.s0:e - self.s0]  # [Hkv, e-s, D]
            self.store.put(layer, s // C, to_chunks(kk, vv, C))
        self.selector.index_chunks(layer, self.stored // C, self.k[:, self.stored - self.s0:end - self.s0])
        self.stored = end

    def _widen(self, size: int) -> None:
        n = self.off - self.s0
        k = torch.empty(self.k.shape[0], size, self.k.shape[2], device=self.k.device, dtype=self.k.dtype)  # [Hkv, size, D]
        v = torch.empty_like(k)                                            # v: [Hkv, size, D]
        k[:, :n], v[:, :n] = self.k[:, :n], self.v[:, :n]
        self.k, self.v = k, v

    def _slide(self, T: int) -> None:
        """Window full: store its full chunks, keep its newest half (whole chunks), make room for T tokens."""
        C, size = self.C, self.k.shape[1]
        end = self.off // C * C
        self._store_upto(end)
        new_s0 = max(self.s0, min(end, -(-(self.off - size // 2) // C) * C))   # keep <= half a window
        d, n = new_s0 - self.s0, self.off - new_s0
        if d < n:                       # overlapping move: through a temporary (rare: only for tiny windows)
            self.k[:, :n], self.v[:, :n] = self.k[:, d:d + n].clone(), self.v[:, d:d + n].clone()
        else:
            self.k[:, :n].copy_(self.k[:, d:d + n])
            self.v[:, :n].copy_(self.v[:, d:d + n])
        self.s0 = new_s0

    def _streamed(self, q: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, ids: torch.Tensor | None = None):
        """Merge in the attention over stored chunks [0, s0/C) (or just `ids` among them), read block by block,
        one block ahead."""
        n, layer = self.s0 // self.C, self.layer
        ids = torch.arange(n) if ids is None else ids                      # ids: [K] sorted
        blocks = [ids[a:a + self.block] for a in range(0, ids.numel(), self.block)]
        if not blocks:
            return o, lse
        nxt = self._read(layer, blocks[0])
        for i in range(len(blocks)):
            kb, vb, ready = nxt
            if i + 1 < len(blocks):
                nxt = self._read(layer, blocks[i + 1])
            if ready is not None:
                torch.cuda.current_stream(q.device).wait_event(ready)
            o, lse = merge_lse(o, lse, *attend_lse(q, kb, vb, causal=False))  # o: [Hq, T, D] f32
        self.streamed_tokens += ids.numel() * self.C
        return o, lse

    def _read(self, layer: int, ids: torch.Tensor):
        """Chunks ids of layer -> (k, v [Hkv, len(ids)*C, D], event or None), read on the side stream."""
        if self._side is None:
            return (*self.store.read_device(layer, ids), None)
        compute = torch.cuda.current_stream(self.store.device)
        self._side.wait_stream(compute)               # puts and window writes queued so far come first
        with torch.cuda.stream(self._side):
            k, v = self.store.read_device(layer, ids)                      # k, v: [Hkv, len(ids)*C, D]
            ready = torch.cuda.Event()
            ready.record(self._side)
        k.record_stream(compute)
        v.record_stream(compute)
        return k, v, ready

