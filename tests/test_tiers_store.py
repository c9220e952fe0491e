"""TieredKVStore: spills through all three tiers bit-identically, and FetchPlans give exact attention."""
from __future__ import annotations

import time

import pytest
import torch

from offload.errors import CapacityError
from offload.kernels import reference
from offload.tiers import ChunkShape, TieredKVStore
from test_tiers import bit_equal, random_bits

POLICIES = ["lru", "attention"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HKV, C, D, LAYERS = 2, 4, 8, 3


def make_store(tmp_path, policy="lru", dtype=torch.float32, caps=(8, 6, 200), **kw):
    shape = ChunkShape(HKV, C, D, dtype)
    kw.setdefault("sink_chunks", 1)
    kw.setdefault("window_chunks", 1)
    return TieredKVStore(shape, LAYERS, caps, DEVICE, str(tmp_path), policy=policy, **kw)


def fill(store, dtype, sizes=(5, 1, 7, 3, 1, 2), seed=0) -> dict[int, torch.Tensor]:
    """Put chunks into every layer in uneven batches; returns the ground truth per layer [N, 2, Hkv, C, D]."""
    truth = {}
    for layer in range(LAYERS):
        truth[layer] = random_bits((sum(sizes), 2, HKV, C, D), dtype, seed=seed + layer)
    first = 0
    for n in sizes:                      # layers interleaved, like decode appending to every layer
        for layer in range(LAYERS):
            store.put(layer, first, truth[layer][first:first + n].to(DEVICE))
        first += n
    return truth


def merged_attention(q, plan, scale):
    o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)                 # o: [Hq, D]
    lse = torch.full(q.shape[:1], float("-inf"), device=q.device)                  # lse: [Hq]
    for pool, slots in plan.parts:
        o2, lse2 = reference.gather_attend(q, pool, slots, scale)
        o, lse = reference.merge_attn(o, lse, o2, lse2)
    return o, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy", POLICIES)
def test_spill_through_all_tiers_is_bit_identical(tmp_path, policy, dtype):
    with make_store(tmp_path, policy, dtype) as store:
        truth = fill(store, dtype)
        st = store.stats()
        assert st["bytes_in_use_gpu"] == st["capacity_bytes_gpu"]           # everything spilled
        assert st["bytes_in_use_host"] == st["capacity_bytes_host"]
        assert st["bytes_in_use_disk"] > 0 and st["h2disk_bytes"] > 0 and st["d2h_bytes"] > 0
        # fetches move hot chunks up (promotion) and feed the policy; the data must not change
        for layer in range(LAYERS):
            store.fetch(layer, torch.tensor([[0, 3, 9, -1], [2, 3, 12, 18]]))
        for layer in range(LAYERS):
            assert bit_equal(store.read(layer, range(19)), truth[layer])
            assert bit_equal(store.read(layer, [18, 0, 7]), truth[layer][[18, 0, 7]])


@pytest.mark.parametrize("policy", POLICIES)
def test_fetch_plan_reproduces_exact_attention(tmp_path, policy):
    torch.manual_seed(0)
    with make_store(tmp_path, policy, caps=(8, 10, 200)) as store:
        truth = fill(store, torch.float32)
        q = torch.randn(4 * HKV, D, dtype=torch.float64, device=DEVICE)         # q: [Hq, D], GQA group 4
        scale = D ** -0.5
        for layer in range(LAYERS):
            for trial in range(3):
                ids = torch.stack([torch.randperm(19)[:7] for _ in range(HKV)])  # ids: [Hkv, 7] per-head
                ids[1, -2:] = -1                                                 # padding
                plan = store.fetch(layer, ids)
                assert len(plan.parts) >= 2 and sum(plan.hits.values()) == int((ids >= 0).sum())
                o, lse = merged_attention(q, plan, scale)
                full = truth[layer].to(DEVICE)                                   # full: [N, 2, Hkv, C, D]
                o_ref, lse_ref = reference.gather_attend(q, full, ids.to(DEVICE), scale)
                torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)
        st = store.stats()
        assert st["hits_disk"] > 0 and st["hits_host"] > 0 and st["hits_gpu"] > 0
        assert abs(st["hit_rate_gpu"] + st["hit_rate_host"] + st["hit_rate_disk"] - 1.0) < 1e-9


def test_one_dimensional_ids_mean_all_heads(tmp_path):
    with make_store(tmp_path) as store:
        truth = fill(store, torch.float32)
        q = torch.randn(2 * HKV, D, device=DEVICE)
        ids = torch.tensor([0, 5, 11, 17])
        o, lse = merged_attention(q, store.fetch(2, ids), 0.3)
        o_ref, lse_ref = reference.gather_attend(q, truth[2].to(DEVICE), ids.expand(HKV, -1).to(DEVICE), 0.3)
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)


