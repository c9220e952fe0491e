"""Writing a prompt-cache file: commits that only append, A/B records, a new file renamed in after its first commit."""
from __future__ import annotations

import errno
import itertools
import math
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from offload.kvfile.layout import DTYPES, RECORD_BYTES, Layout, _pack_record, _table_crc, _up, tokens_digest
from offload.tiers.slots import flag_runs

if TYPE_CHECKING:
    from offload.kvfile.reader import KVFileReader

_GROUP_BYTES = 256 << 20     # blocks a commit reads from the session and writes at a time
_IO_THREADS = min(8, os.cpu_count() or 1)   # crc32 and pwrite release the GIL: blocks are written in parallel

def _held_bytes(layer: int, g0: int, st, rows) -> int:
    """Memory a group of read blocks holds: packed bytes, bf16 bytes of the unpacked ones, index rows."""
    raw = int((~st.packed).sum()) * st.raw[0].nbytes if st.raw.shape[0] else 0
    return raw + (st.cold.nbytes if st.cold is not None else 0) + (rows.nbytes if rows is not None else 0)


class KVFileWriter:
    """Writes commits of a growing prompt into a cache file: a new one (temp, then rename) or an existing one
    (in place, past its committed blocks). `_pwrite` and `_fsync` are seams for fault-injection tests."""

    def __init__(self, path, layout: Layout, key: dict, n: int = 0, seq: int = 0, slot: int = 1,
                 table: np.ndarray | None = None, ktable: np.ndarray | None = None, tmp: Path | None = None,
                 fmt: np.ndarray | None = None, rtable: np.ndarray | None = None):
        self.path, self.layout, self.key = Path(path), layout, key
        self.n, self.seq, self.slot, self.tmp = n, seq, slot, tmp
        self.table = table if table is not None else np.zeros((layout.layers, layout.blocks), dtype=np.uint32)
        self.ktable = ktable if ktable is not None else np.zeros_like(self.table)
        self.fmt = fmt if fmt is not None else np.zeros(self.table.shape, dtype=np.uint8)
        self.rtable = rtable if rtable is not None else np.zeros_like(self.table)
        self._bg, self._bg_error = None, None       # a background commit in flight: (thread, its done event)
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
                table=reader.table.copy(), ktable=reader.ktable.copy(), fmt=reader.fmt.copy(),
                rtable=reader.rtable.copy())
        st = os.fstat(w._fd)
        if (st.st_dev, st.st_ino) != reader.identity:   # renamed over since it was checked: not ours to extend
            w.close()
            raise OSError(0, "it was replaced by another run")
        return w

    def bytes_to_commit(self, n: int) -> int:
        """Drive bytes the next commit takes at most (a packed block's hole is not written)."""
        lay = self.layout
        per = (lay.packed_bytes or lay.stride) + lay.row_bytes
        return (math.ceil(n / lay.block_tokens) - self.n // lay.block_tokens) * lay.layers * per

    def commit(self, n: int, tokens, logits: torch.Tensor, read_blocks, on_layer=None,
               background: bool = False, max_held: int = 4 << 30) -> None:
        """Make tokens[:n] the file's state. read_blocks(layer, b0, b1) -> (StoredChunks of blocks b0..b1-1,
        the last zero-padded when n ends inside it; index rows [b1-b0, R] u8, or None when the layout has none).
        on_layer(done): called as each layer's blocks are read (progress).
        background: read every block now, then checksum, write and commit on a thread while the caller goes
        on (a long prefill's checkpoint); wait() joins it and raises what it raised. A commit waits first.
        Blocks past max_held bytes in memory (bf16 GPU chunks weigh 4x packed ones) make it a plain commit."""
        self.wait()
        lay, C = self.layout, self.layout.block_tokens
        if self.n % C or n > lay.capacity or n <= self.n:
            raise ValueError(f"cannot commit {n} tokens after {self.n} (block {C}, capacity {lay.capacity})")
        b0, b1 = self.n // C, math.ceil(n / C)
        group = max(1, _GROUP_BYTES // lay.stride)          # a 1M-token commit holds two groups in memory at a time

        def groups():
            for layer in range(lay.layers):
                for g0 in range(b0, b1, group):
                    yield (layer, g0, *read_blocks(layer, g0, min(b1, g0 + group)))
                if on_layer is not None:
                    on_layer(layer + 1)

        lb = logits.detach().float().cpu().contiguous().numpy()
        if not background:
            self._commit(n, tokens, lb, groups())
            return
        held, size, it = [], 0, groups()                     # the session's state at this point, in memory
        for g in it:
            held.append(g)
            size += _held_bytes(*g)
            if size > max_held:                              # too much to hold: write it now, then the rest
                self._commit(n, tokens, lb, itertools.chain(held, it))
                return
        self._bg_error, done = None, threading.Event()

        def run():
            try:
                self._commit(n, tokens, lb, iter(held))
            except BaseException as e:                       # noqa: BLE001  (raised again by wait())
                self._bg_error = e
            finally:
                done.set()

        self._bg = (threading.Thread(target=run, name="offload-cache-commit", daemon=True), done)
        self._bg[0].start()

    def wait(self) -> None:
        """Join a background commit; raise its error, once. An interrupt during the join leaves it joinable
        (the next wait joins it again): two commits never write the file at once."""
        bg = self._bg
        if bg is None:
            return
        # its own event, not join() alone: after an interrupted join, Python 3.11 may report the thread ended
        while not bg[1].wait(0.5):
            pass
        bg[0].join()
        self._bg = None
        err, self._bg_error = self._bg_error, None
        if err is not None:
            raise err

    def _commit(self, n: int, tokens, lb: np.ndarray, groups) -> None:
        lay, off, C = self.layout, self.layout.offsets(), self.layout.block_tokens
        b0, b1 = self.n // C, math.ceil(n / C)
        with ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="offload-cache-write") as pool:
            pending: list = []
            for layer, g0, st, rows in groups:               # reading a group overlaps the previous one's writes
                for f in pending:
                    f.result()
                pending = self._write_blocks(pool, layer, g0, st, rows)
            for f in pending:
                f.result()
        self._write(self.table[:, b0:b1].copy(), None, rows=(off["table"], b0))
        self._write(self.ktable[:, b0:b1].copy(), None, rows=(off["ktable"], b0))
        self._write(self.fmt[:, b0:b1].copy(), None, rows=(off["fmt"], b0))
        self._write(self.rtable[:, b0:b1].copy(), None, rows=(off["rtable"], b0))
        self._write(np.asarray(tokens[self.n:n], dtype=np.int32), off["tokens"] + 4 * self.n)
        slot = 1 - self.slot
        self._write(lb, off["logits"] + slot * _up(4 * lay.vocab))
        self._fsync(self._fd)
        body = {"seq": self.seq + 1, "slot": slot, "n": n, "key": self.key, "layout": asdict(lay),
                "tokens_sha": tokens_digest(tokens[:n]), "table_crc": _table_crc(self.table, b1),
                "ktable_crc": _table_crc(self.ktable, b1), "fmt_crc": _table_crc(self.fmt, b1),
                "rtable_crc": _table_crc(self.rtable, b1),
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
        """Blocks b0.. of a layer (StoredChunks, index rows) into their grids and their table entries; packed
        runs and the rows are checksummed and written on `pool`'s threads (returns their futures)."""
        lay, m, half = self.layout, st.packed.numel(), self.layout.block_bytes // 2
        if (lay.row_bytes and rows is None) or (not lay.packed_bytes and bool(st.packed.any())):
            raise ValueError("the session's blocks do not fit this file's layout (index rows or packed blocks); "
                             "write a new cache")
        raw = st.raw.to("cpu", DTYPES[lay.dtype]).contiguous().view(m, -1).view(torch.uint8).numpy()
        packed = st.packed.tolist() if lay.packed_bytes else [False] * m
        cold = st.cold.numpy() if st.cold is not None else None                 # cold: [m, B] u8
        jobs = []
        if lay.row_bytes:
            row_np = rows.numpy()                                                   # row_np: [m, R]

            def write_rows() -> None:
                for i in range(m):
                    self.rtable[layer, b0 + i] = zlib.crc32(row_np[i])
                self._write(row_np, lay.row_offset(layer, b0))

            jobs.append(pool.submit(write_rows))

        def write_packed(lo: int, hi: int) -> None:     # one contiguous write for blocks lo..hi-1
            for i in range(lo, hi):
                self.table[layer, b0 + i], self.ktable[layer, b0 + i], self.fmt[layer, b0 + i] = zlib.crc32(cold[i]), 0, 1
            self._write(cold[lo:hi], lay.packed_offset(layer, b0 + lo))

        def write_raw(lo: int, hi: int) -> None:        # bf16 blocks at the disk tier's stride: one write
            buf = np.zeros((hi - lo, lay.stride), dtype=np.uint8)               # buf: [n, stride] bytes
            buf[:, :lay.block_bytes] = raw[lo:hi]
            for i in range(lo, hi):
                kcrc = zlib.crc32(raw[i, :half])                                 # K half, then on through V
                self.table[layer, b0 + i] = zlib.crc32(raw[i, half:], kcrc)
                self.ktable[layer, b0 + i], self.fmt[layer, b0 + i] = kcrc, 0
            self._write(buf, lay.block_offset(layer, b0 + lo))

        for i, j, is_packed in flag_runs(packed):
            step = max(1, -(-(j - i) // _IO_THREADS))
            jobs += [pool.submit(write_packed if is_packed else write_raw, lo, min(j, lo + step))
                     for lo in range(i, j, step)]
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
            n = self._pwrite(self._fd, mv[done:], offset + done)
            if n <= 0:     # a drive that accepts nothing more: the same as ENOSPC (never loop on it)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += n

    def close(self) -> None:
        """Stop writing (after a background commit ends); a file never committed is removed (the older cache,
        if any, stays)."""
        try:
            self.wait()         # an interrupt here propagates with the file left open for the running commit
        except Exception:       # noqa: BLE001  (its failure: the caller reported or is reporting one)
            pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None
