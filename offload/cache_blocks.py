"""What a prompt cache saves of a session (offload/prompt_cache.py): its KV as the file's blocks, bf16 or packed as
the session holds them, with the sparse index's rows, and the file layout that fits them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from offload.errors import SessionFileError
from offload.kvfile import KVFileWriter, Layout
from offload.progress import progress_bar

PROGRESS_BYTES = 1 << 30          # a save or resume of this many bytes or more shows progress on stderr
BACKGROUND_BYTES = 4 << 30        # a checkpoint up to this size is written while the prefill goes on (held in RAM)
BACKGROUND_DEVICES = ("cuda",)    # on the CPU the checkpoint's checksums would take the prefill's cores


def note(message: str) -> None:
    """One unwrapped line on stderr (rich would wrap it at the terminal width)."""
    print(message, file=sys.stderr, flush=True)


def read_range(attn, layer: int, start: int, end: int):
    """K, V of committed tokens [start, end) of a layer: [Hkv, end-start, D] each. A checkpoint needs only the
    tokens since the last one; a tiered backend's read_kv would read the whole layer from its tiers each time."""
    if hasattr(attn, "read_kv_range"):
        return attn.read_kv_range(layer, start, end)
    store, C, n = getattr(attn, "store", None), getattr(attn, "C", None), getattr(attn, "n_chunks", None)
    if store is not None and hasattr(store, "read") and C and n is not None and hasattr(attn, "tail_k"):
        c0 = min(start // C, n)
        parts = []
        if c0 < n:
            ch = store.read(layer, range(c0, n))  # ch: [m, 2, Hkv, C, D] (host)
            parts.append(ch.permute(1, 2, 0, 3, 4).reshape(2, ch.shape[2], (n - c0) * C, ch.shape[4]))
        tail = torch.stack([attn.tail_k[layer, :, :attn.tail_len], attn.tail_v[layer, :, :attn.tail_len]])
        parts.append(tail.cpu())  # [2, Hkv, tail, D]
        kv = torch.cat(parts, 2)[:, :, start - c0 * C:end - c0 * C]  # kv: [2, Hkv, end-start, D]
        return kv[0], kv[1]
    k, v = attn.read_kv(layer)
    return k[:, start:end], v[:, start:end]


def read_session_blocks(attn, layer: int, b0: int, b1: int, n: int, C: int):
    """Blocks b0..b1-1 (C tokens each) of a layer for a commit of n tokens, as the session holds them:
    (StoredChunks, index rows or None). A tiered store gives its chunks as stored (packed where packed), the
    tail is the last block; any other backend gives bf16 KV."""
    from offload.tiers.base import to_chunks
    from offload.tiers.cold import StoredChunks
    store = getattr(attn, "store", None)
    if store is None or not hasattr(store, "read_stored") or getattr(attn, "C", None) != C:
        k, v = read_range(attn, layer, b0 * C, min(n, b1 * C))                 # k, v: [Hkv, <= (b1-b0)*C, D]
        pad = (b1 - b0) * C - k.shape[1]
        k, v = (torch.nn.functional.pad(x.cpu(), (0, 0, 0, pad)) for x in (k, v))
        raw = to_chunks(k, v, C)                                                # raw: [m, 2, Hkv, C, D]
        return StoredChunks(torch.zeros(b1 - b0, dtype=torch.bool), raw, None), None
    full = max(0, min(b1, attn.n_chunks) - b0)
    st = store.read_stored(layer, range(b0, b0 + full))
    R = attn.selector.row_bytes()
    rows = (attn.selector.export_rows(layer, b0, full) if full else torch.zeros(0, R, dtype=torch.uint8)
            ) if R else None                                                    # rows: [full, R]
    if full == b1 - b0:
        return st, rows
    tail = torch.zeros(1, *store.shape.shape, dtype=store.shape.dtype)          # tail: [1, 2, Hkv, C, D]
    t = attn.tail_len
    tail[0, 0, :, :t], tail[0, 1, :, :t] = attn.tail_k[layer, :, :t].cpu(), attn.tail_v[layer, :, :t].cpu()
    cold = None if st.cold is None else torch.cat([st.cold, st.cold.new_zeros(1, st.cold.shape[1])])
    if rows is not None:
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    return StoredChunks(torch.cat([st.packed, torch.zeros(1, dtype=torch.bool)]), torch.cat([st.raw, tail]),
                        cold), rows


def session_layout(sess, C: int, capacity: int) -> Layout:
    """The file layout of this session's KV: bf16 blocks, packed blocks when compressed, and the sparse index's
    rows when its index exports them (a resume then imports the index instead of reading every key)."""
    mc = sess.llm.model_config
    store, attn = getattr(sess.attn, "store", None), sess.attn
    extra = {}
    if store is not None and hasattr(store, "read_stored") and getattr(attn, "C", None) == C:
        extra["row_bytes"] = attn.selector.row_bytes() if attn.selector.sparse else 0
        if store.packed is not None:
            extra.update(kv_dtype=store.packed.kv_dtype, packed_bytes=store.cold_shape.nbytes)
    return Layout(mc.num_layers, mc.num_kv_heads, mc.head_dim, str(sess.llm.model.dtype).replace("torch.", ""), C,
                  capacity, mc.vocab_size, **extra)


class CacheSaver:
    """Commits of one prompt to its cache file; a failed write turns saving off for the run (one line)."""

    def __init__(self, path: Path, writer: KVFileWriter | None, sess, ids: list[int]):
        self.path, self.writer, self.sess, self.ids = path, writer, sess, ids

    @property
    def n(self) -> int:
        """Tokens committed (once a background checkpoint in flight has ended)."""
        self._settle()
        return self.writer.n if self.writer is not None else 0

    def _settle(self) -> None:
        try:
            if self.writer is not None:
                self.writer.wait()
        except Exception as e:   # noqa: BLE001  (a background commit's failure, whatever it was: one line)
            self._failed(e)

    def _failed(self, e) -> None:
        note(f"prompt cache {self.path}: cannot save ({getattr(e, 'strerror', None) or e}); continuing without it "
             "(any older cache is kept)")
        self.close()

    def commit(self, n: int, logits: torch.Tensor, background: bool = False) -> bool:
        """Commit tokens[:n]. background (a checkpoint mid-prefill): the blocks are read now, written while the
        prefill goes on, when the session is on a GPU (the CPU's cores are the prefill's) and they fit in
        BACKGROUND_BYTES of memory (else written at once); the next commit or close waits for it."""
        self._settle()
        if self.writer is None or n <= self.writer.n:
            return False
        try:
            need = self.writer.bytes_to_commit(n) + (1 << 20)
            st = os.statvfs(self.path.parent)
            if st.f_bavail * st.f_frsize < need:
                raise OSError(28, f"{need / 2**30:.2f} GiB needed, {st.f_bavail * st.f_frsize / 2**30:.2f} GiB free")
            C, layers = self.writer.layout.block_tokens, self.writer.layout.layers
            show = self.sess.llm.show_progress if need >= PROGRESS_BYTES else False
            background = background and self.sess.llm.model.device.type in BACKGROUND_DEVICES
            with progress_bar(f"saving {self.path.name} ({n} tokens, layers)", layers, show=show) as up:
                self.writer.commit(n, self.ids, logits,
                                   lambda layer, b0, b1: read_session_blocks(self.sess.attn, layer, b0, b1, n, C),
                                   on_layer=up, background=background, max_held=BACKGROUND_BYTES)
            return True
        except (OSError, SessionFileError, ValueError, MemoryError) as e:
            self._failed(e)
            return False

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