def test_prefetch_survives_puts_that_move_its_chunks(tmp_path):
    with make_store(tmp_path, caps=(8, 6, 200)) as store:
        truth = fill(store, torch.float32, sizes=(6, 4))
        ids = torch.tensor([[0, 2, 5, 9], [1, 4, 7, 8]])
        pending = store.prefetch(0, ids)
        more = random_bits((6, 2, HKV, C, D), torch.float32, seed=9)
        store.put(0, 10, more.to(DEVICE))                   # demotes chunks the pending fetch planned for
        truth[0] = torch.cat([truth[0], more])
        q = torch.randn(2 * HKV, D, device=DEVICE)
        o, _ = merged_attention(q, pending.result(), 0.3)
        o_ref, _ = reference.gather_attend(q, truth[0].to(DEVICE), ids.to(DEVICE), 0.3)
        torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)


def test_sinks_and_window_stay_on_gpu(tmp_path):
    with make_store(tmp_path, caps=(9, 4, 200), sink_chunks=1, window_chunks=2) as store:
        fill(store, torch.float32)
        for layer in range(LAYERS):
            plan = store.fetch(layer, torch.tensor([0, 17, 18]))
            assert plan.hits == {"gpu": 3 * HKV, "host": 0, "disk": 0}


@pytest.mark.parametrize("touched", [True, False])
def test_lru_keeps_recently_fetched_chunks_on_gpu(tmp_path, touched):
    with make_store(tmp_path, caps=(8, 4, 200)) as store:
        for layer in (0, 1):                                  # GPU full: 8 chunks, 4 of them unpinned
            store.put(layer, 0, random_bits((4, 2, HKV, C, D), torch.float32).to(DEVICE))
        if touched:
            store.fetch(0, torch.tensor([1, 2]))              # layer 0's middle chunks are now the newest
        store.put(2, 0, random_bits((2, 2, HKV, C, D), torch.float32).to(DEVICE))   # evicts 2 chunks
        hot, cold = (0, 1) if touched else (1, 0)
        assert store.fetch(hot, torch.tensor([1, 2])).hits["gpu"] == 2 * HKV
        assert store.fetch(cold, torch.tensor([1, 2])).hits["host"] == 2 * HKV


def test_overwrite_replaces_a_chunk(tmp_path):
    with make_store(tmp_path) as store:
        truth = fill(store, torch.float32)
        new = random_bits((2, 2, HKV, C, D), torch.float32, seed=42)
        store.put(1, 3, new.to(DEVICE))
        truth[1][3:5] = new
        assert bit_equal(store.read(1, range(19)), truth[1])


def test_in_flight_disk_write_is_never_read_early(tmp_path):
    with make_store(tmp_path, caps=(6, 0, 50)) as store:
        disk = store.tiers[2]
        real = disk._pwrite

        def slow(fd, buf, off):
            time.sleep(0.05)
            return real(fd, buf, off)

        disk._pwrite = slow
        truth = fill(store, torch.float32, sizes=(4,))
        # chunks 1-2 of every layer are still being written; read and fetch must wait, not return garbage
        assert bit_equal(store.read(0, range(4)), truth[0])
        q = torch.randn(HKV, D, device=DEVICE)
        o, _ = merged_attention(q, store.fetch(1, torch.tensor([1, 2])), 1.0)
        o_ref, _ = reference.gather_attend(q, truth[1].to(DEVICE), torch.tensor([[1, 2]] * HKV, device=DEVICE), 1.0)
        torch.testing.assert_close(o, o_ref)


def test_capacity_refusals(tmp_path):
    with pytest.raises(CapacityError, match="--gpu-mem"):
        make_store(tmp_path, caps=(5, 4, 10))                   # 3 layers x (sink + window) = 6 > 5
    with make_store(tmp_path, caps=(6, 2, 2)) as store:
        first = random_bits((3, 2, HKV, C, D), torch.float32)
        store.put(0, 0, first.to(DEVICE))
        with pytest.raises(CapacityError, match="--disk-mem"):
            store.put(1, 0, random_bits((8, 2, HKV, C, D), torch.float32).to(DEVICE))
        # a refused put changes nothing
        assert store.stats()["bytes_in_use_gpu"] == 3 * store.shape.nbytes and store.stats()["put_chunks"] == 3
        assert bit_equal(store.read(0, range(3)), first)
        store.put(1, 0, random_bits((7, 2, HKV, C, D), torch.float32).to(DEVICE))   # exactly fills the store
        assert store.stats()["bytes_in_use_disk"] == 2 * store.shape.nbytes


