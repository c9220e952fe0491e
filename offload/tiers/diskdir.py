"""The disk tier's private directory: <disk_dir>/offload-<pid>-<random>/, mode 0700, with a lock and a marker.

A crashed process leaves its directory (tens of GB) behind; the next start that names the same
`--disk-dir` sweeps it. Only what a marker we wrote proves is ours is ever removed: a directory of the
current user, named by our pattern, holding a regular `offload-kv-dir.json` whose format tag and uid are
ours. Even then only the files we create (`lock`, the marker, `kv.bin`) are unlinked and the directory is
rmdir'ed; anything else inside (a user's file, a subfolder) keeps the directory where it is. We never recurse.
A directory is stale when its owner is gone: the pid in its name is dead, or (pid reused, e.g. after a
container restart) nobody holds the flock on its lock file.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import stat
import tempfile
import threading

from offload.errors import TierIOError
from offload.files import pid_alive

_NAME = re.compile(r"offload-(\d+)-[A-Za-z0-9_]+")
_LOCK = "lock"
_MARKER = "offload-kv-dir.json"
_FORMAT = "offload-kv-dir/1"
KV_FILE = "kv.bin"
_OUR_FILES = (_LOCK, _MARKER, KV_FILE)   # all a private directory ever holds
_OURS: set[str] = set()          # directories held by live stores of this process
_OURS_LOCK = threading.Lock()


def _owner_alive(path: str, pid: int) -> bool:
    if pid == os.getpid():
        with _OURS_LOCK:
            return path in _OURS     # our pid but not ours: left by an earlier process with the same pid
    if not pid_alive(pid):
        return False
    try:
        fd = os.open(os.path.join(path, _LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return True                  # no lock yet (still being created) or unreadable: assume alive
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True                  # the owner holds its lock
    finally:
        os.close(fd)                 # closing drops the lock we may have taken
    return False


def _is_ours(path: str, pid: int) -> bool:
    """True when path holds a marker we wrote: a regular file, our format tag, our uid and the name's pid."""
    try:
        fd = os.open(os.path.join(path, _MARKER), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size > 4096:
            return False
        meta = json.loads(os.read(fd, 4096).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    finally:
        os.close(fd)
    return (isinstance(meta, dict) and meta.get("format") == _FORMAT and meta.get("uid") == os.getuid()
            and meta.get("pid") == pid)


def _remove_ours(path: str) -> bool:
    """Unlink the files we create, then rmdir; False (directory kept whole) when anything else is inside."""
    try:
        names = os.listdir(path)
        if any(n not in _OUR_FILES or not stat.S_ISREG(os.lstat(os.path.join(path, n)).st_mode) for n in names):
            return False             # a file or folder we never create: the directory is not ours alone
    except OSError:
        return False
    for name in _OUR_FILES:
        p = os.path.join(path, name)
        try:
            if stat.S_ISREG(os.lstat(p).st_mode):
                os.unlink(p)
        except FileNotFoundError:
            pass
        except OSError:
            return False
    try:
        os.rmdir(path)               # fails on anything we did not create: it stays, and so does the directory
    except OSError:
        return False
    return True


def sweep_stale(disk_dir: str) -> list[str]:
    """Remove our private directories in disk_dir whose owner process is gone; returns what was removed."""
    removed = []
    try:
        names = os.listdir(disk_dir)
    except OSError:
        return removed
    for name in names:
        m = _NAME.fullmatch(name)
        path = os.path.join(disk_dir, name)
        if m is None:
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue                 # links, files and other users' directories are never touched
        pid = int(m.group(1))
        if _is_ours(path, pid) and not _owner_alive(path, pid) and _remove_ours(path):
            removed.append(path)
    return removed


def make_private_dir(disk_dir: str) -> tuple[str, int]:
    """Create <disk_dir>/offload-<pid>-<rand>/ (0700) holding a locked pid file and our marker; returns
    (path, lock fd)."""
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
        marker = json.dumps({"format": _FORMAT, "pid": os.getpid(), "uid": os.getuid()}).encode()
        mfd = os.open(os.path.join(path, _MARKER), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(mfd, marker)
        finally:
            os.close(mfd)
    except OSError as e:
        if path is not None:
            _remove_ours(path)
            with _OURS_LOCK:
                _OURS.discard(path)
        raise TierIOError(f"cannot create a KV directory in {disk_dir} (disk tier): {e.strerror}; "
                          "pass a writable --disk-dir") from None
    return path, fd


def remove_private_dir(path: str, lock_fd: int) -> None:
    _remove_ours(path)
    try:
        os.close(lock_fd)
    except OSError:
        pass
    with _OURS_LOCK:
        _OURS.discard(path)
