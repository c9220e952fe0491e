"""Drive reads a layer ahead (issue 12, deliverable 6): prefetching never changes what decode attends or computes,
a read-ahead chunk is never read twice, and the adaptive rule stops reading ahead for layers whose predictions miss."""
from __future__ import annotations

import pytest
import torch

from fixtures_models import write_tiny_checkpoint
from offload import LLM
from offload.indexes.selector import Selection
from offload.kernels.reference import combine_selection
from offload.tiers import ChunkShape, TieredKVStore
from offload.tiers.prefetch import PrefetchRule

HKV, C, D, LAYERS, N = 2, 4, 8, 3, 40


def _store(tmp_path, mode: str):
    """Sinks + windows on the GPU, every other chunk on the drive; returns (store, the chunks put per layer)."""
    store = TieredKVStore(ChunkShape(HKV, C, D, torch.float32), LAYERS, (2 * LAYERS, 0, N * LAYERS), "cpu",
                          str(tmp_path), sink_chunks=1, window_chunks=1)
    store.open_decode(N + 8)
    store.prefetch_rule = PrefetchRule(LAYERS, mode)
    g = torch.Generator().manual_seed(0)
    truth = [torch.randn(N, 2, HKV, C, D, generator=g) for _ in range(LAYERS)]    # [N, 2, Hkv, C, D] each
    for first in range(N):
        for layer in range(LAYERS):
            store.put(layer, first, truth[layer][first:first + 1].clone())
    store.begin_decode(N)
    return store, truth


def _selection(ids: torch.Tensor) -> Selection:
    return Selection(ids.contiguous(), ids.shape[1], 1, 1, torch.zeros(HKV, dtype=torch.bool))   # ids: [Hkv, M]


def _attended(plan, sel) -> torch.Tensor:
    """What each (KV head, column) of the plan reads -> [Hkv, K, 2, C, D], asserting exactly one part serves it."""
    ids = combine_selection(sel.ids, torch.tensor([N]), 1, 1, sel.take, sel.streaming)    # [Hkv, K]
    out = torch.full((*ids.shape, 2, C, D), float("nan"))
    served = torch.zeros(ids.shape, dtype=torch.long)
    for part in plan.whole:
        for h in range(HKV):
            for k in range(ids.shape[1]):
                s = int(part.slots[h, k])
                if s >= 0:
                    out[h, k] = part.pool[s][:, h]
                    served[h, k] += 1
    assert torch.equal(served, (ids >= 0).long()), served
    return out, ids


def _decode(tmp_path, mode: str, pick) -> tuple[dict, list[torch.Tensor]]:
    """Plan `steps` decode steps whose layer selections come from pick(step, layer) -> ids [Hkv, M]."""
    store, truth = _store(tmp_path / mode, mode)
    reads = []
    for step in range(16):
        for layer in range(LAYERS):
            sel = _selection(pick(step, layer))
            got, ids = _attended(store.plan(layer, sel), sel)
            rows = truth[layer][ids.clamp(min=0)]                             # rows: [Hkv, K, 2, Hkv', C, D]
            want = torch.stack([rows[h, :, :, h] for h in range(HKV)])        # want: [Hkv, K, 2, C, D]
            valid = ids >= 0                                                  # valid: [Hkv, K]
            assert torch.equal(got[valid], want[valid]), (mode, step, layer)  # the bytes put, bit for bit
            reads.append(got)
    st = store.stats()
    # the last layer already started the reads of a next step's layer 0 that never comes
    st["read_ahead_pending"] = sum(p._staged.chunks.numel() for p in store._prefetched.values() if p._staged)
    store.close()
    return st, reads


def _random(step: int, layer: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + layer)
    return torch.stack([torch.randperm(N - 2, generator=g)[:4] + 1 for _ in range(HKV)])   # [Hkv, 4] fresh each step


def _stable(step: int, layer: int) -> torch.Tensor:
    return _random(0, layer)


def _drifting(step: int, layer: int) -> torch.Tensor:
    """Half of each head's chunks stay, half move every step (more new chunks than the read-ahead buffer's room)."""
    keep = _random(0, layer)[:, :2]
    return torch.cat([keep, _random(step, layer)[:, :6] % (N - 2) + 1], dim=1)        # [Hkv, 8]


