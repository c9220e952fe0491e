"""Contract of every tier (DevicePool, HostPool, DiskStore) and of the eviction policies."""
from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from offload.errors import CapacityError
from offload.tiers import (AttentionMassPolicy, ChunkShape, DevicePool, DiskStore, HostPool, LRUPolicy, Tier,
                           make_policy)

DTYPES = [torch.float32, torch.bfloat16]
TIERS = ["gpu", "host", "disk"]


def random_bits(shape, dtype, seed=0) -> torch.Tensor:
    """Random bit patterns of dtype with NaN patterns removed (so value equality is bit equality)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        bits = torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)
        x = bits.view(torch.float32)
    else:
        bits = torch.randint(-2**15, 2**15 - 1, shape, generator=g, dtype=torch.int32).to(torch.int16)
        x = bits.view(torch.bfloat16)
    return torch.where(torch.isnan(x), torch.zeros_like(x), x)


def make_tier(kind: str, shape: ChunkShape, capacity: int, tmp_path):
    if kind == "gpu":
        return DevicePool(shape, capacity, "cuda" if torch.cuda.is_available() else "cpu")
    if kind == "host":
        return HostPool(shape, capacity)
    return DiskStore(shape, capacity, str(tmp_path), io_threads=2)


def done(handle) -> None:
    if isinstance(handle, Future):
        handle.result()
    elif handle is not None:
        handle.synchronize()


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[a.dtype]
    return a.dtype == b.dtype and torch.equal(a.cpu().view(ints), b.cpu().view(ints))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", TIERS)
def test_tier_contract(kind, dtype, tmp_path):
    # 2*3*8*16*4 = 3072 B (fp32): not a multiple of 4096, so the disk tier pads and bounces
    shape = ChunkShape(num_kv_heads=3, chunk_tokens=8, head_dim=16, dtype=dtype)
    tier = make_tier(kind, shape, 6, tmp_path)
    try:
        assert isinstance(tier, Tier) and tier.name == kind and tier.capacity == 6 and tier.num_free == 6
        slots = tier.alloc(4)
        assert len(set(slots)) == 4 and tier.num_free == 2
        with pytest.raises(CapacityError):
            tier.alloc(3)
        data = random_bits((4, *shape.shape), dtype, seed=1)                  # data: [4, 2, Hkv, C, D]
        dev = tier.pool.device if kind == "gpu" else torch.device("cpu")
        done(tier.write(slots, data.to(dev)))
        # scattered, reordered read of a subset
        order = [slots[2], slots[0], slots[3]]
        out = torch.empty((3, *shape.shape), dtype=dtype, device=dev)          # out: [3, 2, Hkv, C, D]
        done(tier.read(order, out))
        assert bit_equal(out, data[[2, 0, 3]])
        # free + realloc: the slot comes back and overwriting it leaves the others intact
        tier.free([slots[1]])
        assert tier.num_free == 3
        with pytest.raises(ValueError):
            tier.free([slots[1]])                                            # double free is a bug
        again = tier.alloc(1)
        fresh = random_bits((1, *shape.shape), dtype, seed=2)
        done(tier.write(again, fresh.to(dev)))
        out2 = torch.empty((4, *shape.shape), dtype=dtype, device=dev)
        done(tier.read([slots[0], again[0], slots[2], slots[3]], out2))
        assert bit_equal(out2, torch.cat([data[:1], fresh, data[2:]]))
        with pytest.raises(ValueError):
            tier.write(again, fresh[:, :1].to(dev))                          # wrong shape is refused
    finally:
        if hasattr(tier, "close"):
            tier.close()


def test_host_slab_is_one_page_aligned_block():
    shape = ChunkShape(2, 4, 8, torch.float32)
    pool = HostPool(shape, 10)
    assert tuple(pool.slab.shape) == (10, *shape.shape)
    assert pool.slab.is_contiguous() and pool.slab.data_ptr() % 4096 == 0
    assert pool.is_pinned == torch.cuda.is_available()
    pool.close()


def test_uva_alias_shares_memory():
    from offload.tiers.uva import _LIVE, alias
    base = random_bits((3, 2, 2, 4, 8), torch.bfloat16)
    view = alias(base, torch.device("cpu"), torch.int64)                     # view: [3, 2, 2, 4, 2] int64
    assert view.data_ptr() == base.data_ptr() and tuple(view.shape) == (3, 2, 2, 4, 2)
    assert torch.equal(view.view(torch.bfloat16), base)
    live = len(_LIVE)
    del view
    assert len(_LIVE) == live - 1                                            # the DLPack deleter ran


# ---- policies ------------------------------------------------------------------------------------
def test_pinned_sinks_and_window():
    pol = LRUPolicy(sink_chunks=2, window_chunks=3)
    mask = pol.pinned(torch.arange(10), 10)
    assert mask.tolist() == [True, True, False, False, False, False, False, True, True, True]


def test_lru_evicts_least_recently_used():
    pol = LRUPolicy()
    pol.touch(0, torch.arange(6), torch.zeros(6))
    pol.touch(1, torch.arange(3), torch.zeros(3))
    pol.touch(0, torch.tensor([1, 4]))                   # layer 0 chunks 1 and 4 used again
    layers = torch.tensor([0] * 6 + [1] * 3)
    chunks = torch.cat([torch.arange(6), torch.arange(3)])
    order = pol.victims(layers, chunks, 9).tolist()
    expect = [0, 2, 3, 5, 6, 7, 8, 1, 4]                 # positions by last use
    assert order == expect


def test_attention_mass_keeps_attended_chunks():
    pol = AttentionMassPolicy(decay=0.5)
    pol.touch(0, torch.arange(5), torch.zeros(5))
    # chunk 1 gets mass 1.0 now; chunk 3 got mass 4.0 three steps earlier (decays to 0.5 by now)
    pol.touch(0, torch.tensor([3]), torch.tensor([4.0]))
    pol.touch(0, torch.tensor([[2], [2]]), None)          # two heads select chunk 2: two hits, then decays
    pol.touch(0, torch.tensor([1]), torch.tensor([1.0]))
    layers, chunks = torch.zeros(5, dtype=torch.long), torch.arange(5)
    order = pol.victims(layers, chunks, 5).tolist()
    # mass now: 0 -> 0, 1 -> 1.0, 2 -> 2*0.5 = 1.0, 3 -> 4*0.25 = 1.0, 4 -> 0  (ties: least recent first)
    assert order[:2] == [0, 4]
    assert set(order[2:]) == {1, 2, 3} and order[-1] == 1
    pol.touch(0, torch.tensor([3]), torch.tensor([0.1]))
    assert pol.victims(layers, chunks, 5).tolist()[-1] == 3


@pytest.mark.parametrize("name", ["lru", "attention"])
def test_make_policy(name):
    assert make_policy(name).victims(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0).numel() == 0
