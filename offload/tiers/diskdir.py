"""The disk tier's private directory: <disk_dir>/offload-<pid>-<random>/, mode 0700, with a lock file.

A crashed process leaves its directory (tens of GB) behind; the next start sweeps it. A directory is
stale when its owner is gone: the pid in its name is dead, or (pid reused, e.g. after a container
restart) nobody holds the flock on its lock file. Only directories of the current user that match the
exact name pattern are ever removed.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
import threading

from offload.errors import TierIOError

_NAME = re.compile(r"offload-(\d+)-[A-Za-z0-9_]+")
_LOCK = "lock"
_OURS: set[str] = set()          # directories held by live stores of this process
_OURS_LOCK = threading.Lock()


def _owner_alive(path: str, pid: int) -> bool:
    if pid == os.getpid():
        with _OURS_LOCK:
            return path in _OURS     # our pid but not ours: left by an earlier process with the same pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                  # alive, another user's process
    try:
        fd = os.open(os.path.join(path, _LOCK), os.O_RDONLY)
    except FileNotFoundError:
        return True                  # still being created by a live process
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True                  # the owner holds its lock
    finally:
        os.close(fd)                 # closing drops the lock we may have taken
    return False


def sweep_stale(disk_dir: str) -> list[str]:
    """Remove offload-* directories in disk_dir whose owner process is gone; returns what was removed."""
    removed = []
    try:
        names = os.listdir(disk_dir)
    except OSError:
        return removed
    for name in names:
        m = _NAME.fullmatch(name)
        path = os.path.join(disk_dir, name)
        if m is None or not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
        except OSError:
            continue
        if not _owner_alive(path, int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def make_private_dir(disk_dir: str) -> tuple[str, int]:
    """Create <disk_dir>/offload-<pid>-<rand>/ (0700) holding a locked pid file; returns (path, lock fd)."""
    path = None
    try:
        os.makedirs(disk_dir, mode=0o700, exist_ok=True)
        sweep_stale(disk_dir)
        path = tempfile.mkdtemp(prefix=f"offload-{os.getpid()}-", dir=disk_dir)
        with _OURS_LOCK:
            _OURS.add(path)
        os.chmod(path, 0o700)
        fd = os.open(os.path.join(path, _LOCK), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
            with _OURS_LOCK:
                _OURS.discard(path)
        raise TierIOError(f"cannot create a KV directory in {disk_dir} (disk tier): {e.strerror}; "
                          "pass a writable --disk-dir") from None
    return path, fd


def remove_private_dir(path: str, lock_fd: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    try:
        os.close(lock_fd)
    except OSError:
        pass
    with _OURS_LOCK:
        _OURS.discard(path)
