"""Reading a prompt-cache file: every header field and table checked at open, every block as it is read."""
from __future__ import annotations

import math
import mmap
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import torch

from offload.errors import SessionFileError
from offload.tiers.slots import flag_runs
from offload.kvfile.layout import (DTYPES, MAGIC, RECORD_BYTES, VERSION, Layout, _table_crc,
                                   _unpack_record, _up, tokens_digest)

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
                f.seek(off["rtable"])
                self.rtable = np.frombuffer(f.read(4 * nt), dtype=np.uint32).reshape(self.layout.layers, -1).copy()
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
                or _table_crc(self.fmt, self.committed_blocks) != body["fmt_crc"]
                or _table_crc(self.rtable, self.committed_blocks) != body["rtable_crc"]):
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
        if raw_only and bool(self.fmt[layer, first:first + count].any()):
            raise ValueError("packed blocks: read them with read_stored")

    def read_stored(self, layer: int, first: int, count: int):
        """Committed blocks first.. of a layer as saved, each CRC-checked (SessionFileError if corrupt):
        (StoredChunks: bf16 or packed per block, the partial last block bf16; index rows [count, R] u8 or None).
        A run of packed blocks is one read (their bytes are contiguous); a bf16 block is one read."""
        from offload.tiers.cold import StoredChunks
        lay = self.layout
        self._committed(first, count)
        fmt = self.fmt[layer, first:first + count].astype(bool)                        # fmt: [count]
        raw = torch.empty(count, 2, lay.kv_heads, lay.block_tokens, lay.head_dim, dtype=DTYPES[lay.dtype])
        raw_u8 = raw.view(count, -1).view(torch.uint8).numpy()                         # raw_u8: [count, block_bytes]
        cold = np.empty((count, lay.packed_bytes), dtype=np.uint8) if lay.packed_bytes else None  # cold: [count, B]
        crcs = self.table[layer, first:first + count].tolist()
        for i, j, packed in flag_runs(fmt.tolist()):
            for a, b in ([(i, j)] if packed else [(k, k + 1) for k in range(i, j)]):
                pay = cold if packed else raw_u8
                at = lay.packed_offset(layer, first + a) if packed else lay.block_offset(layer, first + a)
                self._pread_checked(pay[a:b], at, crcs[a:b], layer, first + a, "block")
        fmts = torch.from_numpy(fmt)                                                    # fmts: [count] bool
        st = StoredChunks(fmts, raw, torch.from_numpy(cold) if cold is not None else None)
        return st, self.read_rows(layer, first, count)

    def read_rows(self, layer: int, first: int, count: int) -> torch.Tensor | None:
        """The index rows of committed blocks first.. of a layer, CRC-checked: [count, R] u8 (None: the file has
        none). One read for the run: rows lie together, apart from the blocks."""
        lay = self.layout
        if not lay.row_bytes:
            return None
        self._committed(first, count)
        rows = np.empty((count, lay.row_bytes), dtype=np.uint8)                         # rows: [count, R]
        self._pread_checked(rows, lay.row_offset(layer, first), self.rtable[layer, first:first + count].tolist(),
                            layer, first, "the index row of block")
        return torch.from_numpy(rows)

    def _pread_checked(self, buf: np.ndarray, at: int, crcs: list, layer: int, first: int, what: str) -> None:
        """Fill buf [m, bytes] from offset `at` (contiguous: blocks first.. of a layer), then check row i against
        crcs[i]."""
        want, got = buf.nbytes, 0
        mv = memoryview(buf).cast("B")
        try:
            fd = self._fd()
            while got < want:
                r = os.preadv(fd, [mv[got:]], at + got)
                if r == 0:
                    raise SessionFileError(f"it is truncated ({what} {first + got // buf.shape[1]} of layer {layer})")
                got += r
        except OSError as e:
            raise SessionFileError(f"cannot read it ({e.strerror or e})") from None
        crc32 = zlib.crc32
        for i, want_crc in enumerate(crcs):
            if crc32(buf[i]) != want_crc:
                raise SessionFileError(f"{what} {first + i} of layer {layer} is corrupt (checksum mismatch)")

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
