"""The disk tier writes runs of consecutive slots with one pwrite per piece (issue 12: a 1M-token fill spills ~260K
chunks); what reads back is what was put, in every KV dtype, and a drive that fills mid-run loses nothing stored."""
from __future__ import annotations

import errno
import mmap
import os

import pytest
import torch

from offload.errors import TierIOError
from offload.kernels.quant import dequantize_chunks, quantize_chunks
from offload.tiers import ChunkShape, DiskStore, TieredKVStore
from offload.tiers.placement import GPU
from offload.tiers.slots import paired_runs
from test_tiers import bit_equal, random_bits

# the 8B geometry: bf16 chunks of 128 KiB, int8 68 KiB, int4 40 KiB, all multiples of 4096 (slot stride = chunk),
# so the host slab and the staging ring go to the drive as they lie, a run at a time
SHAPE = ChunkShape(8, 32, 128, torch.bfloat16)
LAYERS = 3


def kv_batch(n: int, kv_dtype: str, seed: int) -> torch.Tensor:
    """[n, 2, Hkv, C, D] bf16: arbitrary bit patterns for bf16 (bit identity), KV-like values to quantize."""
    if kv_dtype == "bf16":
        return random_bits((n, *SHAPE.shape), torch.bfloat16, seed)
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *SHAPE.shape), generator=g).to(torch.bfloat16)


