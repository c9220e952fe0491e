"""Disk tier under faults: full disk, EIO, corrupt bytes; its files, permissions and stale-directory sweep."""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from offload.errors import TierIOError
from offload.tiers import ChunkShape, DiskStore, TieredKVStore, sweep_stale
from test_tiers import bit_equal, random_bits

SHAPE = ChunkShape(2, 8, 16, torch.float32)          # 2 KiB chunks, padded to 4 KiB slots


def chunks(n, seed=0):
    return random_bits((n, *SHAPE.shape), torch.float32, seed)


def read_back(store, slots):
    out = torch.empty((len(slots), *SHAPE.shape))
    store.read(slots, out).result()
    return out


def failing_after(real, ok_calls: int, err: int):
    calls = [0]

    def op(*a):
        calls[0] += 1
        if calls[0] > ok_calls:
            raise OSError(err, os.strerror(err))
        return real(*a)
    return op


def test_injected_disk_full_names_file_and_keeps_earlier_chunks(tmp_path):
    store = DiskStore(SHAPE, 8, str(tmp_path), io_threads=1)
    try:
        good = chunks(3)
        slots = store.alloc(3)
        store.write(slots, good).result()
        store._pwrite = failing_after(store._pwrite, 1, errno.ENOSPC)
        more = store.alloc(3)
        with pytest.raises(TierIOError) as e:
            store.write(more, chunks(3, seed=1)).result()
        assert str(e.value) == f"disk full writing {store.path} (disk tier): free space in --disk-dir or lower --ctx"
        assert bit_equal(read_back(store, slots), good)                       # still usable
        with pytest.raises(TierIOError, match="disk full"):
            read_back(store, more[1:2])                                          # the failed chunk never reads
        assert bit_equal(read_back(store, more[:1]), chunks(3, seed=1)[:1])     # the one written before
    finally:
        store.close()


def test_a_drive_that_accepts_no_bytes_is_full_not_a_hang(tmp_path):
    """pwrite returning 0 (nothing written, no error) must not spin the write loop forever."""
    store = DiskStore(SHAPE, 4, str(tmp_path), io_threads=1)
    try:
        store._pwrite = lambda fd, buf, off: 0
        slots = store.alloc(1)
        with pytest.raises(TierIOError, match="disk full"):
            store.write(slots, chunks(1)).result(timeout=30)
    finally:
        store.close()


def test_disk_full_through_the_store_surfaces_at_next_put(tmp_path):
    shape = ChunkShape(2, 4, 8, torch.float32)
    store = TieredKVStore(shape, 1, (2, 1, 20), "cpu", str(tmp_path), window_chunks=1)
    try:
        first = random_bits((4, *shape.shape), torch.float32, 1)
        store.put(0, 0, first)                                                  # 1 chunk reaches the disk
        assert bit_equal(store.read(0, range(4)), first)                       # (waits for that write)
        disk = store.tiers[2]
        disk._pwrite = failing_after(disk._pwrite, 0, errno.ENOSPC)
        store.put(0, 4, random_bits((2, *shape.shape), torch.float32, 2))      # its disk write fails async
        with pytest.raises(TierIOError, match=r"disk full writing .*kv\.bin \(disk tier\)"):
            store.read(0, range(6))
        with pytest.raises(TierIOError, match="disk full"):
            store.put(0, 6, random_bits((1, *shape.shape), torch.float32, 3))
        assert bit_equal(store.read(0, [0, 1]), first[[0, 1]])    # stored before (GPU, disk): still there
    finally:
        store.close()


@pytest.mark.parametrize("op", ["read", "write"])
def test_eio_raises_tier_io_error(tmp_path, op):
    store = DiskStore(SHAPE, 4, str(tmp_path))
    try:
        slots = store.alloc(2)
        if op == "write":
            store._pwrite = failing_after(store._pwrite, 0, errno.EIO)
            with pytest.raises(TierIOError, match=r"I/O error writing .*kv\.bin slot \d \(disk tier\)"):
                store.write(slots, chunks(2)).result()
        else:
            store.write(slots, chunks(2)).result()
            store._preadv = failing_after(store._preadv, 0, errno.EIO)
            with pytest.raises(TierIOError, match=r"I/O error reading .*kv\.bin slot \d \(disk tier\)"):
                read_back(store, slots)
    finally:
        store.close()


@pytest.mark.parametrize("direct", [True, False])
def test_flipped_byte_is_detected_and_never_returned(tmp_path, direct):
    store = DiskStore(SHAPE, 4, str(tmp_path), direct=direct)
    try:
        slots = store.alloc(3)
        store.write(slots, chunks(3)).result()
        with open(store.path, "r+b") as f:                  # one byte of slot slots[1], mid-chunk
            f.seek(slots[1] * store.stride + 777)
            b = f.read(1)
            f.seek(slots[1] * store.stride + 777)
            f.write(bytes([b[0] ^ 0x10]))
        out = torch.full((1, *SHAPE.shape), 7.0)
        with pytest.raises(TierIOError, match=rf"checksum mismatch in {store.path} slot {slots[1]} \(disk tier\)"):
            store.read(slots[1:2], out).result()
        assert bool(((out == 0) | (out == 7.0)).all())      # zeroed or untouched: no corrupt data handed out
        assert bit_equal(read_back(store, [slots[0], slots[2]]), chunks(3)[[0, 2]])
    finally:
        store.close()


