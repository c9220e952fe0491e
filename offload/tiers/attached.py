"""Files whose chunks the disk tier reads in place (a prompt cache's blocks), never writing them.

The disk tier adopts chunks that already lie in another file with the tier's own layout (4096-aligned, the
same chunk bytes); it keeps each such file open read-only, checks that it is the file the caller verified
(device and inode), and closes it with the tier. Nothing here ever writes, truncates or removes it.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

from offload.errors import TierIOError

ALIGN = 4096


@dataclass(frozen=True, eq=False)
class FileExtents:
    """Chunks already stored in another file: chunk i at byte offsets[i], crcs[i] = CRC-32 of its bytes."""
    path: str
    identity: tuple[int, int]      # (st_dev, st_ino) of the file the caller checked; a replaced file is refused
    offsets: np.ndarray            # int64 [n], multiples of 4096
    crcs: np.ndarray               # uint32 [n]
    fix: str = "restore or remove the file"   # what the user does when a chunk in it is corrupt


@dataclass(frozen=True)
class Attached:
    fd: int
    direct: bool                   # O_DIRECT: reads bypass the page cache (no second copy of the KV in RAM)
    path: str
    fix: str


class AttachedFiles:
    """The open read-only files of one disk tier, by number."""

    def __init__(self):
        self.files: list[Attached] = []
        self._ids: dict[tuple[int, int], int] = {}

    def open(self, ext: FileExtents) -> int:
        """The number of ext's file, opening it on first use."""
        key = tuple(ext.identity)
        if key in self._ids:
            return self._ids[key]
        fd, direct = -1, False
        try:
            if hasattr(os, "O_DIRECT"):
                try:
                    fd = os.open(ext.path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
                    direct = _probe_read(fd)
                except OSError:
                    direct = False
                if not direct and fd >= 0:
                    os.close(fd)
                    fd = -1
            if fd < 0:
                fd = os.open(ext.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            st = os.fstat(fd)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            raise TierIOError(f"cannot open {ext.path} to read it in place (disk tier): {e.strerror or e}; "
                              f"{ext.fix}") from None
        if (st.st_dev, st.st_ino) != key:
            os.close(fd)
            raise TierIOError(f"{ext.path} was replaced while it was being opened (disk tier); {ext.fix}")
        self.files.append(Attached(fd, direct, ext.path, ext.fix))
        self._ids[key] = len(self.files) - 1
        return len(self.files) - 1

    def __getitem__(self, i: int) -> Attached:
        return self.files[i]

    def close(self) -> None:
        for f in self.files:
            try:
                os.close(f.fd)
            except OSError:
                pass
        self.files.clear()
        self._ids.clear()


def check_aligned(offsets) -> np.ndarray:
    offs = np.asarray(offsets, dtype=np.int64)                                  # offs: [n]
    if bool((offs < 0).any() or (offs % ALIGN).any()):
        raise ValueError("adopted chunks must start on 4096-byte boundaries")
    return offs


def _probe_read(fd: int) -> bool:
    """Some file systems accept O_DIRECT at open and refuse the I/O: try one aligned block."""
    buf = mmap.mmap(-1, ALIGN)
    try:
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        buf.close()