def expected(store, layer: int, truth: torch.Tensor) -> torch.Tensor:
    """What read() must return: GPU chunks as given, host/disk chunks as their packed bytes decode."""
    if store.packed is None:
        return truth
    cold = dequantize_chunks(quantize_chunks(truth, store.packed), store.packed, SHAPE.dtype)   # [n, 2, Hkv, C, D]
    on_gpu = (store._tier[layer][:truth.shape[0]] == GPU).view(-1, 1, 1, 1, 1)
    return torch.where(on_gpu, truth, cold)


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t copied into page-aligned memory (as the host slab and the staging ring are: O_DIRECT needs it)."""
    buf = mmap.mmap(-1, t.numel() * t.element_size())
    out = torch.frombuffer(buf, dtype=t.dtype).view(t.shape)                    # out: t.shape
    out.copy_(t)
    return out


def counting_pwrite(disk):
    calls, real = [], disk._pwrite

    def op(fd, buf, off):
        calls.append(len(buf))
        return real(fd, buf, off)
    disk._pwrite = op
    return calls


@pytest.mark.parametrize("kv_dtype", ["bf16", "int8", "int4"])
def test_spill_in_runs_reads_back_what_was_put(tmp_path, kv_dtype):
    # GPU 8 chunks (3 layers x sink + window pinned = 6), host 24, the rest on the drive
    store = TieredKVStore(SHAPE, LAYERS, (8, 24, 200), "cpu", str(tmp_path), sink_chunks=1, window_chunks=1,
                          kv_dtype=kv_dtype)
    disk = store.tiers[2]
    assert disk.stride == store.cold_shape.nbytes            # the run path: no padding between slots
    calls = counting_pwrite(disk)
    truth = {layer: kv_batch(40, kv_dtype, seed=layer) for layer in range(LAYERS)}
    try:
        for first in range(0, 40, 8):                        # layer after layer, as the synthetic fill puts
            for layer in range(LAYERS):
                store.put(layer, first, truth[layer][first:first + 8])
        on_disk = sum(int((store._tier[layer] == 2).sum()) for layer in range(LAYERS))
        assert on_disk > 40
        for layer in range(LAYERS):
            assert bit_equal(store.read(layer, range(40)), expected(store, layer, truth[layer]))
        # the drive got the chunks in runs: far fewer writes than chunks, each a whole number of chunks
        assert disk.bytes_written >= on_disk * disk.stride
        assert len(calls) < disk.bytes_written // disk.stride and max(calls) > disk.stride
        assert all(n % disk.stride == 0 for n in calls)
    finally:
        store.close()


def test_disk_writes_are_cut_into_pieces_of_consecutive_slots(tmp_path):
    disk = DiskStore(SHAPE, 64, str(tmp_path), io_threads=2)
    calls = counting_pwrite(disk)
    try:
        chunks = aligned(kv_batch(12, "bf16", seed=3))
        slots = [0, 1, 2, 3, 4, 10, 11, 12, 30, 31, 32, 33]
        disk.write(slots, chunks).result()
        # runs 0-4, 10-12, 30-33, each cut to at most ceil(12 / 2 threads) = 6 chunks: one pwrite per run here
        assert sorted(calls) == sorted(n * disk.stride for n in (5, 3, 4))
        out = torch.empty_like(chunks)
        disk.read(slots, out).result()
        assert bit_equal(out, chunks)
    finally:
        disk.close()


def test_a_drive_that_fills_mid_run_keeps_earlier_runs_and_never_returns_the_failed_chunks(tmp_path):
    disk = DiskStore(SHAPE, 64, str(tmp_path), io_threads=1)
    real = disk._pwrite
    try:
        good = aligned(kv_batch(4, "bf16", seed=1))
        disk.write([0, 1, 2, 3], good).result()
        budget = [disk.stride + 4096]                        # one chunk and a page, then the drive is full

        def filling(fd, buf, off):
            if budget[0] <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = real(fd, buf[:min(len(buf), budget[0])], off)   # a short write, as a full file system gives
            budget[0] -= n
            return n
        disk._pwrite = filling
        with pytest.raises(TierIOError) as e:
            disk.write([4, 5, 6], aligned(kv_batch(3, "bf16", seed=2))).result()
        assert str(e.value) == f"disk full writing {disk.path} (disk tier): free space in --disk-dir or lower --ctx"
        disk._pwrite = real
        out = torch.empty_like(good)
        disk.read([0, 1, 2, 3], out).result()
        assert bit_equal(out, good)                          # written before: intact
        for slot in (4, 5, 6):                               # the failed run: refused on read, never garbage
            with pytest.raises(TierIOError, match="disk full"):
                disk.read([slot], torch.empty((1, *SHAPE.shape), dtype=SHAPE.dtype)).result()
    finally:
        disk.close()


@pytest.mark.parametrize("kv_dtype", ["bf16", "int8"])
def test_disk_full_while_spilling_runs_is_one_line_at_the_next_put_and_keeps_what_was_stored(tmp_path, kv_dtype):
    store = TieredKVStore(SHAPE, 1, (4, 6, 60), "cpu", str(tmp_path), sink_chunks=1, window_chunks=1,
                          kv_dtype=kv_dtype)
    try:
        truth = kv_batch(30, kv_dtype, seed=5)
        store.put(0, 0, truth[:16])                          # 6 chunks on the drive
        before = store.read(0, range(16))
        was_on_disk = [i for i in range(16) if int(store._tier[0][i]) == 2]
        assert bit_equal(before, expected(store, 0, truth[:16]))
        store.tiers[2]._pwrite = lambda fd, buf, off: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
        store.put(0, 16, truth[16:30])                       # its drive writes fail on the I/O threads
        with pytest.raises(TierIOError, match=r"^disk full writing .*kv\.bin \(disk tier\): free space in "
                                              r"--disk-dir or lower --ctx$"):
            store.put(0, 30, kv_batch(1, kv_dtype, seed=6))
        # each chunk stored before either reads back as it was or, if its own spill failed, says so in one line
        readable = 0
        for i in range(16):
            try:
                got = store.read(0, [i])
            except TierIOError as err:
                assert str(err).startswith("disk full writing ") and "\n" not in str(err)
                continue
            assert bit_equal(got, before[i:i + 1])
            readable += 1
        assert readable >= len(was_on_disk) and was_on_disk   # at least every chunk the drive held before
        assert bit_equal(store.read(0, was_on_disk), before[was_on_disk])
    finally:
        store.close()


def test_host_headroom_spills_a_batch_so_later_puts_skip_ranking_the_host(tmp_path, monkeypatch):
    small = ChunkShape(2, 16, 32, torch.float32)             # 8 KiB chunks: 4096-aligned, so runs too
    truth = random_bits((160, *small.shape), torch.float32, seed=7)
    rankings = {}
    for headroom in (None, 0):
        store = TieredKVStore(small, 1, (4, 128, 256), "cpu", str(tmp_path / str(headroom)), sink_chunks=1,
                              window_chunks=1)
        assert store.host_headroom == 2
        if headroom is not None:
            store.host_headroom = headroom
        store.put(0, 0, truth[:128])                         # the host is full from here on
        ranked = []
        real = store._residents
        monkeypatch.setattr(store, "_residents",
                            lambda tier, real=real, ranked=ranked: ranked.append(tier) or real(tier))
        for first in range(128, 160):                        # one chunk at a time, as decode boundaries put
            store.put(0, first, truth[first:first + 1])
        rankings[headroom] = ranked.count(1)
        assert bit_equal(store.read(0, range(160)), truth)
        store.close()
    assert rankings[0] >= 24                                 # without slack: almost every put ranks the host
    assert rankings[None] * 2 < rankings[0]                  # 2 spare slots: most puts skip the ranking


def test_paired_runs_matches_a_plain_scan():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(0, 40, (1,), generator=g))
        a = torch.cumsum(torch.randint(1, 3, (n,), generator=g), 0).tolist()
        b = torch.cumsum(torch.randint(1, 3, (n,), generator=g), 0).tolist()
        want, i = [], 0
        while i < n:
            j = i + 1
            while j < n and a[j] == a[j - 1] + 1 and b[j] == b[j - 1] + 1:
                j += 1
            want.append((a[i], b[i], j - i))
            i = j
        assert paired_runs(a, b) == want