def test_files_permissions_and_removal(tmp_path):
    store = DiskStore(SHAPE, 4, str(tmp_path / "kv"))
    d = store.dir
    assert os.path.dirname(d) == str(tmp_path / "kv")
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for name in os.listdir(d):
        assert stat.S_IMODE(os.stat(os.path.join(d, name)).st_mode) == 0o600
    assert os.path.getsize(store.path) == 4 * 4096
    store.close()
    assert not os.path.exists(d)
    store.close()                                            # idempotent


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_directories_are_swept(tmp_path):
    # a live owner holding its lock: a child process with an open store
    code = ("import sys, torch; from offload.tiers import DiskStore, ChunkShape; "
            "s = DiskStore(ChunkShape(1, 1, 8, torch.float32), 1, sys.argv[1]); print(s.dir, flush=True); "
            "sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        live = child.stdout.readline().strip()
        dead_pid = _dead_pid()
        dead = tmp_path / f"offload-{dead_pid}-abc123"
        mine_but_orphaned = tmp_path / f"offload-{os.getpid()}-zzz"      # e.g. an earlier container with our pid
        for p, pid in ((dead, dead_pid), (mine_but_orphaned, os.getpid())):   # crashed stores: marker, lock, kv
            p.mkdir()
            (p / "kv.bin").write_bytes(b"x" * 10)
            (p / "lock").write_text(f"{pid}\n")
            (p / "offload-kv-dir.json").write_text(json.dumps({"format": "offload-kv-dir/1", "pid": pid,
                                                               "uid": os.getuid()}))
        # a user's own folders whose names look like ours: never touched, whatever else they hold
        lookalikes = {"no_marker": f"offload-{_dead_pid()}-notes",
                      "foreign_marker": f"offload-{_dead_pid()}-mine",
                      "extra_file": f"offload-{_dead_pid()}-keep",
                      "unrelated": "offload-notes"}
        for kind, name in lookalikes.items():
            p = tmp_path / name
            p.mkdir()
            (p / "kv.bin").write_bytes(b"user data")
            pid = int(name.split("-")[1]) if kind != "unrelated" else 0
            if kind == "foreign_marker":
                (p / "offload-kv-dir.json").write_text('{"format": "something-else", "pid": %d}' % pid)
            if kind == "extra_file":     # our marker, but the user put a file beside ours: keep it all
                (p / "offload-kv-dir.json").write_text(json.dumps({"format": "offload-kv-dir/1", "pid": pid,
                                                                   "uid": os.getuid()}))
                (p / "thesis.tex").write_text("precious")
        link = tmp_path / f"offload-{_dead_pid()}-link"
        link.symlink_to(tmp_path / lookalikes["no_marker"])
        removed = sweep_stale(str(tmp_path))
        assert sorted(removed) == sorted([str(dead), str(mine_but_orphaned)])
        assert os.path.isdir(live)
        for name in lookalikes.values():
            assert (tmp_path / name / "kv.bin").read_bytes() == b"user data"
        assert (tmp_path / lookalikes["extra_file"] / "thesis.tex").read_text() == "precious"
        assert link.is_symlink()
        child.kill()                                          # crash: no cleanup runs
        child.wait()
        assert os.path.isdir(live)
        store = DiskStore(SHAPE, 1, str(tmp_path))            # a new start sweeps the crashed one
        assert not os.path.exists(live) and os.path.isdir(store.dir)
        store.close()
    finally:
        child.kill()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_disk_full_on_a_tiny_tmpfs(tiny_tmpfs):
    # preallocation reports a full disk at creation and leaves nothing behind
    with pytest.raises(TierIOError, match="disk full reserving .* --disk-dir"):
        DiskStore(SHAPE, 64, tiny_tmpfs)
    assert [n for n in os.listdir(tiny_tmpfs) if n.startswith("offload-")] == []
    # without preallocation (a file system without fallocate) the write that overflows fails
    store = DiskStore(SHAPE, 64, tiny_tmpfs, preallocate=False, io_threads=1)
    try:
        written = []
        with pytest.raises(TierIOError, match=rf"disk full writing {store.path} \(disk tier\)"):
            for i in range(64):
                slot = store.alloc(1)
                store.write(slot, chunks(1, seed=i)).result()
                written.append((slot[0], i))
        assert len(written) >= 4
        for slot, i in written:
            assert bit_equal(read_back(store, [slot]), chunks(1, seed=i))
    finally:
        store.close()


def test_corrupt_chunk_through_the_store(tmp_path):
    shape = ChunkShape(2, 4, 8, torch.float32)
    store = TieredKVStore(shape, 1, (2, 1, 20), "cpu", str(tmp_path), window_chunks=1)
    try:
        kv = random_bits((4, *shape.shape), torch.float32, 5)
        store.put(0, 0, kv)
        assert bit_equal(store.read(0, range(4)), kv)
        disk = store.tiers[2]
        slot = int(store._slot[0][1])                     # chunk 1 is the one that went to disk
        assert int(store._tier[0][1]) == 2
        with open(disk.path, "r+b") as f:
            f.seek(slot * disk.stride + 5)
            b = f.read(1)
            f.seek(slot * disk.stride + 5)
            f.write(bytes([b[0] ^ 1]))
        with pytest.raises(TierIOError, match=rf"checksum mismatch in {disk.path} slot {slot}"):
            store.read(0, [1])
        with pytest.raises(TierIOError, match="checksum mismatch"):
            store.fetch(0, torch.tensor([0, 1]))
        assert bit_equal(store.read(0, [0, 2, 3]), kv[[0, 2, 3]])
    finally:
        store.close()
