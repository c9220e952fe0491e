"""The prompt-cache file's layout and commit records (the format is described in offload/kvfile/__init__.py)."""
from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from offload.errors import SessionFileError

MAGIC = b"OFFLDPC1"
VERSION = 3                  # 3: packed blocks + index rows; 2: the key crc table (older files: prefilled afresh)
ALIGN = 4096
RECORD_BYTES = 16384
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Layout:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    block_tokens: int      # C: tokens per block (the tiers' chunk_tokens when the file was made)
    capacity: int          # tokens the file has room for
    vocab: int
    kv_dtype: str = "bf16"  # the session's host / disk KV: int8 / int4 files hold packed blocks too
    packed_bytes: int = 0   # bytes of one packed block (0: bf16 only)
    row_bytes: int = 0      # bytes of one block's index row (0: none; a resume rebuilds the index from the keys)

    @property
    def blocks(self) -> int:
        return math.ceil(self.capacity / self.block_tokens)

    @property
    def block_bytes(self) -> int:
        return 2 * self.kv_heads * self.block_tokens * self.head_dim * torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    @property
    def stride(self) -> int:
        return _up(self.block_bytes)

    @property
    def packed_stride(self) -> int:
        return self.packed_bytes

    def offsets(self) -> dict:
        tokens = 2 * RECORD_BYTES
        logits = tokens + _up(4 * self.capacity)
        table = logits + 2 * _up(4 * self.vocab)
        ktable = table + _up(4 * self.layers * self.blocks)
        fmt = ktable + _up(4 * self.layers * self.blocks)
        rtable = fmt + _up(self.layers * self.blocks)
        rows = rtable + _up(4 * self.layers * self.blocks)
        data = rows + _up(self.layers * self.blocks * self.row_bytes)
        packed = _up(data + self.layers * self.blocks * self.stride)
        return {"tokens": tokens, "logits": logits, "table": table, "ktable": ktable, "fmt": fmt, "rtable": rtable,
                "rows": rows, "data": data, "packed": packed,
                "end": packed + self.layers * self.blocks * self.packed_stride}

    def block_offset(self, layer: int, block: int) -> int:
        return self.offsets()["data"] + (layer * self.blocks + block) * self.stride

    def packed_offset(self, layer: int, block: int) -> int:
        return self.offsets()["packed"] + (layer * self.blocks + block) * self.packed_stride

    def row_offset(self, layer: int, block: int) -> int:
        return self.offsets()["rows"] + (layer * self.blocks + block) * self.row_bytes


def tokens_digest(ids) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int32).tobytes()).hexdigest()


def _table_crc(table: np.ndarray, n_blocks: int) -> int:
    return zlib.crc32(np.ascontiguousarray(table[:, :n_blocks]).tobytes())


def _pack_record(body: dict) -> bytes:
    js = json.dumps(body, sort_keys=True).encode()
    head = MAGIC + struct.pack("<IQI", VERSION, body["seq"], len(js)) + js
    rec = head + struct.pack("<I", zlib.crc32(head))
    if len(rec) > RECORD_BYTES:
        raise SessionFileError(f"prompt cache header is {len(rec)} bytes, more than {RECORD_BYTES}; "
                               "use a model with fewer weight files")
    return rec.ljust(RECORD_BYTES, b"\0")


def _unpack_record(raw: bytes) -> dict | None:
    """The record's JSON, or None when it is missing, torn or from another format."""
    if len(raw) < len(MAGIC) + 20 or raw[:len(MAGIC)] != MAGIC:
        return None
    version, seq, jlen = struct.unpack_from("<IQI", raw, len(MAGIC))
    end = len(MAGIC) + 16 + jlen
    if version != VERSION or end + 4 > len(raw):
        return None
    (crc,) = struct.unpack_from("<I", raw, end)
    if zlib.crc32(raw[:end]) != crc:
        return None
    body = json.loads(raw[len(MAGIC) + 16:end])
    return body if body.get("seq") == seq else None
