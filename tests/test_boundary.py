"""Chunk boundaries of decode (issue 12): the device mirror copies only the chunk-table rows that changed (and still
equals the table after demotions), selection feedback never waits for the device, a put with room skips the
resident scan, and drive reads of the next layer start before the current layer's plan."""
from __future__ import annotations

import pytest
import torch

from fixtures_models import write_tiny_checkpoint
from offload import LLM
from offload.indexes.selector import Selector
from offload.tiers import ChunkShape, TieredKVStore
from offload.tiers.placement import DISK, Residents, plan_put
from offload.tiers.policy import LRUPolicy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HKV, C, D, LAYERS = 2, 4, 8, 3


def _store(tmp_path, caps, n: int) -> TieredKVStore:
    store = TieredKVStore(ChunkShape(HKV, C, D, torch.float32), LAYERS, caps, DEVICE, str(tmp_path),
                          sink_chunks=1, window_chunks=1)
    store.open_decode(64)
    g = torch.Generator().manual_seed(0)
    for first in range(n):                      # one chunk per layer at a time, as decode appends
        for layer in range(LAYERS):
            store.put(layer, first, torch.randn(1, 2, HKV, C, D, generator=g).to(DEVICE))
    return store


def _assert_mirror_is_the_table(store) -> None:
    for layer in range(LAYERS):
        n = int(store._num[layer])
        assert torch.equal(store._dev_tier[layer, :n].cpu(), store._tier[layer][:n]), layer
        assert torch.equal(store._dev_slot[layer, :n].cpu(), store._slot[layer][:n]), layer


def test_mirror_copies_only_changed_rows_and_matches_the_table(tmp_path):
    store = _store(tmp_path, (64, 64, 0), 10)
    store.begin_decode(10)
    assert store.stats()["mirror_rows"] == LAYERS * 10          # the first mirror: every chunk
    _assert_mirror_is_the_table(store)
    for layer in range(LAYERS):                                  # a boundary: one chunk per layer, room on the GPU
        store.put(layer, 10, torch.zeros(1, 2, HKV, C, D, device=DEVICE))
    store.begin_decode(11)
    assert store.stats()["mirror_rows"] == LAYERS * 10 + LAYERS   # only the new rows
    assert store.stats()["mirror_bytes"] == 24 * (LAYERS * 11)
    store.begin_decode(11)                                       # nothing moved: nothing copied
    assert store.stats()["mirror_rows"] == LAYERS * 11
    store.close()


def test_mirror_follows_demotions_to_host_and_disk(tmp_path):
    store = _store(tmp_path, (3 * LAYERS, 2 * LAYERS, 64), 4)
    store.begin_decode(4)
    for first in range(4, 12):                 # every put now demotes: GPU -> host -> disk
        for layer in range(LAYERS):
            store.put(layer, first, torch.zeros(1, 2, HKV, C, D, device=DEVICE))
        store.begin_decode(first + 1)
        _assert_mirror_is_the_table(store)
    assert (store._dev_tier[:, :12] == DISK).any() and store.decode_on_disk()
    assert store.stats()["mirror_rows"] < LAYERS * sum(range(5, 13))   # fewer than whole-table copies
    store.close()


class _Event:
    """A CUDA event stand-in: not done until `land()`; counts host waits."""
    def __init__(self):
        self.done, self.waits = False, 0

    def query(self):
        return self.done

    def synchronize(self):
        self.waits += 1
        self.done = True


