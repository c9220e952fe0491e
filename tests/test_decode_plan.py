"""The decode step's contract (select -> plan -> attend -> merge): with a selection that covers every chunk,
attend_plan over the store's DecodePlan equals full attention, whichever tiers hold the chunks and whichever
selection shape (exact, sparse, token stage) produced it; plans are immutable; hits reach the policy by one route."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from offload import kernels
from offload.indexes import Budget, make_index
from offload.indexes.selector import Selector
from offload.kernels import Tail, reference
from offload.tiers import ChunkShape, TieredKVStore
from offload.tiers.base import from_chunks
from offload.tiers.decode import DecodePlan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HQ, HKV, C, D, LAYERS, N = 4, 2, 4, 16, 2, 12       # 12 chunks per layer; sinks 1 + window 1
CAPS = {"gpu": (64, 0, 0), "host": (2 * LAYERS, 64, 0), "disk": (2 * LAYERS, 2, 64)}


def _store(tmp_path, tiers: str) -> tuple[TieredKVStore, dict]:
    store = TieredKVStore(ChunkShape(HKV, C, D, torch.float32), LAYERS, CAPS[tiers], DEVICE, str(tmp_path),
                          sink_chunks=1, window_chunks=1)
    store.open_decode(64)
    g = torch.Generator().manual_seed(0)
    truth = {layer: torch.randn(N, 2, HKV, C, D, generator=g) for layer in range(LAYERS)}  # [N, 2, Hkv, C, D]
    for first in range(N):                      # one chunk at a time into every layer, as decode appends
        for layer in range(LAYERS):
            store.put(layer, first, truth[layer][first:first + 1].to(DEVICE))
    store.begin_decode(N)
    return store, truth


def _selector(mode: str, truth) -> Selector:
    if mode == "exact":
        return Selector(num_layers=LAYERS, num_kv_heads=HKV, chunk_tokens=C, n_sink=1, n_window=1, device=DEVICE)
    indexes = [make_index("summary", num_kv_heads=HKV, num_q_heads=HQ, head_dim=D, chunk_tokens=C, device=DEVICE,
                          dtype=torch.float32, max_chunks=64) for _ in range(LAYERS)]
    sel = Selector(num_layers=LAYERS, num_kv_heads=HKV, chunk_tokens=C, n_sink=1, n_window=1, device=DEVICE,
                   indexes=indexes, budget=Budget.parse("100%"), token_candidates=1.0 if mode == "token" else None)
    for layer in range(LAYERS):
        k, _ = from_chunks(truth[layer])                                        # k: [Hkv, N*C, D]
        sel.index_chunks(layer, 0, k.to(DEVICE))
    return sel


@pytest.mark.parametrize("tiers", ["gpu", "host", "disk"])
@pytest.mark.parametrize("mode", ["exact", "sparse", "token"])
def test_attend_plan_with_a_covering_selection_equals_full_attention(tmp_path, tiers, mode):
    store, truth = _store(tmp_path, tiers)
    selector = _selector(mode, truth)
    g = torch.Generator().manual_seed(1)
    tail_k, tail_v = (torch.randn(HKV, 3, D, generator=g).to(DEVICE) for _ in range(2))  # [Hkv, 3, D] each
    for layer in range(LAYERS):
        q = torch.randn(HQ, D, generator=g).to(DEVICE)                          # q: [Hq, D]
        if mode == "exact":
            selection = selector.select(layer, q, N, N * C + 3)
        else:   # the sparse shape (sinks + window + the index's ids), with a budget that leaves nothing out
            selection = selector.propose(layer, q, N - 2, N)
        assert bool(selection.token_k) == (mode == "token")
        plan = store.plan(layer, selection)
        o, lse = kernels.attend_plan(q, Tail(tail_k, tail_v), plan, D ** -0.5)
        k, v = from_chunks(truth[layer])                                        # k, v: [Hkv, N*C, D]
        k, v = torch.cat([k.to(DEVICE), tail_k], 1), torch.cat([v.to(DEVICE), tail_v], 1)
        want_o, want_lse = reference.dense_attend(q, k, v, D ** -0.5)
        torch.testing.assert_close(o, want_o, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    counts = store.decode_counts()
    assert counts[tiers] + counts["cand_" + tiers] > 0, counts   # the chunks really came from the tier under test
    store.close()


def test_decode_plan_is_frozen(tmp_path):
    store, truth = _store(tmp_path, "host")
    plan = store.plan(0, _selector("exact", truth).select(0, torch.zeros(HQ, D, device=DEVICE), N, N * C))
    assert isinstance(plan, DecodePlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.token_k = 5
    store.close()


def test_selection_hits_reach_the_policy_by_one_route(tmp_path, monkeypatch):
    """Decode hits (counted on the device) and direct fetches both teach the policy through store.learn only."""
    store, truth = _store(tmp_path, "disk")
    taught, touched = [], []
    real_learn, real_touch = store.learn, store.policy.touch
    monkeypatch.setattr(store, "learn", lambda layer, ids, hits: taught.append(layer) or real_learn(layer, ids, hits))
    monkeypatch.setattr(store.policy, "touch", lambda *a: touched.append(a[0]) or real_touch(*a))
    selector = _selector("exact", truth)
    for layer in range(LAYERS):
        store.plan(layer, selector.select(layer, torch.zeros(HQ, D, device=DEVICE), N, N * C))
    assert taught == [] and touched == []       # planning and its drive reads teach nothing by themselves
    store.feedback()
    store.begin_decode(N)        # hits reach the policy over the next steps, not at the boundary itself
    assert taught == list(range(LAYERS)) and touched == taught
    store.fetch(0, torch.tensor([0, 5]))
    assert taught[-1] == 0 and touched == taught
    store.close()
