"""Prompt-cache files: KV per layer in chunk-aligned blocks, checkpointed in place, read lazily layer by layer.

Layout (little-endian; every region starts on a 4096-byte boundary):
    record 0, record 1   two commit records (A/B), RECORD_BYTES each:
                         MAGIC | u32 version | u64 seq | u32 json length | JSON | u32 crc32(all before it).
                         The valid record with the highest seq is the file's state, so a torn record write
                         leaves the previous state readable.
    tokens               int32 [capacity]
    logits 0, logits 1   float32 [vocab]: the logits of the last committed position, one slot per record
    crc table            u32 [layers, blocks]: CRC-32 of each block's bytes
    key crc table        u32 [layers, blocks]: CRC-32 of each block's K half alone (a sparse index is rebuilt
                         from the keys: a resume reads only the K halves of the blocks it leaves in place)
    format table         u8 [layers, blocks]: 0 = the block holds bf16 KV, 1 = packed (int8 / int4) bytes
    row crc table        u32 [layers, blocks]: CRC-32 of each block's index row
    index rows           [layers, blocks, row_bytes]: the sparse index's row of each block (a summary index's
                         bounds, built from the unquantized keys), so a resume imports the index instead of
                         reading every key (or, for packed blocks, instead of rebuilding it from lossy keys)
    blocks               block b of layer l at data + (l * blocks + b) * stride, holding [2, Hkv, C, D] (K then V):
                         the tiers' chunk layout at the disk tier's 4096-aligned stride, so a disk tier could
                         use these bytes as its slots in place instead of copying them.
    packed blocks        (compressed sessions, kv_dtype int8 / int4) block b of layer l at packed + (l * blocks + b)
                         * packed_bytes: the host tier's slot bytes, no padding, so a run of them is one read.
A compressed session saves each chunk as it holds it: packed for chunks that left the GPU (the packed grid), bf16
for the rest and the tail (the bf16 grid). A block lives in one grid; the file is sparse, so the other grid's
slot takes no space on the drive (int4 at 1M tokens: ~45 GiB, not 128).
A record's JSON: the cache key (model identity, options), the layout, n (tokens committed), the sha256 of
tokens[:n], the crcs of the tables' committed entries and of its logits slot.

Committing never rewrites bytes the current record relies on: a checkpoint writes the blocks past the
committed ones (a block is partial only at the very end of a prompt, and such a file is never extended),
the new table entries and tokens, the other logits slot, fsyncs, then writes the other record and fsyncs.
A new file is written under a temporary name and renamed over the old one only after its first commit,
so an older cache survives any failure (disk full included) of the new one.
"""
from offload.kvfile.layout import MAGIC, RECORD_BYTES, VERSION, Layout, tokens_digest
from offload.kvfile.reader import KVFileReader
from offload.kvfile.writer import KVFileWriter

__all__ = ["MAGIC", "RECORD_BYTES", "VERSION", "Layout", "tokens_digest", "KVFileReader", "KVFileWriter"]
