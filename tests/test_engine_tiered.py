"""Exact offloaded attention and sparse decode through the tiered store, on the CPU (the GPU tier is a CPU pool)."""
import pytest
import torch

from fixtures_models import TIERED_OPTS, run_session
from offload import LLM, CapacityError, ConfigError

OPTS = TIERED_OPTS    # tiny, ids and dense: the shared fixtures in fixtures_models.py


def test_forced_spill_through_all_tiers_is_exact(tiny, ids, dense, tmp_path):
    llm = LLM(str(tiny.path), attention="full", gpu_mem="60KiB", host_mem="30KiB", disk_mem="4MiB",
              disk_dir=str(tmp_path / "kv"), **OPTS)
    got, s = run_session(llm, ids, 250)
    st = s.stats()
    assert st["hits_gpu"] > 0 and st["hits_host"] > 0 and st["hits_disk"] > 0, st
    torch.testing.assert_close(got, dense[0], rtol=0, atol=1e-5)
    # KV read back from every tier is bit-identical to the in-memory cache's
    for layer in range(llm.model_config.num_layers):
        k, v = s.attn.read_kv(layer)
        dk, dv = dense[1].attn.read_kv(layer)
        assert k.shape == dk.shape
        torch.testing.assert_close(k, dk, rtol=0, atol=1e-5)
        torch.testing.assert_close(v, dv, rtol=0, atol=1e-5)
    s.close()
    assert not any((tmp_path / "kv").rglob("*.bin"))          # KV files removed on close


