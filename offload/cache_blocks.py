"""What a prompt cache saves of a session (offload/prompt_cache.py): its KV as the file's blocks, bf16 or packed as
the session holds them, with the sparse index's rows, and the file layout that fits them."""
from __future__ import annotations

import torch

from offload.kvfile import Layout


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