def _widening(step: int, layer: int) -> torch.Tensor:
    """One chunk per head, then eight: more missing chunks than the read-ahead buffer has room for (a copy)."""
    if step % 2 == 0:
        return _random(step, layer)[:, :1]                                     # [Hkv, 1]
    return torch.cat([_random(step, layer), _random(step - 1, layer)], 1)      # [Hkv, 8]


@pytest.mark.parametrize("pick", [_random, _stable, _drifting, _widening])
def test_prefetch_modes_read_the_same_bytes_and_never_read_a_chunk_twice(tmp_path, pick):
    stats, reads = {}, {}
    for mode in ("off", "always", "adaptive"):
        stats[mode], reads[mode] = _decode(tmp_path, mode, pick)
    for mode in ("always", "adaptive"):
        assert all(torch.equal(a, b) for a, b in zip(reads[mode], reads["off"])), mode
    off, always = stats["off"], stats["always"]
    assert off.get("prefetch_layers", 0) == 0 and off["disk2h_bytes"] > 0
    # every chunk is read once: what off reads, plus the read-ahead chunks never used
    chunk = C * D * 2 * HKV * 4
    unused = always.get("prefetch_unused_chunks", 0) + always["read_ahead_pending"]
    assert always["disk2h_bytes"] == off["disk2h_bytes"] + unused * chunk, always
    if pick is _stable:
        assert always.get("prefetch_unused_chunks", 0) == 0 and always.get("prefetch_hit_chunks", 0) > 0
        # the adaptive rule keeps reading ahead
        assert stats["adaptive"].get("prefetch_hit_chunks", 0) == always.get("prefetch_hit_chunks", 0)


def test_adaptive_prefetch_stops_reading_ahead_when_predictions_miss(tmp_path):
    always, _ = _decode(tmp_path, "always", _random)
    adaptive, _ = _decode(tmp_path, "adaptive", _random)
    # consecutive selections are independent: most read-ahead chunks go unused, so the rule stops reading ahead
    assert always.get("prefetch_unused_chunks", 0) > 2 * always.get("prefetch_hit_chunks", 0), always
    assert adaptive.get("prefetch_skipped_layers", 0) > adaptive.get("prefetch_layers", 0) > 0, adaptive
    assert adaptive.get("prefetch_unused_chunks", 0) * 4 < always.get("prefetch_unused_chunks", 0), (adaptive, always)
    assert adaptive["disk2h_bytes"] < always["disk2h_bytes"]


def test_adaptive_rule_resumes_once_a_layer_settles():
    rule = PrefetchRule(2, "adaptive", min_precision=0.5, window=4)
    assert rule.wanted(0)                                   # no evidence yet: read ahead
    for _ in range(4):
        rule.observe(0, torch.arange(10), torch.arange(10, 20))   # predicted 10, none needed
        rule.observe(1, torch.arange(10), torch.arange(0, 20))    # all needed
    assert not rule.wanted(0) and rule.wanted(1) and rule.precision(0) == 0.0
    for _ in range(3):                                      # the layer settles: measured without reading ahead
        rule.observe(0, torch.arange(10), torch.arange(10))
    assert rule.wanted(0) and rule.precision(0) == 0.75
    with pytest.raises(ValueError, match="prefetch mode"):
        PrefetchRule(2, "sometimes")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("prefetch"), "llama", num_key_value_heads=2)


def test_decode_logits_equal_with_prefetch_off_always_adaptive(tiny, tmp_path):
    ids = torch.randint(0, 320, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    llm = LLM(str(tiny.path), device="cpu", ctx=512, chunk_tokens=8, sink_tokens=8, window_tokens=16,
              attention="sparse", budget="25%", gpu_mem="40KiB", host_mem="20KiB", disk_mem="4MiB",
              disk_dir=str(tmp_path / "kv"))
    logits, stats = {}, {}
    for mode in ("off", "always", "adaptive"):
        sess = llm.session()
        store = sess.attn.store
        store.prefetch_rule = PrefetchRule(store.num_layers, mode)
        sess.prefill(ids[:200])
        logits[mode] = torch.stack([sess.step(t) for t in ids[200:224]])     # crosses 3 chunk boundaries
        stats[mode] = sess.stats()
        sess.close()
    llm.close()
    assert stats["off"]["hits_disk"] > 0 and stats["off"].get("prefetch_layers", 0) == 0
    assert stats["always"].get("prefetch_hit_chunks", 0) > 0
    for mode in ("always", "adaptive"):
        assert torch.equal(logits[mode], logits["off"]), mode
