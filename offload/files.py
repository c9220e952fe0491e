"""Checks on user-named files and user text, done before anything is opened or any weight loads.

Opening a FIFO blocks until a writer appears and a device can stream forever, so every path a user
names (model, config, document, session) is stat()ed first and refused unless it is what we expect:
a regular file, or a directory where a folder is expected. Text must be valid UTF-8: a tokenizer
given surrogate escapes fails deep inside with a traceback, and silently replacing bytes would
change the user's document.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from offload.errors import ConfigError, OffloadError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def kind_of(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path, what: str, fix: str, error: type[OffloadError] = ConfigError) -> os.stat_result:
    """stat() `path` (following links) and refuse anything but a regular file, without opening it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; {fix}") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror}); {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is {kind_of(st.st_mode)}, not a regular file; {fix}")
    return st


def file_or_folder(path, what: str, fix: str, error: type[OffloadError] = ConfigError) -> os.stat_result:
    """Like regular_file, but a directory is accepted too (a model is a folder or a single file)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror}); {fix}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise error(f"{what} {path} is {kind_of(st.st_mode)}, not a file or folder; {fix}")
    return st


def read_utf8(path, what: str, fix: str, max_bytes: int | None = None) -> str:
    """The text of a regular file, refused when too large (max_bytes) or not UTF-8."""
    st = regular_file(path, what, fix)
    if max_bytes is not None and st.st_size > max_bytes:
        raise ConfigError(f"{what} {path} is {st.st_size} bytes, more than the {max_bytes} allowed; {fix}")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read ({e.strerror}); check its permissions") from None
    return utf8_text(data, f"{what} {path}")


def utf8_text(data: bytes | str, what: str) -> str:
    """Decode bytes, or check a str that came through surrogateescape (argv, stdin), as strict UTF-8."""
    try:
        if isinstance(data, str):
            data.encode("utf-8")   # lone surrogates (undecodable argv/stdin bytes) fail here
            return data
        return data.decode("utf-8")
    except UnicodeError as e:
        raise ConfigError(f"{what} is not valid UTF-8 (byte {e.start}); convert it to UTF-8 "
                          "(e.g. iconv -t UTF-8)") from None


def pid_alive(pid: int) -> bool:
    """Whether process pid exists (another user's counts as alive): what our stale-file sweeps ask first."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
