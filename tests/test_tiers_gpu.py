"""GPU behaviour of the tiers: pinned slab, side-stream copies with events, UVA reads, real overlap.

(The CPU tests in test_tiers*.py also run on the GPU machine: they pick the CUDA device when there is one.)
"""
from __future__ import annotations

import gc

import pytest
import torch

from offload.tiers import ChunkShape, DevicePool, HostPool, TieredKVStore
from offload.tiers.uva import uva_view
from test_tiers import bit_equal, random_bits

pytestmark = pytest.mark.gpu
SHAPE = ChunkShape(8, 64, 128, torch.bfloat16)            # Llama-3-8B: 256 KiB per chunk and layer


def test_host_slab_is_pinned_in_place():
    key = "allocated_bytes.current"
    before = torch.cuda.host_memory_stats().get(key, 0)     # empty until torch's pinned pool is first used
    pool = HostPool(SHAPE, 100)
    assert pool.slab.is_pinned() and pool.pin_method == "cudaHostRegister"
    assert torch.cuda.host_memory_stats().get(key, 0) == before   # torch's power-of-two pinned pool did not grow
    pool.close()
    assert not pool.slab.is_pinned()


def test_side_stream_copies_return_events_and_are_exact():
    dev = DevicePool(SHAPE, 16, "cuda")
    host = HostPool(SHAPE, 16)
    side = torch.cuda.Stream()
    data = random_bits((6, *SHAPE.shape), torch.bfloat16).pin_memory()       # data: [6, 2, Hkv, C, D]
    ev = dev.write([3, 4, 5, 9, 1, 2], data, stream=side)
    assert isinstance(ev, torch.cuda.Event)
    torch.cuda.current_stream().wait_event(ev)
    gathered = dev.pool[[3, 4, 5, 9, 1, 2]]                                   # gathered: [6, 2, Hkv, C, D]
    side.wait_stream(torch.cuda.current_stream())          # the caller orders the copy after its producer
    ev2 = host.write(list(range(6)), gathered, stream=side)                   # D2H into the slab
    ev2.synchronize()
    assert bit_equal(host.slab[:6], data)
    out = torch.empty((6, *SHAPE.shape), dtype=SHAPE.dtype, device="cuda")
    host.read(list(range(6)), out, stream=side).synchronize()
    assert bit_equal(out, data)
    host.close()


def test_uva_view_reads_host_memory_from_a_kernel():
    host = HostPool(SHAPE, 64)
    host.slab.copy_(random_bits((64, *SHAPE.shape), torch.bfloat16))
    view = uva_view(host.slab, "cuda", torch.int64)                          # view: [64, 2, 8, 64, 32] int64
    assert view.is_cuda and view.data_ptr() == host.slab.data_ptr()
    idx = torch.tensor([5, 60, 7, 7, 0], device="cuda")
    got = view.index_select(0, idx).view(torch.bfloat16)                      # got: [5, 2, Hkv, C, D] on GPU
    assert bit_equal(got, host.slab[[5, 60, 7, 7, 0]])
    del view, got
    host.close()


def _overlaps(copy_fn, compute_fn) -> tuple[float, float, float, float]:
    """Run copy_fn on a side stream and compute_fn on the current one; times (ms) from a common origin."""
    side = torch.cuda.Stream()
    ev = {k: torch.cuda.Event(enable_timing=True) for k in ("t0", "c0", "c1", "m0", "m1")}
    ev["t0"].record()
    side.wait_event(ev["t0"])
    with torch.cuda.stream(side):
        ev["c0"].record(side)
        copy_fn()
        ev["c1"].record(side)
    ev["m0"].record()
    compute_fn()
    ev["m1"].record()
    torch.cuda.synchronize()
    return tuple(ev["t0"].elapsed_time(ev[k]) for k in ("c0", "c1", "m0", "m1"))


def test_copy_stream_overlaps_compute():
    src = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()               # src: [1 GiB] pinned
    dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def compute():
        for _ in range(20):
            a @ a                                                              # [8192, 8192]

    compute()
    c0, c1, m0, m1 = _overlaps(lambda: dst.copy_(src, non_blocking=True), compute)
    # the two intervals intersect: the copy ran while the matmuls ran
    assert c0 < m1 and m0 < c1, (c0, c1, m0, m1)


def test_store_put_copies_overlap_later_compute(tmp_path):
    """put() queues its demotion copies on the copy stream and returns: compute after it never waits on them.

    Deterministic: a sleep kernel holds the copy stream, so the copies cannot finish early; if put() (or
    the current stream) waited for them, the compute event could not complete while they are pending.
    """
    store = TieredKVStore(SHAPE, 2, (4096, 8192, 0), "cuda", policy="lru", window_chunks=4)
    kv = torch.randn(4096, *SHAPE.shape, device="cuda").to(SHAPE.dtype)      # kv: 1 GiB of new chunks
    a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    out = torch.matmul(a, a)              # cuBLAS set up and the output allocated now: no implicit sync later
    store.put(0, 0, kv, wait_kv=False)                                        # fills the GPU tier
    kv2 = torch.randn(4096, *SHAPE.shape, device="cuda").to(SHAPE.dtype)
    # earlier tests' host pools unpin (cudaHostUnregister, a device-wide sync) when collected: not during the check
    gc.collect()
    torch.cuda.synchronize()
    with torch.cuda.stream(store._copy):
        torch.cuda._sleep(2_000_000_000)                                      # ~1 s of GPU clock cycles
    store.put(1, 0, kv2, wait_kv=False)                                       # demotes ~1 GiB GPU -> host
    copies_done = torch.cuda.Event()
    copies_done.record(store._copy)
    torch.matmul(a, a, out=out)                                               # later compute
    compute_done = torch.cuda.Event()
    compute_done.record()
    compute_done.synchronize()
    assert not copies_done.query()                    # compute finished while the copies were still queued
    torch.cuda.synchronize()
    assert bit_equal(store.read(1, range(0, 4096, 97)), kv2[::97].cpu())
    assert bit_equal(store.read(0, range(0, 4096, 101)), kv[::101].cpu())
    store.close()
