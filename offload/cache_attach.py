"""Resume a prompt cache into a tiered session with its cold KV read in place: the cache file becomes part of
the disk tier instead of being copied into it (issue 11: a 1M-token cache is 128 GiB).

    why_not = attachable(sess.attn, reader)        # None, or why this session copies the KV in instead
    info = attach(sess.attn, reader, fix)          # -> Attached (what was read eagerly, what stays in place)
    info = attach_packed(sess.attn, reader)        # a compressed session: packed blocks + index rows, all read

Policy (here): per layer, the sink blocks and as many of the newest blocks as the GPU and host tiers have
room for are read eagerly (CRC-checked) and put into the store, which places them as it places any put;
the partial last block becomes the tail; every other block is adopted by the disk tier where it lies
(TieredKVStore.adopt -> DiskStore.adopt: offsets and CRCs from the file's table, verified on every read,
so a corrupt block is a TierIOError at its first read, never wrong KV). A sparse session's chunk index
needs every key: the K halves of the in-place blocks are read once to build it (each checked against the
file's key CRC table; the V halves stay unread), and still nothing is written anywhere.
Mechanism lives in KVFileReader (the file) and the store / disk tier (adopt, put).

The attached file must stay intact while the session reads it. Checkpoints of a resumed session only ever
append (offload.kvfile: blocks past the committed ones, the other logits slot and record; committed bytes
are never rewritten), and a cache that is replaced is written to a new file and renamed over the old name,
which leaves the inode the disk tier holds open, and so these reads, untouched.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from offload.tiers.slots import flag_runs

_GROUP_BYTES = 64 << 20      # blocks read and put at a time
_THREADS = min(8, os.cpu_count() or 1)   # groups read + CRC-checked in parallel
_AHEAD = 2 * _THREADS        # groups in flight (memory: _AHEAD x 64 MiB)


@dataclass(frozen=True)
class Attached:
    tokens: int
    eager_bytes: int         # block bytes read from the cache before the session answers
    in_place_bytes: int      # block bytes left in the cache file, read by the disk tier when attention needs them
    index_bytes: int         # bytes read for a sparse index: its saved rows, else the K halves of in-place blocks


def attachable(attn, reader) -> str | None:
    """None when this session's disk tier can read the cache's blocks in place, else why not."""
    store = getattr(attn, "store", None)
    if store is None or not hasattr(store, "adopt") or not hasattr(attn, "tail_k"):
        return "this attention backend keeps its KV in memory"
    if store.tiers[2] is None:
        return "the session has no disk tier"
    if store.packed is not None:
        return "the disk tier holds compressed KV"
    lay = reader.layout
    if lay.block_tokens != attn.C or lay.block_bytes != store.cold_shape.nbytes or lay.stride != store.tiers[2].stride:
        return "the cache's blocks are not this session's chunks"
    return None


def eager_blocks(n_full: int, layers: int, room: int, sink: int, window: int) -> tuple[int, int]:
    """(sink blocks, newest blocks) each layer reads eagerly: sinks and the window always, then what fits in
    `room` chunk slots of the GPU and host tiers shared by all layers."""
    per_layer = max(0, room // max(layers, 1))
    sinks = min(sink, n_full)
    newest = min(n_full - sinks, max(window, per_layer - sinks))
    return sinks, newest


def _groups(pool, read, layer: int, first: int, count: int, unit: int):
    """(start, read(layer, start, m)) for blocks first.. of a layer in order, ~64 MiB each (`unit` bytes a block).
    Each group is read and CRC-checked on a pool thread (zlib and preadv release the GIL), _AHEAD in flight:
    reading and checking run in parallel instead of one after the other on the caller's thread."""
    per = max(1, _GROUP_BYTES // unit)
    pending = deque()
    for s in range(first, first + count, per):
        pending.append((s, pool.submit(read, layer, s, min(per, first + count - s))))
        if len(pending) > _AHEAD:
            s0, fut = pending.popleft()
            yield s0, fut.result()
    while pending:
        s0, fut = pending.popleft()
        yield s0, fut.result()


def _put_blocks(pool, attn, reader, layer: int, first: int, count: int, keys) -> None:
    """Blocks into the store (the store places them); their keys also into `keys` when a sparse index wants them."""
    for s, blocks in _groups(pool, reader.read_blocks, layer, first, count, reader.layout.stride):
        attn.store.put(layer, s, blocks.to(attn.device))                       # blocks: [m, 2, Hkv, C, D]
        if keys is not None:
            _keys_into(keys, s, blocks[:, 0], attn.C)


def _keys_into(keys: torch.Tensor, first: int, k: torch.Tensor, C: int) -> None:
    """k: [m, Hkv, C, D] (host) -> keys[:, first*C:(first+m)*C] (keys: [Hkv, n*C, D] on the device)."""
    m, Hkv, _, D = k.shape
    keys[:, first * C:(first + m) * C] = k.permute(1, 0, 2, 3).reshape(Hkv, m * C, D)


def attach(attn, reader, fix: str, on_layer=None) -> Attached:
    """Fill an empty tiered session from `reader`; SessionFileError / TierIOError leave it to be reset.
    on_layer(done): called after each layer (progress)."""
    lay, C, n, store = reader.layout, attn.C, reader.n, attn.store
    n_full, tail = n // C, n % C
    room = sum(t.num_free for t in store.tiers[:2]) - 2 * store.gpu_headroom   # slack: the put's demotion batch
    sinks, newest = eager_blocks(n_full, attn.L, room, store.policy.sink_chunks, store.policy.window_chunks)
    cold0, cold1 = sinks, n_full - newest
    with attn.bulk_fill(n):            # the session's length is n once the block ends
        sparse = attn.selector.sparse and n_full > 0
        # the index's rows saved with the blocks: imported, so no key is read for it (else built from the keys)
        rows = sparse and lay.row_bytes and lay.row_bytes == attn.selector.row_bytes()
        with ThreadPoolExecutor(_THREADS, thread_name_prefix="offload-cache-read") as pool:
            for layer in range(attn.L):
                # a sparse index is built once over all keys, as a copy-in load does: [Hkv, n_full*C, D]
                keys = (torch.empty(attn.Hkv, n_full * C, attn.D, device=attn.device, dtype=attn.dtype)
                        if sparse and not rows else None)
                _put_blocks(pool, attn, reader, layer, 0, sinks, keys)
                if cold1 > cold0:
                    store.adopt(layer, cold0, reader.extents(layer, cold0, cold1 - cold0, fix))
                    if keys is not None:   # the K halves only; the V halves stay unread until attention wants them
                        for s, k in _groups(pool, reader.read_keys, layer, cold0, cold1 - cold0, lay.block_bytes // 2):
                            _keys_into(keys, s, k, C)
                _put_blocks(pool, attn, reader, layer, cold1, newest, keys)
                if tail:
                    kv = reader.read_blocks(layer, n_full, 1)[0].to(attn.device)    # kv: [2, Hkv, C, D]
                    attn.tail_k[layer, :, :tail], attn.tail_v[layer, :, :tail] = kv[0, :, :tail], kv[1, :, :tail]
                if rows:
                    attn.selector.import_rows(layer, 0, reader.read_rows(layer, 0, n_full))
                elif keys is not None:
                    attn.selector.index_chunks(layer, 0, keys)
                if on_layer is not None:
                    on_layer(layer + 1)
    per_layer = (sinks + newest + (tail > 0)) * lay.stride
    cold = (cold1 - cold0) * lay.stride * attn.L
    index = n_full * lay.row_bytes if rows else (cold1 - cold0) * (lay.block_bytes // 2) if sparse else 0
    return Attached(n, per_layer * attn.L, cold, index * attn.L)


def _put_stored(store, layer: int, first: int, st, device) -> None:
    """Runs of bf16 blocks go through put (placed like any new chunk), runs of packed ones through put_cold
    (their bytes, straight into host / disk slots): nothing is quantized twice."""
    for i, j, packed in flag_runs(st.packed.tolist()):
        if packed:
            store.put_cold(layer, first + i, st.cold[i:j])                      # cold: [m, B] u8
        else:
            store.put(layer, first + i, st.raw[i:j].to(device))                # raw: [m, 2, Hkv, C, D]


def attach_packed(attn, reader, on_layer=None) -> Attached:
    """Fill an empty compressed (int8 / int4) tiered session from a cache of packed blocks: every block is read
    once, packed ones go into host / disk slots as they are, and the sparse index takes the rows that were
    saved with the blocks (built from the unquantized keys). An index that saves no rows (shadow, ann) is
    rebuilt from the keys the session holds: bf16 where they are, dequantized where they are packed."""
    from offload.kernels.quant import dequantize_chunks
    lay, C, n, store = reader.layout, attn.C, reader.n, attn.store
    n_full, tail = n // C, n % C
    sparse = attn.selector.sparse and n_full > 0
    unit = max(lay.packed_bytes, 1) + lay.row_bytes
    read = 0
    with attn.bulk_fill(n):
        with ThreadPoolExecutor(_THREADS, thread_name_prefix="offload-cache-read") as pool:
            for layer in range(attn.L):
                keys = (torch.empty(attn.Hkv, n_full * C, attn.D, device=attn.device, dtype=attn.dtype)
                        if sparse and not lay.row_bytes else None)                 # keys: [Hkv, n_full*C, D]
                for s, (st, rows) in _groups(pool, reader.read_stored, layer, 0, n_full, unit):
                    _put_stored(store, layer, s, st, attn.device)
                    read += int(st.packed.sum()) * lay.packed_bytes + int((~st.packed).sum()) * lay.block_bytes
                    if sparse and rows is not None:
                        attn.selector.import_rows(layer, s, rows)
                    elif keys is not None:
                        k = st.raw[:, 0].clone()                                    # k: [m, Hkv, C, D]
                        if bool(st.packed.any()):
                            k[st.packed] = dequantize_chunks(st.cold[st.packed], store.packed, k.dtype)[:, 0]
                        _keys_into(keys, s, k, C)
                if tail:
                    kv = reader.read_stored(layer, n_full, 1)[0].raw[0].to(attn.device)   # kv: [2, Hkv, C, D]
                    attn.tail_k[layer, :, :tail], attn.tail_v[layer, :, :tail] = kv[0, :, :tail], kv[1, :, :tail]
                    read += lay.block_bytes
                if keys is not None:
                    attn.selector.index_chunks(layer, 0, keys)
                if on_layer is not None:
                    on_layer(layer + 1)
    return Attached(n, read + n_full * lay.row_bytes * attn.L, 0, 0)