def test_feedback_does_not_wait_for_the_device(tmp_path, monkeypatch):
    store = _store(tmp_path, (64, 64, 0), 6)
    store.begin_decode(6)
    ev = _Event()
    monkeypatch.setattr(store, "_copy_done", lambda: ev)
    taught = []
    real = store.learn
    monkeypatch.setattr(store, "learn", lambda layer, ids, hits: taught.append((layer, ids.tolist())) or real(layer, ids, hits))
    store._chunk_hits[1, 3] = 2.0
    store.feedback()
    assert ev.waits == 0 and taught == []              # the copy is queued; nobody waits for it
    assert float(store._chunk_hits.sum()) == 0.0       # counters restart for the next chunk of tokens
    store.begin_decode(6)
    assert ev.waits == 0 and taught == []              # the next step does not wait either
    ev.done = True
    for _ in range(LAYERS):                            # landed: the next steps hand them over, 2 layers a step
        store.begin_decode(6)
    assert taught == [(1, [3])] and ev.waits == 0
    store.close()


def test_plan_put_with_room_does_not_scan_residents():
    def boom():
        raise AssertionError("residents scanned")
    mv = plan_put(LRUPolicy(), 0, torch.arange(5, 7), torch.tensor([7]), boom, 4, boom, 0, 0)
    assert mv.new_gpu == [0, 1] and not (mv.gpu_to_host or mv.new_host or mv.new_disk)
    # the device overflows but the host has room: demotions go to the host without ranking its residents
    gpu = Residents(torch.arange(4), torch.zeros(4, dtype=torch.long), torch.arange(4))
    policy = LRUPolicy(sink_chunks=1, window_chunks=1)
    policy.touch(0, torch.arange(7))
    mv = plan_put(policy, 0, torch.arange(4, 6), torch.tensor([6]), lambda: gpu, 1, boom, 8, 0)
    assert sorted(mv.gpu_to_host) == [1] and mv.new_gpu == [0, 1] and not (mv.host_to_disk or mv.new_disk)


def test_drive_reads_of_the_next_layer_start_before_this_layers_plan(tmp_path, monkeypatch):
    store = _store(tmp_path, (2 * LAYERS, 0, 64), 8)           # sinks + windows on the GPU, the rest on the drive
    store.begin_decode(8)
    selector = Selector(num_layers=LAYERS, num_kv_heads=HKV, chunk_tokens=C, n_sink=1, n_window=1, device=DEVICE)
    q = torch.zeros(4, D, device=DEVICE)
    for layer in range(LAYERS):                                # step 1: what each layer reads from the drive
        store.plan(layer, selector.select(layer, q, 8, 8 * C))
    log = []
    real = store.prefetch
    monkeypatch.setattr(store, "prefetch", lambda layer, ids, **k: log.append(layer) or real(layer, ids, **k))
    for layer in range(LAYERS):                                # step 2
        log.append(("plan", layer))
        store.plan(layer, selector.select(layer, q, 8, 8 * C))
    # planning layer l first starts layer l+1's reads; the last layer starts the next step's layer 0; the
    # layer's own chunks come from that read-ahead (no second read of them)
    assert log == [x for layer in range(LAYERS) for x in (("plan", layer), (layer + 1) % LAYERS)], log
    st = store.stats()
    assert st["prefetch_hit_chunks"] > 0 and st["prefetch_miss_chunks"] == 0, st
    store.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("boundary"), "llama", num_key_value_heads=2)


def test_sparse_decode_with_a_drive_tier_reports_tiers_and_drive_bytes(tiny, tmp_path):
    llm = LLM(str(tiny.path), device="cpu", ctx=512, chunk_tokens=8, sink_tokens=8, window_tokens=16,
              attention="sparse", budget="25%", gpu_mem="40KiB", host_mem="20KiB", disk_mem="4MiB",
              disk_dir=str(tmp_path / "kv"))
    sess = llm.session()
    ids = torch.randint(0, 320, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    sess.prefill(ids[:200])
    for t in ids[200:240]:                 # crosses 5 chunk boundaries
        sess.step(t)
    st = sess.stats()
    assert st["hits_disk"] > 0 and 0 < st["hit_rate_disk"] < 1, st
    assert st["disk_read_bytes_per_token"] > 0 and st["prefetch_hit_chunks"] > 0, st
    sess.close()