def test_unknown_chunk_and_bad_shapes_are_refused(tmp_path):
    with make_store(tmp_path) as store:
        store.put(0, 0, random_bits((2, 2, HKV, C, D), torch.float32).to(DEVICE))
        with pytest.raises(ValueError):
            store.fetch(0, torch.tensor([5]))
        with pytest.raises(ValueError):
            store.fetch(1, torch.tensor([0]))
        with pytest.raises(ValueError):
            store.put(0, 2, torch.zeros(1, 2, HKV, C, D + 1, device=DEVICE))
        assert store.fetch(0, torch.tensor([[-1], [-1]])).parts == ()


@pytest.mark.parametrize("policy", POLICIES)
def test_overflow_demotes_a_batch_so_later_puts_skip_ranking(tmp_path, policy, monkeypatch):
    store = make_store(tmp_path, policy, caps=(128, 64, 0))
    assert store.gpu_headroom == 2
    truth = {layer: random_bits((60, 2, HKV, C, D), torch.float32, seed=layer) for layer in range(LAYERS)}
    for layer in range(LAYERS):
        store.put(layer, 0, truth[layer][:42].to(DEVICE))       # 126 of 128 device slots
    ranked = []
    real = store.policy.victims
    monkeypatch.setattr(store.policy, "victims", lambda *a: ranked.append(a[2]) or real(*a))
    for first in range(42, 46):
        for layer in range(LAYERS):
            store.put(layer, first, truth[layer][first:first + 1].to(DEVICE))
    # 12 one-chunk puts into 2 free slots: every 3rd overflows and demotes 1 + 2 spare (10 rankings without)
    assert ranked == [3, 3, 3, 3] and store.tiers[0].num_free == 2
    for layer in range(LAYERS):
        assert bit_equal(store.read(layer, range(46)), truth[layer][:46])
    # the slack never makes a put fail: with the host nearly full it shrinks to what fits
    for layer in range(LAYERS):
        store.put(layer, 46, truth[layer][46:60].to(DEVICE))
    assert store.tiers[1].num_free >= 0
    for layer in range(LAYERS):
        assert bit_equal(store.read(layer, range(60)), truth[layer][:60])
    store.close()


@pytest.mark.parametrize("kv_dtype", ["bf16", "int4"])
@pytest.mark.parametrize("policy", POLICIES)
def test_put_column_stores_what_a_put_per_layer_stores(tmp_path, policy, kv_dtype):
    """A decode boundary puts chunk n of every layer with one call (put_column): after columns that spill through
    GPU, host and disk, and one overwrite, every chunk reads back as it was given (bf16 bit-identical; int4 as
    the same quantization on both routes), and the tiers hold as many chunks as after per-layer puts."""
    dtype = torch.bfloat16
    stores = [make_store(tmp_path / name, policy, dtype, kv_dtype=kv_dtype) for name in ("col", "ref")]
    truth = {layer: random_bits((13, 2, HKV, C, D), dtype, seed=layer) for layer in range(LAYERS)}
    try:
        for n in list(range(13)) + [11]:                     # the last one overwrites chunk 11
            column = torch.stack([truth[layer][n] for layer in range(LAYERS)]).to(DEVICE)  # [L, 2, Hkv, C, D]
            stores[0].put_column(n, column)
            for layer in range(LAYERS):
                stores[1].put(layer, n, column[layer:layer + 1])
        a, b = (s.stats() for s in stores)
        assert a["bytes_in_use_disk"] > 0 and a["put_chunks"] == b["put_chunks"] == 14 * LAYERS
        assert sum(a[f"bytes_in_use_{t}"] for t in ("gpu", "host", "disk")) == \
            sum(b[f"bytes_in_use_{t}"] for t in ("gpu", "host", "disk"))
        for layer in range(LAYERS):
            got, ref = stores[0].read(layer, range(13)), stores[1].read(layer, range(13))
            assert bit_equal(got, ref)
            if kv_dtype == "bf16":
                assert bit_equal(got, truth[layer])
        with pytest.raises(ValueError, match="kv must be"):
            stores[0].put_column(13, column[:1])
    finally:
        for s in stores:
            s.close()


def test_put_column_refuses_when_full_and_changes_nothing(tmp_path):
    with make_store(tmp_path, caps=(2 * LAYERS, 0, 0)) as store:
        kv = random_bits((LAYERS, 2, HKV, C, D), torch.float32, seed=5).to(DEVICE)  # [L, 2, Hkv, C, D]
        store.put_column(0, kv)
        store.put_column(1, kv)
        before = store.stats()
        with pytest.raises(CapacityError, match="KV store is full"):
            store.put_column(2, kv)
        assert store.stats() == before
        assert bit_equal(store.read(0, [0, 1]), kv[[0, 0]].cpu())
