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
    blocks               block b of layer l at data + (l * blocks + b) * stride, holding [2, Hkv, C, D] (K then V):
                         the tiers' chunk layout at the disk tier's 4096-aligned stride, so a disk tier could
                         use these bytes as its slots in place instead of copying them.
    packed blocks        (compressed sessions, kv_dtype int8 / int4) block b of layer l at packed + (l * blocks + b)
                         * packed_stride: its packed bytes (the host tier's slot) then its index row, no padding,
                         so a run of packed blocks is one contiguous read.
A compressed session saves each chunk as it holds it: packed for chunks that left the GPU (in the packed grid),
bf16 for the rest and the tail (in the bf16 grid); each is followed by its sparse index row (row_bytes: the index
is built from the unquantized keys, which a packed block no longer has). A block lives in one grid; the file is
sparse, so the other grid's slot takes no space on the drive (int4 at 1M tokens: ~45 GiB, not 128).
A record's JSON: the cache key (model identity, options), the layout, n (tokens committed), the sha256 of
tokens[:n], the crcs of the tables' committed entries and of its logits slot.

Committing never rewrites bytes the current record relies on: a checkpoint writes the blocks past the
committed ones (a block is partial only at the very end of a prompt, and such a file is never extended),
the new table entries and tokens, the other logits slot, fsyncs, then writes the other record and fsyncs.
A new file is written under a temporary name and renamed over the old one only after its first commit,
so an older cache survives any failure (disk full included) of the new one.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from offload.errors import SessionFileError

MAGIC = b"OFFLDPC1"
VERSION = 3                  # 3: packed blocks + index rows; 2: the key crc table (older files: prefilled afresh)
ALIGN = 4096
RECORD_BYTES = 16384
_GROUP_BYTES = 256 << 20     # blocks a commit reads from the session and writes at a time
_IOV_BLOCKS = 500            # packed blocks per vectored read (2 buffers each, under IOV_MAX = 1024)
_IO_THREADS = min(8, os.cpu_count() or 1)   # crc32 and pwrite release the GIL: blocks are written in parallel
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
    row_bytes: int = 0      # bytes of one block's index row after its KV (0: none; the index is rebuilt from keys)

    @property
    def blocks(self) -> int:
        return math.ceil(self.capacity / self.block_tokens)

    @property
    def block_bytes(self) -> int:
        return 2 * self.kv_heads * self.block_tokens * self.head_dim * torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    @property
    def stride(self) -> int:
        return _up(self.block_bytes + self.row_bytes)

    @property
    def packed_stride(self) -> int:
        return self.packed_bytes + self.row_bytes if self.packed_bytes else 0

    def offsets(self) -> dict:
        tokens = 2 * RECORD_BYTES
        logits = tokens + _up(4 * self.capacity)
        table = logits + 2 * _up(4 * self.vocab)
        ktable = table + _up(4 * self.layers * self.blocks)
        fmt = ktable + _up(4 * self.layers * self.blocks)
        data = fmt + _up(self.layers * self.blocks)
        packed = _up(data + self.layers * self.blocks * self.stride)
        return {"tokens": tokens, "logits": logits, "table": table, "ktable": ktable, "fmt": fmt, "data": data,
                "packed": packed, "end": packed + self.layers * self.blocks * self.packed_stride}

    def block_offset(self, layer: int, block: int) -> int:
        return self.offsets()["data"] + (layer * self.blocks + block) * self.stride

    def packed_offset(self, layer: int, block: int) -> int:
        return self.offsets()["packed"] + (layer * self.blocks + block) * self.packed_stride


def _runs(flags: list):
    """(start, end, flag) of each run of equal flags."""
    i = 0
    while i < len(flags):
        j = i
        while j < len(flags) and flags[j] == flags[i]:
            j += 1
        yield i, j, flags[i]
        i = j


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


class KVFileReader:
    """Opens a cache file and checks everything but the blocks; `layers()` checks each block as it reads it."""

    def __init__(self, path):
        self.path = Path(path)
        self._files, self._open_lock = [None, None], threading.Lock()   # blocks', keys' descriptors, opened on use
        try:
            with open(self.path, "rb") as f:
                raw = [f.read(RECORD_BYTES) for _ in range(2)]
                recs = [_unpack_record(r) for r in raw]
                size = os.fstat(f.fileno()).st_size
                good = [r for r in recs if r is not None]
                if not good:
                    old = [struct.unpack_from("<I", r, len(MAGIC))[0] for r in raw
                           if r[:len(MAGIC)] == MAGIC and len(r) >= len(MAGIC) + 4]
                    if old and all(v != VERSION for v in old):
                        raise SessionFileError(f"it has format version {old[0]}, this offload writes {VERSION}")
                    raise SessionFileError("it is not a prompt cache, or its header is corrupt")
                body = max(good, key=lambda r: r["seq"])
                self.layout = Layout(**body["layout"])
                off = self.layout.offsets()
                if size < off["end"]:
                    raise SessionFileError(f"it is truncated ({size} of {off['end']} bytes)")
                self.key, self.n, self.seq, self.slot = body["key"], body["n"], body["seq"], body["slot"]
                if not 0 < self.n <= self.layout.capacity:
                    raise SessionFileError("its header is corrupt (token count)")
                f.seek(off["tokens"])
                self.tokens = np.frombuffer(f.read(4 * self.n), dtype=np.int32).tolist()
                f.seek(off["table"])
                nt = self.layout.layers * self.layout.blocks
                self.table = np.frombuffer(f.read(4 * nt), dtype=np.uint32).reshape(self.layout.layers, -1).copy()
                f.seek(off["ktable"])
                self.ktable = np.frombuffer(f.read(4 * nt), dtype=np.uint32).reshape(self.layout.layers, -1).copy()
                f.seek(off["fmt"])
                self.fmt = np.frombuffer(f.read(nt), dtype=np.uint8).reshape(self.layout.layers, -1).copy()
                f.seek(off["logits"] + self.slot * _up(4 * self.layout.vocab))
                lb = f.read(4 * self.layout.vocab)
                st = os.fstat(f.fileno())
                self.identity = (st.st_dev, st.st_ino)   # the file these checks were made on
        except OSError as e:
            raise SessionFileError(f"cannot read it ({e.strerror or e})") from None
        except (KeyError, TypeError, ValueError) as e:
            raise SessionFileError(f"its header is corrupt ({type(e).__name__})") from None
        if tokens_digest(self.tokens) != body["tokens_sha"]:
            raise SessionFileError("its token ids are corrupt (checksum mismatch)")
        if (_table_crc(self.table, self.committed_blocks) != body["table_crc"]
                or _table_crc(self.ktable, self.committed_blocks) != body["ktable_crc"]
                or _table_crc(self.fmt, self.committed_blocks) != body["fmt_crc"]):
            raise SessionFileError("its block checksum table is corrupt")
        if self.layout.row_bytes or self.layout.packed_bytes:
            self._check_packed_layout()
        if zlib.crc32(lb) != body["logits_crc"]:
            raise SessionFileError("its logits are corrupt (checksum mismatch)")
        self.logits = torch.frombuffer(bytearray(lb), dtype=torch.float32)  # logits: [V]

    @property
    def committed_blocks(self) -> int:
        return math.ceil(self.n / self.layout.block_tokens)

    def _check_packed_layout(self) -> None:
        lay = self.layout
        if lay.packed_bytes < 0 or lay.row_bytes < 0 or lay.packed_bytes > lay.block_bytes:
            raise SessionFileError("its header is corrupt (block layout)")
        if bool((self.fmt[:, :self.committed_blocks] > (1 if lay.packed_bytes else 0)).any()):
            raise SessionFileError("its block format table is corrupt")

    def _committed(self, first: int, count: int, layer: int | None = None, raw_only: bool = False) -> None:
        if first < 0 or first + count > self.committed_blocks:
            raise ValueError(f"blocks {first}..{first + count - 1} are not all committed ({self.committed_blocks})")
        if raw_only and (self.layout.row_bytes or bool(self.fmt[layer, first:first + count].any())):
            raise ValueError("packed blocks or index rows: read them with read_stored")

    def read_stored(self, layer: int, first: int, count: int):
        """Committed blocks first.. of a layer as saved, each CRC-checked (SessionFileError if corrupt):
        (StoredChunks: bf16 or packed per block, the partial last block bf16; index rows [count, R] u8 or None).
        A run of packed blocks is one vectored read (their bytes are contiguous); a bf16 block is one read."""
        from offload.tiers.cold import StoredChunks
        lay, R = self.layout, self.layout.row_bytes
        self._committed(first, count)
        fmt = self.fmt[layer, first:first + count].astype(bool)                        # fmt: [count]
        raw = torch.empty(count, 2, lay.kv_heads, lay.block_tokens, lay.head_dim, dtype=DTYPES[lay.dtype])
        raw_u8 = raw.view(count, -1).view(torch.uint8).numpy()                         # raw_u8: [count, block_bytes]
        cold = np.empty((count, lay.packed_bytes), dtype=np.uint8) if lay.packed_bytes else None  # cold: [count, B]
        rows = np.zeros((count, R), dtype=np.uint8)                                     # rows: [count, R]
        crcs, fd, crc32 = self.table[layer, first:first + count].tolist(), self._fd(), zlib.crc32
        try:
            for i, j, packed in _runs(fmt.tolist()):
                for a in range(i, j, _IOV_BLOCKS) if packed else range(i, j):
                    b = min(j, a + _IOV_BLOCKS) if packed else a + 1
                    pay = cold if packed else raw_u8
                    bufs = [x for k in range(a, b) for x in ((pay[k], rows[k]) if R else (pay[k],))]
                    at = lay.packed_offset(layer, first + a) if packed else lay.block_offset(layer, first + a)
                    if os.preadv(fd, bufs, at) != (b - a) * (pay.shape[1] + R):
                        raise SessionFileError(f"it is truncated (layer {layer} block {first + a})")
                    for k in range(a, b):
                        crc = crc32(pay[k])
                        if (crc32(rows[k], crc) if R else crc) != crcs[k]:
                            raise SessionFileError(f"block {first + k} of layer {layer} is corrupt (checksum mismatch)")
        except OSError as e:
            raise SessionFileError(f"cannot read it ({e.strerror or e})") from None
        fmts = torch.from_numpy(fmt)                                                    # fmts: [count] bool
        st = StoredChunks(fmts, raw, torch.from_numpy(cold) if cold is not None else None)
        return st, (torch.from_numpy(rows) if R else None)

    def extents(self, layer: int, first: int, count: int, fix: str):
        """Where committed blocks first.. of a layer lie, with their CRCs: for a disk tier to read in place."""
        from offload.tiers.attached import FileExtents
        self._committed(first, count, layer, raw_only=True)
        base = self.layout.block_offset(layer, first)
        offsets = base + np.arange(count, dtype=np.int64) * self.layout.stride                  # offsets: [count]
        return FileExtents(str(self.path), self.identity, offsets,
                           self.table[layer, first:first + count].copy(), fix)                # crcs: [count]

    def read_blocks(self, layer: int, first: int, count: int) -> torch.Tensor:
        """Committed blocks first.. of a layer, CRC-checked: [count, 2, Hkv, C, D] (SessionFileError if corrupt).
        Reads the file these checks were made on (by inode), so a file renamed over it since is never mixed in."""
        lay = self.layout
        self._committed(first, count, layer, raw_only=True)
        buf = np.empty((count, lay.stride), dtype=np.uint8)                    # buf: [count, stride] bytes
        try:
            fd = self._fd()
            want, got = count * lay.stride, 0
            mv = memoryview(buf).cast("B")
            while got < want:
                r = os.preadv(fd, [mv[got:]], lay.block_offset(layer, first) + got)
                if r == 0:
                    raise SessionFileError(f"it is truncated (layer {layer} block {first + got // lay.stride})")
                got += r
        except OSError as e:
            raise SessionFileError(f"cannot read it ({e.strerror or e})") from None
        for i in range(count):
            if zlib.crc32(buf[i, :lay.block_bytes]) != int(self.table[layer, first + i]):
                raise SessionFileError(f"block {first + i} of layer {layer} is corrupt (checksum mismatch)")
        t = torch.from_numpy(buf[:, :lay.block_bytes]).contiguous()              # t: [count, block_bytes] u8
        return t.view(DTYPES[lay.dtype]).view(count, 2, lay.kv_heads, lay.block_tokens, lay.head_dim)

    def read_keys(self, layer: int, first: int, count: int) -> torch.Tensor:
        """The K halves of committed blocks first.. of a layer, each CRC-checked: [count, Hkv, C, D]. The V halves
        are not read (their descriptor has read-ahead off), so rebuilding an index costs half the blocks' bytes."""
        lay = self.layout
        self._committed(first, count, layer, raw_only=True)
        half = lay.block_bytes // 2
        buf = np.empty((count, half), dtype=np.uint8)                          # buf: [count, K bytes]
        fd = self._fd(keys=True)
        try:
            for i in range(count):
                mv, got, at = memoryview(buf[i]), 0, lay.block_offset(layer, first + i)
                while got < half:
                    r = os.preadv(fd, [mv[got:]], at + got)
                    if r == 0:
                        raise SessionFileError(f"it is truncated (layer {layer} block {first + i})")
                    got += r
                if zlib.crc32(buf[i]) != int(self.ktable[layer, first + i]):
                    raise SessionFileError(f"the keys of block {first + i} of layer {layer} are corrupt "
                                           "(checksum mismatch)")
        except OSError as e:
            raise SessionFileError(f"cannot read it ({e.strerror or e})") from None
        t = torch.from_numpy(buf)                                                # t: [count, K bytes] u8
        return t.view(DTYPES[lay.dtype]).view(count, lay.kv_heads, lay.block_tokens, lay.head_dim)

    def _fd(self, keys: bool = False) -> int:
        """A descriptor of the checked file (opened once, by path, compared by inode; threads share it)."""
        with self._open_lock:
            if self._files[keys] is None:
                f = open(self.path, "rb")
                st = os.fstat(f.fileno())
                if (st.st_dev, st.st_ino) != self.identity:
                    f.close()
                    raise SessionFileError("it was replaced while it was being read")
                if keys and hasattr(os, "posix_fadvise"):   # strided reads: read-ahead would fetch the V halves
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
                self._files[keys] = f
            return self._files[keys].fileno()

    def close(self) -> None:
        for i, f in enumerate(self._files):
            if f is not None:
                f.close()
                self._files[i] = None

    def layers(self):
        """Yields (k, v) per layer, each [Hkv, n, D] in a fresh tensor. Only one layer's blocks are mapped at a
        time, and every block's CRC is checked before its bytes are used (SessionFileError otherwise)."""
        lay, n, nb = self.layout, self.n, self.committed_blocks
        for layer in range(lay.layers):
            self._committed(0, nb, layer, raw_only=True)
        dtype, C, Hkv, D = DTYPES[lay.dtype], lay.block_tokens, lay.kv_heads, lay.head_dim
        with open(self.path, "rb") as f:
            for layer in range(lay.layers):
                mm = mmap.mmap(f.fileno(), nb * lay.stride, access=mmap.ACCESS_COPY,
                               offset=lay.block_offset(layer, 0))
                try:
                    with memoryview(mm) as mv:
                        for b in range(nb):
                            if zlib.crc32(mv[b * lay.stride:b * lay.stride + lay.block_bytes]) != int(self.table[layer, b]):
                                raise SessionFileError(f"block {b} of layer {layer} is corrupt (checksum mismatch)")
                    raw = torch.frombuffer(mm, dtype=torch.uint8).view(nb, lay.stride)[:, :lay.block_bytes]
                    blocks = raw.view(dtype).view(nb, 2, Hkv, C, D)  # a view of the mapped bytes, no copy
                    kv = torch.empty(2, Hkv, nb, C, D, dtype=dtype)  # kv: [2, Hkv, nb, C, D]
                    kv.copy_(blocks.permute(1, 2, 0, 3, 4))
                    del raw, blocks
                finally:
                    mm.close()
                kv = kv.view(2, Hkv, nb * C, D)[:, :, :n]
                yield kv[0], kv[1]  # [Hkv, n, D] each


class KVFileWriter:
    """Writes commits of a growing prompt into a cache file: a new one (temp, then rename) or an existing one
    (in place, past its committed blocks). `_pwrite` and `_fsync` are seams for fault-injection tests."""

    def __init__(self, path, layout: Layout, key: dict, n: int = 0, seq: int = 0, slot: int = 1,
                 table: np.ndarray | None = None, ktable: np.ndarray | None = None, tmp: Path | None = None,
                 fmt: np.ndarray | None = None):
        self.path, self.layout, self.key = Path(path), layout, key
        self.n, self.seq, self.slot, self.tmp = n, seq, slot, tmp
        self.table = table if table is not None else np.zeros((layout.layers, layout.blocks), dtype=np.uint32)
        self.ktable = ktable if ktable is not None else np.zeros_like(self.table)
        self.fmt = fmt if fmt is not None else np.zeros(self.table.shape, dtype=np.uint8)
        self._pwrite, self._fsync = os.pwrite, os.fsync
        self._fd = os.open(tmp if tmp is not None else self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))

    @classmethod
    def create(cls, path, layout: Layout, key: dict) -> "KVFileWriter":
        path = Path(path)
        # the session files' temp-name pattern, so offload.persist.sweep_temps removes one a killed run left
        tmp = path.with_name(f".{path.name}.offload-tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.ftruncate(fd, layout.offsets()["end"])   # sparse: blocks take space as they are written
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return cls(path, layout, key, tmp=tmp)

    @classmethod
    def extend(cls, reader: KVFileReader) -> "KVFileWriter":
        """Continue the file `reader` read (same prompt, block-aligned n); its committed bytes stay as they are.
        Only ever appends: a session may be reading those committed blocks in place (offload.cache_attach)."""
        w = cls(reader.path, reader.layout, reader.key, n=reader.n, seq=reader.seq, slot=reader.slot,
                table=reader.table.copy(), ktable=reader.ktable.copy(), fmt=reader.fmt.copy())
        st = os.fstat(w._fd)
        if (st.st_dev, st.st_ino) != reader.identity:   # renamed over since it was checked: not ours to extend
            w.close()
            raise OSError(0, "it was replaced by another run")
        return w

    def bytes_to_commit(self, n: int) -> int:
        """Drive bytes the next commit takes at most (a packed block's hole is not written)."""
        lay = self.layout
        per = _up(lay.packed_bytes + lay.row_bytes) if lay.packed_bytes else lay.stride
        return (math.ceil(n / lay.block_tokens) - self.n // lay.block_tokens) * lay.layers * per

    def commit(self, n: int, tokens, logits: torch.Tensor, read_blocks) -> None:
        """Make tokens[:n] the file's state. read_blocks(layer, b0, b1) -> (StoredChunks of blocks b0..b1-1,
        the last zero-padded when n ends inside it; index rows [b1-b0, R] u8, or None when the layout has none)."""
        lay, off, C = self.layout, self.layout.offsets(), self.layout.block_tokens
        if self.n % C or n > lay.capacity or n <= self.n:
            raise ValueError(f"cannot commit {n} tokens after {self.n} (block {C}, capacity {lay.capacity})")
        b0, b1 = self.n // C, math.ceil(n / C)
        group = max(1, _GROUP_BYTES // lay.stride)          # a 1M-token commit holds two groups in memory at a time
        with ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="offload-cache-write") as pool:
            pending: list = []
            for layer in range(lay.layers):
                for g0 in range(b0, b1, group):
                    got = read_blocks(layer, g0, min(b1, g0 + group))   # overlaps the previous group's writes
                    for f in pending:
                        f.result()
                    pending = self._write_blocks(pool, layer, g0, *got)
            for f in pending:
                f.result()
        self._write(self.table[:, b0:b1].copy(), None, rows=(off["table"], b0))
        self._write(self.ktable[:, b0:b1].copy(), None, rows=(off["ktable"], b0))
        self._write(self.fmt[:, b0:b1].copy(), None, rows=(off["fmt"], b0))
        self._write(np.asarray(tokens[self.n:n], dtype=np.int32), off["tokens"] + 4 * self.n)
        slot = 1 - self.slot
        lb = logits.detach().float().cpu().contiguous().numpy()
        self._write(lb, off["logits"] + slot * _up(4 * lay.vocab))
        self._fsync(self._fd)
        body = {"seq": self.seq + 1, "slot": slot, "n": n, "key": self.key, "layout": asdict(lay),
                "tokens_sha": tokens_digest(tokens[:n]), "table_crc": _table_crc(self.table, b1),
                "ktable_crc": _table_crc(self.ktable, b1), "fmt_crc": _table_crc(self.fmt, b1),
                "logits_crc": zlib.crc32(lb.tobytes())}
        self._write(np.frombuffer(_pack_record(body), dtype=np.uint8), slot * RECORD_BYTES)
        self._fsync(self._fd)
        if self.tmp is not None:
            os.replace(self.tmp, self.path)
            self.tmp = None
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self.n, self.seq, self.slot = n, self.seq + 1, slot

    def _write_blocks(self, pool, layer: int, b0: int, st, rows) -> list:
        """Blocks b0.. of a layer (StoredChunks, index rows) into their slots and their table entries; packed
        blocks are checksummed and written on `pool`'s threads (returns their futures)."""
        lay, m, half = self.layout, st.packed.numel(), self.layout.block_bytes // 2
        raw = st.raw.to("cpu", DTYPES[lay.dtype]).contiguous().view(m, -1).view(torch.uint8).numpy()
        packed = st.packed.tolist() if lay.packed_bytes else [False] * m
        if not lay.row_bytes and not any(packed):          # bf16 blocks only: one write
            buf = np.zeros((m, lay.stride), dtype=np.uint8)                 # buf: [blocks, stride] bytes
            buf[:, :lay.block_bytes] = raw
            for i in range(m):
                kcrc = zlib.crc32(buf[i, :half])                             # K half, then on through V
                self.ktable[layer, b0 + i] = kcrc
                self.table[layer, b0 + i] = zlib.crc32(buf[i, half:lay.block_bytes], kcrc)
            self._write(buf, lay.block_offset(layer, b0))
            return []
        row_np = rows.numpy() if rows is not None else np.zeros((m, lay.row_bytes), dtype=np.uint8)
        cold = st.cold.numpy() if st.cold is not None else None                 # cold: [m, B] u8

        def write_packed(lo: int, hi: int) -> None:     # one contiguous write for blocks lo..hi-1
            buf = np.concatenate([cold[lo:hi], row_np[lo:hi]], axis=1)           # buf: [n, B + R] u8
            for i in range(lo, hi):
                self.table[layer, b0 + i], self.ktable[layer, b0 + i], self.fmt[layer, b0 + i] = zlib.crc32(buf[i - lo]), 0, 1
            self._write(buf, lay.packed_offset(layer, b0 + lo))

        def write_raw(i: int) -> None:
            kcrc = zlib.crc32(raw[i, :half])                                     # K half, then on through V
            crc = zlib.crc32(raw[i, half:], kcrc)
            self.table[layer, b0 + i] = zlib.crc32(row_np[i], crc) if lay.row_bytes else crc
            self.ktable[layer, b0 + i], self.fmt[layer, b0 + i] = kcrc, 0
            self._write(np.concatenate([raw[i], row_np[i]]), lay.block_offset(layer, b0 + i))

        jobs = []
        for i, j, is_packed in _runs(packed):
            if not is_packed:
                jobs += [pool.submit(write_raw, k) for k in range(i, j)]
                continue
            step = max(1, -(-(j - i) // _IO_THREADS))
            jobs += [pool.submit(write_packed, lo, min(j, lo + step)) for lo in range(i, j, step)]
        return jobs

    def _write(self, arr: np.ndarray, offset: int | None, rows: tuple[int, int] | None = None) -> None:
        if rows is not None:   # table columns b0.. of every layer row: one write per row
            base, b0 = rows
            for layer in range(arr.shape[0]):
                self._write(arr[layer], base + arr.itemsize * (layer * self.layout.blocks + b0))
            return
        mv = memoryview(np.ascontiguousarray(arr)).cast("B")
        done = 0
        while done < len(mv):
            done += self._pwrite(self._fd, mv[done:], offset + done)

    def close(self) -> None:
        """Stop writing; a file never committed is removed (the older cache, if any, stays)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None
