"""The disk tier: one preallocated file of 4096-aligned slots, O_DIRECT where the file system allows it.

* Slot s lives at byte s * stride, stride = chunk bytes rounded up to 4096, so every I/O is aligned and
  O_DIRECT can bypass the page cache (which would otherwise fill host RAM with a second copy of the KV).
  A probe write at creation decides O_DIRECT; file systems that refuse it (older tmpfs, some FUSE) get
  buffered I/O. Page-aligned sources (the host slab) go to the drive without a bounce copy.
* The file is reserved with fallocate(2) at creation, so "disk full" shows up at start, not an hour
  into a prefill; file systems without fallocate get a sparse file, and a later ENOSPC names the file.
* Every slot has a CRC-32 (zlib: in the standard library, ~2 GB/s per thread with the GIL released, so
  several I/O threads checksum in parallel; it detects every single-byte error and every burst up to 32
  bits, which is the corruption a drive or a stray write produces. It is not a defence against an
  attacker, who could also rewrite the checksum table: the table stays in process memory). It is
  checked on every read; a mismatch raises TierIOError and the destination is zeroed, never returned.
* `adopt` binds slots to chunks that already lie in another file (a prompt cache's blocks, same layout):
  no byte is copied; reads of those slots go to that file (opened read-only, O_DIRECT when it allows) at
  the given offsets and are CRC-checked against the given checksums like any slot. The file is never
  written, truncated or removed; its descriptor stays open until close(), so a file renamed over it
  later leaves these reads on the old, intact bytes. Writing or freeing an adopted slot returns it to kv.bin.
* A write of consecutive slots goes to the drive as runs: one pwrite per piece of at most 8 MiB (at least one
  piece per I/O thread) when slots carry no padding, with a CRC per chunk; a failed piece leaves all its slots
  unreadable (the error names the drive), earlier pieces intact. Per-chunk pwrites of 68 KiB (int8, 8B) took
  1.7x the drive time of the same bytes in runs, and a 1M-token spill makes ~260K of them (issue 12).
* I/O runs on a thread pool; write/read return a Future. `after` handles (CUDA events, futures) are
  waited inside the worker, so a disk write can follow a GPU->host copy without blocking the caller.
  The pool's queue is FIFO, so waiting on a future submitted earlier to the same pool cannot deadlock.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import weakref
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np
import torch

from offload.errors import TierIOError
from offload.tiers.attached import AttachedFiles, FileExtents, check_aligned
from offload.tiers.base import ChunkShape
from offload.tiers.device import _check
from offload.tiers.diskdir import KV_FILE as _FILE, make_private_dir, remove_private_dir
from offload.tiers.slots import SlotAllocator, pieces, runs
from offload.tiers.sync import gather, wait_handles

ALIGN = 4096
_PIECE_BYTES = 8 << 20      # at most this much per write call of an I/O thread (runs of consecutive slots)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def _full_msg(path: str) -> str:
    return f"disk full writing {path} (disk tier): free space in --disk-dir or lower --ctx"


def _eio_msg(path: str, slot: int, op: str) -> str:
    return (f"I/O error {op} {path} slot {slot} (disk tier): check the drive (dmesg) "
            "or pass another --disk-dir")


def _io_error(e: OSError, path: str, slot: int, op: str) -> TierIOError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return TierIOError(_full_msg(path))
    if e.errno == errno.EIO:
        return TierIOError(_eio_msg(path, slot, op))
    return TierIOError(f"{os.strerror(e.errno or 0) or e} {op} {path} slot {slot} (disk tier): "
                       "check --disk-dir (permissions, file system)")


def _address_view(ptr: int, n: int) -> memoryview:
    return memoryview((ctypes.c_char * n).from_address(ptr)).cast("B")


class DiskStore:
    """Tier "disk": chunk slots in <disk_dir>/offload-<pid>-<rand>/kv.bin, each CRC-checked on read."""

    name = "disk"

    def __init__(self, shape: ChunkShape, capacity: int, disk_dir: str, io_threads: int = 4,
                 direct: bool = True, preallocate: bool = True):
        self.shape = shape
        self.capacity = capacity
        self.stride = _round_up(shape.nbytes)
        self.dir, self._lock_fd = make_private_dir(disk_dir)
        self.path = os.path.join(self.dir, _FILE)
        # seams for fault-injection tests: same signatures as os.pwrite / os.preadv
        self._pwrite, self._preadv = os.pwrite, os.preadv
        try:
            self._fd, self.direct = self._open(direct)
            self._reserve(capacity * self.stride, preallocate)
        except BaseException:
            if hasattr(self, "_fd"):
                os.close(self._fd)
            remove_private_dir(self.dir, self._lock_fd)
            raise
        self._crc: list[int | None] = [None] * capacity     # None: the slot holds no complete chunk
        self._bad: dict[int, str] = {}                       # slot -> why its last write failed
        self._slots = SlotAllocator(capacity, self.name)
        self._local = threading.local()
        self._threads = io_threads
        # adopted slots: which attached file (-1: kv.bin) and at what byte
        self._src = np.full(capacity, -1, dtype=np.int32)
        self._off = np.zeros(capacity, dtype=np.int64)
        self._files = AttachedFiles()
        self._count_lock = threading.Lock()
        self.bytes_written = self.bytes_read = 0        # drive traffic of this tier (kv.bin and attached files)
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="offload-disk")
        self._finalizer = weakref.finalize(self, DiskStore._cleanup, self._pool, self._fd, self.dir, self._lock_fd,
                                           self._files)

    # ---- creation -------------------------------------------------------------------------------
    def _open(self, direct: bool) -> tuple[int, bool]:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(self.path, flags | os.O_DIRECT, 0o600)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise TierIOError(f"cannot create {self.path} (disk tier): {e.strerror}; "
                                      "pass a writable --disk-dir") from None
            else:
                if self._probe(fd):
                    return fd, True
                os.close(fd)
                os.unlink(self.path)
        try:
            return os.open(self.path, flags, 0o600), False
        except OSError as e:
            raise TierIOError(f"cannot create {self.path} (disk tier): {e.strerror}; "
                              "pass a writable --disk-dir") from None

    @staticmethod
    def _probe(fd: int) -> bool:
        """Some file systems accept O_DIRECT at open and refuse the I/O itself: try one aligned block."""
        buf = mmap.mmap(-1, ALIGN)
        try:
            return os.pwrite(fd, buf, 0) == ALIGN and os.preadv(fd, [buf], 0) == ALIGN
        except OSError:
            return False
        finally:
            buf.close()

    def _reserve(self, size: int, preallocate: bool) -> None:
        if preallocate and size:
            if _libc.fallocate(self._fd, 0, 0, size) == 0:
                return
            err = ctypes.get_errno()
            if err in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise TierIOError(f"disk full reserving {size / 2**30:.2f} GiB in {self.path} (disk tier): "
                                  "free space in --disk-dir or lower --disk-mem / --ctx")
            # EOPNOTSUPP and friends: no fallocate here, fall through to a sparse file
        try:
            os.ftruncate(self._fd, size)
        except OSError as e:
            raise _io_error(e, self.path, 0, "sizing") from None

    # ---- Tier protocol --------------------------------------------------------------------------
    def alloc(self, n: int) -> list[int]:
        return self._slots.alloc(n)

    def free(self, slots: Sequence[int]) -> None:
        self._slots.free(slots)
        for s in slots:
            self._crc[int(s)] = None     # a stale read of a freed slot fails instead of returning old data
            self._src[int(s)] = -1

    def adopt(self, slots: Sequence[int], extents: FileExtents) -> None:
        """Slots (allocated) now hold the chunks of `extents`, read in place from its file: nothing is copied."""
        if len(slots) != len(extents.offsets) or len(slots) != len(extents.crcs):
            raise ValueError(f"{len(slots)} slots for {len(extents.offsets)} extents")
        offs = check_aligned(extents.offsets)                                   # offs: [n]
        src = self._files.open(extents)
        idx = np.asarray(slots, dtype=np.int64)                                 # idx: [n]
        self._src[idx], self._off[idx] = src, offs
        for s, crc in zip(idx.tolist(), np.asarray(extents.crcs).tolist()):
            self._crc[s] = int(crc)
            self._bad.pop(s, None)

    def write(self, slots: Sequence[int], src: torch.Tensor, stream=None, after: Iterable = ()) -> Future:
        """Store src: [n, 2, Hkv, C, D] (host memory, kept alive by the caller until the Future is done)."""
        _check("src", src, len(slots), self.shape)
        if src.is_cuda:
            raise ValueError("DiskStore.write takes host memory; copy GPU chunks to a pinned buffer first")
        src = src.contiguous()
        slots = [int(s) for s in slots]
        for s in slots:
            self._crc[s] = None
            self._bad.pop(s, None)
            self._src[s] = -1            # an adopted slot is written to kv.bin, never into the attached file
        return self._submit(self._write_run, slots, src, list(after), in_runs=True)

    def read(self, slots: Sequence[int], dst: torch.Tensor, stream=None, after: Iterable = ()) -> Future:
        """Fill dst: [n, 2, Hkv, C, D] (host memory, contiguous); the Future fails with TierIOError."""
        _check("dst", dst, len(slots), self.shape)
        if dst.is_cuda or not dst.is_contiguous():
            raise ValueError("DiskStore.read fills contiguous host memory")
        return self._submit(self._read_one, [int(s) for s in slots], dst, list(after))

    @property
    def num_free(self) -> int:
        return self._slots.num_free

    def _count(self, written: int = 0, read: int = 0) -> None:
        with self._count_lock:
            self.bytes_written += written
            self.bytes_read += read

    # ---- I/O ------------------------------------------------------------------------------------
    def _submit(self, op, slots: list[int], t: torch.Tensor, after: list, in_runs: bool = False) -> Future:
        """Split positions 0..n-1 into pieces for the I/O threads; op(slots, t rows) per piece (in_runs=True: a
        piece is consecutive slots of at most _PIECE_BYTES, so a write is one pwrite per piece) or per chunk."""
        n = len(slots)
        if in_runs:
            per = max(1, min(_PIECE_BYTES // self.stride, -(-n // self._threads)))   # >= one piece per thread
            bounds = [pos for pos, _, _ in pieces(runs(slots), per)] + [n]
        else:
            groups = min(self._threads, n)
            bounds = [n * g // groups for g in range(groups + 1)] if groups else [0]

        def run(lo: int, hi: int) -> None:
            wait_handles(after)
            if in_runs:
                op(slots[lo:hi], t[lo:hi])
            else:
                for pos in range(lo, hi):
                    op(slots[pos], t[pos])

        return gather([self._pool.submit(run, lo, hi) for lo, hi in zip(bounds, bounds[1:])])

    def _bounce(self) -> tuple[memoryview, int]:
        """This thread's page-aligned staging block (O_DIRECT needs aligned memory)."""
        b = getattr(self._local, "buf", None)
        if b is None:
            mm = mmap.mmap(-1, self.stride)
            b = self._local.buf = (mm, memoryview(mm), ctypes.addressof(ctypes.c_char.from_buffer(mm)))
        return b[1], b[2]

    def _direct_ok(self, ptr: int) -> bool:
        return ptr % ALIGN == 0 and self.stride == self.shape.nbytes

    def _write_run(self, slots: list[int], chunks: torch.Tensor) -> None:
        """Consecutive slots: one pwrite of the whole run when the rows can go to the drive as they lie
        (O_DIRECT from aligned memory with no slot padding, or buffered I/O without padding); else chunk by chunk.
        A failure leaves every slot of the run unreadable (named in the error), earlier runs intact."""
        nb, ptr = self.shape.nbytes, chunks.data_ptr()
        if len(slots) == 1 or self.stride != nb or (self.direct and ptr % ALIGN):
            for slot, chunk in zip(slots, chunks):
                self._write_one(slot, chunk)
            return
        buf = _address_view(ptr, nb * len(slots))
        crcs = [zlib.crc32(buf[i * nb:(i + 1) * nb]) for i in range(len(slots))]
        try:
            self._pwrite_all(buf, slots[0] * self.stride)
        except OSError as e:
            err = _io_error(e, self.path, slots[0], "writing")
            for s in slots:
                self._bad[s] = str(err)
            raise err from None
        self._count(written=len(buf))
        for s, crc in zip(slots, crcs):
            self._crc[s] = crc

    def _pwrite_all(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):               # buffered I/O may write short
            n = self._pwrite(self._fd, buf[done:], offset + done)
            if n <= 0:                       # nothing accepted: a full drive (never loop on it)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += n

    def _write_one(self, slot: int, chunk: torch.Tensor) -> None:
        nb, ptr = self.shape.nbytes, chunk.data_ptr()
        if self._direct_ok(ptr) or not self.direct:
            buf = _address_view(ptr, nb)
        else:
            view, addr = self._bounce()
            ctypes.memmove(addr, ptr, nb)
            buf = view                       # padded to the aligned stride; the tail stays zero
        crc = zlib.crc32(buf[:nb])
        try:
            self._pwrite_all(buf, slot * self.stride)
        except OSError as e:
            err = _io_error(e, self.path, slot, "writing")
            self._bad[slot] = str(err)
            raise err from None
        self._count(written=len(buf))
        self._crc[slot] = crc

    def _read_one(self, slot: int, chunk: torch.Tensor) -> None:
        nb, ptr = self.shape.nbytes, chunk.data_ptr()
        want = self._crc[slot]
        if want is None:
            raise TierIOError(self._bad.get(slot) or f"slot {slot} of {self.path} (disk tier) holds no "
                              "complete chunk; it was freed or never written")
        src = int(self._src[slot])
        if src < 0:
            fd, direct, path, base = self._fd, self.direct, self.path, slot * self.stride
        else:
            f, base = self._files[src], int(self._off[slot])
            fd, direct, path, fix = f.fd, f.direct, f.path, f.fix
        into_dst = self._direct_ok(ptr) or not direct
        if into_dst:
            buf, addr = _address_view(ptr, nb), ptr
        else:
            buf, addr = self._bounce()
        try:
            done = 0
            while done < len(buf):
                got = self._preadv(fd, [buf[done:]], base + done)
                if got == 0:
                    if src >= 0:
                        raise TierIOError(f"{path} is truncated at byte {base + done} (read in place by the disk "
                                          f"tier): something else modified it; {fix}")
                    raise TierIOError(f"{self.path} is truncated at slot {slot} (disk tier): "
                                      "something else modified the file; pass a private --disk-dir")
                done += got
        except OSError as e:
            raise _io_error(e, path, slot, "reading") from None
        self._count(read=len(buf))
        if zlib.crc32(buf[:nb]) != want:
            if into_dst:
                ctypes.memset(ptr, 0, nb)    # corrupt bytes never reach the caller
            if src >= 0:
                raise TierIOError(f"{path} is corrupt at byte {base} (checksum mismatch, read in place by the "
                                  f"disk tier); {fix}")
            raise TierIOError(f"checksum mismatch in {self.path} slot {slot} (disk tier): the drive returned "
                              "corrupt data; check it (smartctl, dmesg) or pass another --disk-dir")
        if not into_dst:
            ctypes.memmove(ptr, addr, nb)

    # ---- lifetime -------------------------------------------------------------------------------
    @staticmethod
    def _cleanup(pool: ThreadPoolExecutor, fd: int, path: str, lock_fd: int, attached: AttachedFiles) -> None:
        pool.shutdown(wait=True)
        try:
            os.close(fd)
        except OSError:
            pass
        attached.close()                 # closed, never removed
        remove_private_dir(path, lock_fd)

    def close(self) -> None:
        """Wait for queued I/O, then delete the file and the directory."""
        self._finalizer()