def test_tiered_kv_round_trip_is_bit_identical(tiny, ids, dense, tmp_path):
    """Loading known KV into the tiered backend and reading it back returns the same bits."""
    llm = LLM(str(tiny.path), attention="full", gpu_mem="60KiB", host_mem="30KiB", disk_mem="4MiB",
              disk_dir=str(tmp_path / "kv"), **OPTS)
    s = dense[1].fork(attention="full", gpu_mem="60KiB", host_mem="30KiB", disk_mem="4MiB",
                      disk_dir=str(tmp_path / "kv2"))
    for layer in range(llm.model_config.num_layers):
        for a, b in zip(s.attn.read_kv(layer), dense[1].attn.read_kv(layer)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("index,options", [("summary", None), ("summary", {"bounds": "int8", "coarse_group": 4}),
                                           ("shadow", {"rank": 8}), ("ann", None)])
def test_sparse_with_full_budget_equals_exact(tiny, ids, dense, index, options):
    got, _ = run_session(LLM(str(tiny.path), attention="sparse", budget="100%", index=index, index_options=options, **OPTS),
                  ids, 250)
    torch.testing.assert_close(got, dense[0], rtol=0, atol=1e-5)


def test_sparse_small_budget_selects_and_stays_close(tiny, ids, dense):
    got, s = run_session(LLM(str(tiny.path), attention="sparse", budget="10%", **OPTS), ids, 250)
    st = s.stats()
    assert st["selection_ms_per_step"] > 0
    # random tiny weights spread attention evenly, so a 10% budget must change the logits a little, not wildly
    assert 0 < (got - dense[0]).abs().max() < 5


def test_bad_sparse_config_is_refused(tiny):
    with pytest.raises(ConfigError, match="budget"):
        LLM(str(tiny.path), attention="sparse", budget="0", **OPTS).session()
    with pytest.raises(ConfigError, match="index method"):
        LLM(str(tiny.path), attention="sparse", index="magic", **OPTS).session()


def test_planner_refuses_a_context_that_cannot_fit(tiny, tmp_path):
    with pytest.raises(CapacityError, match="lower --ctx"):
        LLM(str(tiny.path), device="cpu", ctx="1M", gpu_mem="1MiB", host_mem="1MiB")


def test_sparse_selection_hits_teach_the_store_policy(tiny, ids, monkeypatch):
    """Chunks that decode selected (read in place, not through fetch) reach the eviction policy as hits."""
    llm = LLM(str(tiny.path), attention="sparse", budget="10%", policy="attention", **OPTS)
    sess = llm.session()
    sess.prefill(ids[:250])
    taught = []
    real = sess.attn.store.learn
    monkeypatch.setattr(sess.attn.store, "learn", lambda layer, c, h: (taught.append((layer, c, h)), real(layer, c, h)))
    for t in ids[250:250 + 2 * OPTS["chunk_tokens"]]:     # crosses at least one chunk boundary
        sess.step(t)
    assert {layer for layer, _, _ in taught} == set(range(llm.model_config.num_layers))
    for _, chunks, hits in taught:
        assert (hits > 0).all() and chunks.unique().numel() == chunks.numel()
        assert hits.sum() <= 2 * OPTS["chunk_tokens"] * llm.model_config.num_kv_heads * chunks.numel()


def test_per_layer_budgets_and_streaming_heads(tiny, ids):
    """A streaming head reads only sinks + window; per-layer budgets apply; bad head numbers are refused."""
    L, Hkv = 2, 2
    steps = len(ids) - 250
    fixed = (OPTS["sink_tokens"] + OPTS["window_tokens"]) // OPTS["chunk_tokens"]
    every_head = {layer: list(range(Hkv)) for layer in range(L)}
    # whole chunks (index summary): the attended-chunk counts below are chunk mode's
    _, s = run_session(LLM(str(tiny.path), attention="sparse", budget=["10%"] * L, streaming_heads=every_head,
                           index="summary", **OPTS), ids, 250)
    st = s.stats()
    assert st["attended_gpu_selections"] + st["attended_host_selections"] == steps * L * Hkv * fixed
    _, s = run_session(LLM(str(tiny.path), attention="sparse", budget=["10%"] * L, streaming_heads={1: [0]},
                           index="summary", **OPTS), ids, 250)
    st = s.stats()
    assert st["attended_gpu_selections"] + st["attended_host_selections"] > steps * L * Hkv * fixed
    with pytest.raises(ConfigError, match="streaming heads"):
        LLM(str(tiny.path), attention="sparse", streaming_heads={0: [5]}, **OPTS).session()
    with pytest.raises(ConfigError, match="per-layer list"):
        LLM(str(tiny.path), attention="sparse", budget=["5%"], **OPTS).session()


def test_sparse_decode_step_shapes_survive_chunk_appends(tiny, ids, monkeypatch):
    """What a captured sparse step depends on changes only when the summary buffers grow, not every chunk:
    the chunk table and the chunk count are read on the device (CUDA graphs replay across appends)."""
    from offload.engine.tiered import TieredAttention
    keys, counts = [], []
    real = TieredAttention.begin

    def begin(self, num_new):
        real(self, num_new)
        if num_new == 1:
            keys.append(self.graph_key())
            counts.append(self.n_chunks)
    monkeypatch.setattr(TieredAttention, "begin", begin)
    # index summary: the token stage's candidate count follows the chunk count until it reaches its cap
    sparse, _ = run_session(LLM(str(tiny.path), attention="sparse", budget="32", index="summary", **OPTS), ids, 250)
    assert len(set(counts)) >= 9 and None not in keys     # (a fractional budget also changes as text grows)
    assert len(set(keys)) <= 2                      # one growth of the index buffers at most
    full, _ = run_session(LLM(str(tiny.path), attention="full", **OPTS), ids, 250)
    assert not torch.equal(sparse, full)            # the budget really was sparse


def test_sparse_reads_gpu_and_host_chunks_in_one_gather(tiny, ids, monkeypatch):
    """With chunks on both tiers, one slot list (host slots flagged) gives what two gathers and a merge give."""
    from offload import kernels
    opts = dict(attention="sparse", budget="40", gpu_mem="100KiB", host_mem="1MiB", index="summary", **OPTS)
    two_pool_calls = []
    gather = kernels.gather_attend
    monkeypatch.setattr(kernels, "gather_attend",
                        lambda q, p, sl, sc, alt=None: two_pool_calls.append(alt is not None) or gather(q, p, sl, sc, alt))
    merged, s = run_session(LLM(str(tiny.path), **opts), ids, 250)
    assert any(two_pool_calls)
    st = s.stats()
    assert st["attended_gpu_selections"] > 0 and st["attended_host_selections"] > 0, st
    real = kernels.plan_slots
    monkeypatch.setattr(kernels, "plan_slots", lambda sel, table, merged, **kw: real(sel, table, False, **kw))  # two lists
    separate, _ = run_session(LLM(str(tiny.path), **opts), ids, 250)
    torch.testing.assert_close(merged, separate, rtol=0, atol=1e-5)
