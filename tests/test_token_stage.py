"""The token-level second selection stage (select_unit="token"): exact when the budget covers everything,
the same picks as a brute-force top-k of exact scores, and refused option values."""
import pytest
import torch

from fixtures_models import TIERED_OPTS, run_session, write_tiny_checkpoint
from offload import LLM, ConfigError, OffloadConfig
from offload.kernels.reference import ALT_SLOT
from offload.kernels.tokens import gather_candidate_keys, select_tokens, token_attend

OPTS = TIERED_OPTS    # tiny, ids and dense: the shared fixtures in fixtures_models.py


def _force_token_stage(attn):
    """Send every stored chunk outside sinks + window through the token stage with k = all their tokens.

    The backend itself never does this (a budget that covers every chunk attends them whole), so this is
    how the token stage's path through the backend (slot plan, key scoring, top-k, V gather, merge) is held
    to exact decode, with a small budget that sends the step down the sparse path."""
    from offload.indexes.selector import Selection
    sel = attn.selector

    def propose(layer, q, budget, n):
        middle = torch.arange(sel.n_sink, n - sel.n_window, device=sel.device)      # middle: [n - fixed]
        fixed = sel.n_sink + sel.n_window
        return Selection(middle.expand(sel.Hkv, -1).contiguous(), n - fixed, sel.n_sink, sel.n_window,
                         sel.streaming[layer], (n - fixed) * sel.C, sel.token_reduce)
    sel.propose = propose


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_token_stage_with_everything_in_budget_equals_exact(tiny, ids, dense, reduce):
    llm = LLM(str(tiny.path), attention="sparse", budget="100%", select_unit="token", token_candidates=2,
              token_reduce=reduce, **OPTS)
    got, _ = run_session(llm, ids, 250)              # a covering budget: every chunk whole, exact
    torch.testing.assert_close(got, dense[0], rtol=0, atol=1e-5)
    s = LLM(str(tiny.path), attention="sparse", budget="10%", select_unit="token", token_reduce=reduce,
            **OPTS).session()
    _force_token_stage(s.attn)
    out = [s.prefill(ids[:250])] + [s.step(t) for t in ids[250:]]
    torch.testing.assert_close(torch.stack(out), dense[0], rtol=0, atol=1e-5)
    st = s.stats()
    assert st["scored_key_bytes"] > 0 and st["token_attended_bytes"] == 2 * st["scored_key_bytes"], st


def test_token_stage_small_budget_selects_and_stays_close(tiny, ids, dense):
    got, s = run_session(LLM(str(tiny.path), attention="sparse", budget="10%", select_unit="token",
                             token_candidates=4, **OPTS), ids, 250)
    st = s.stats()
    # candidates: 4 x the budget's chunks, keys only (half of K+V); attended: the budget's tokens
    assert st["scored_key_bytes"] > st["token_attended_bytes"] / 2 > 0, st
    # candidate chunks are counted apart from what is attended whole (keys of C=8 tokens x D=16 x fp32 each)
    assert st["scored_key_bytes"] == (st["candidate_gpu_selections"] + st["candidate_host_selections"]) * 8 * 16 * 4
    assert st["attended_gpu_selections"] > 0, st
    assert 0 < (got - dense[0]).abs().max() < 5


def _pool_and_parts(S=12, hkv=2, C=4, D=8, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(S, 2, hkv, C, D, generator=g, dtype=torch.float64)       # pool: [S, 2, Hkv, C, D]
    slots = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(hkv)])  # slots: [Hkv, K]
    slots[1, -1] = -1                                                          # padding
    # two parts with the FetchPlan column layout: a slot lives in exactly one part, -1 in the other
    first = torch.rand(hkv, K, generator=g) < 0.5                              # first: [Hkv, K]
    none = torch.full_like(slots, -1)
    return pool, [(pool, torch.where(first, slots, none), None),
                  (pool.clone(), torch.where(first, none, slots), None)], slots


def test_token_stage_reads_one_merged_list_of_two_pools_like_two_parts():
    """The backend's merged layout (host-slab slots flagged ALT_SLOT in one list) picks and attends the same."""
    pool, parts, _ = _pool_and_parts(seed=7)
    (p0, s0, _), (p1, s1, _) = parts
    merged = [(p0, torch.where(s1 >= 0, s1 | ALT_SLOT, s0), p1)]
    q = torch.randn(6, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)  # q: [Hq, D]
    for reduce in ("max", "sum"):
        want = token_attend(q, parts, 9, 8 ** -0.5, reduce)
        torch.testing.assert_close(token_attend(q, merged, 9, 8 ** -0.5, reduce), want, rtol=0, atol=0)


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_token_selection_equals_brute_force_topk(reduce):
    hkv, C, D, G, k = 2, 4, 8, 3, 7
    pool, parts, slots = _pool_and_parts(hkv=hkv, C=C, D=D)
    q = torch.randn(hkv * G, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # q: [Hq, D]
    base = torch.randn(hkv * G, dtype=torch.float64)                            # base: [Hq]
    scale = D ** -0.5
    for h in range(hkv):
        # brute force: every valid candidate token of head h, scored one by one
        toks = [(s, c) for s in slots[h].tolist() if s >= 0 for c in range(C)]
        keys = torch.stack([pool[s, 0, h, c] for s, c in toks])                 # keys: [M, D]
        qh = q[h * G:(h + 1) * G]                                               # qh: [G, D]
        sc = qh @ keys.T * scale                                                # sc: [G, M]
        if reduce == "max":
            r = sc.max(0).values
        else:
            norm = torch.logaddexp(torch.logsumexp(sc, 1), base[h * G:(h + 1) * G])  # norm: [G]
            r = torch.exp(sc - norm[:, None]).sum(0)
        want = {toks[i] for i in torch.topk(r, k).indices.tolist()}
        # the stage: the parts share one column layout, so a position maps back to (slot, offset) directly
        ck, valid = gather_candidate_keys(parts, hkv, q.device)                 # ck: [Hkv, M', D]
        idx, ok = select_tokens(q, ck, valid, k, scale, reduce, base)           # idx: [Hkv, k]
        assert bool(ok[h].all())
        got = set()
        for i in idx[h].tolist():
            got.add((int(slots[h, i // C]), i % C))
        assert got == want


def test_token_attend_matches_attention_over_the_picked_rows():
    hkv, C, D, G, k = 2, 4, 8, 3, 6
    pool, parts, slots = _pool_and_parts(hkv=hkv, C=C, D=D, seed=3)
    q = torch.randn(hkv * G, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # q: [Hq, D]
    scale = D ** -0.5
    o, lse = token_attend(q, parts, k, scale, "max")                            # o: [Hq, D], lse: [Hq]
    for h in range(hkv):
        toks = [(s, c) for s in slots[h].tolist() if s >= 0 for c in range(C)]
        kk = torch.stack([pool[s, 0, h, c] for s, c in toks])                   # kk: [M, D]
        vv = torch.stack([pool[s, 1, h, c] for s, c in toks])                   # vv: [M, D]
        qh = q[h * G:(h + 1) * G]                                               # qh: [G, D]
        top = torch.topk((qh @ kk.T * scale).max(0).values, k).indices          # top: [k]
        s = qh @ kk[top].T * scale                                              # s: [G, k]
        torch.testing.assert_close(lse[h * G:(h + 1) * G], torch.logsumexp(s, 1).float())
        torch.testing.assert_close(o[h * G:(h + 1) * G], (torch.softmax(s, 1) @ vv[top]).float())


def test_token_attend_with_fewer_candidates_than_k_attends_what_there_is():
    pool, parts, slots = _pool_and_parts(hkv=2, C=4, D=8, K=2, seed=5)
    q = torch.randn(6, 8, dtype=torch.float64)                                  # q: [Hq, D]
    o, lse = token_attend(q, parts, 100, 8 ** -0.5, "sum")
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("bad,match", [(dict(select_unit="tokens"), "select_unit"),
                                       (dict(token_candidates=0.5), "token_candidates"),
                                       (dict(token_candidates="4"), "token_candidates"),
                                       (dict(token_reduce="mean"), "token_reduce")])
def test_bad_token_stage_options_are_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        OffloadConfig(**bad)


# ---- on the GPU: candidate keys and picked values read from the GPU pool and the pinned host slab ----------
GPU_OPTS = dict(OPTS, device="cuda", dtype="float32", gpu_mem="128KiB", host_mem="4MiB")  # 41 chunks, 16 fit


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    # head_dim 64, GQA 2: the shapes the CuPy kernels take (the tiny default's head_dim 16 runs the references)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tokens64"), "llama", hidden_size=256,
                                 num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.gpu
@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_gpu_token_stage_over_both_tiers_equals_exact(tiny64, ids, reduce, monkeypatch):
    # eager: the forced candidate list grows with every chunk
    dense, _ = run_session(LLM(str(tiny64.path), attention="full", cuda_graph=False,
                               **dict(GPU_OPTS, gpu_mem=None, host_mem=None)), ids, 250)
    s = LLM(str(tiny64.path), attention="sparse", budget="10%", select_unit="token", token_reduce=reduce,
            cuda_graph=False, **GPU_OPTS).session()
    _force_token_stage(s.attn)
    out = torch.stack([s.prefill(ids[:250])] + [s.step(t) for t in ids[250:]])
    torch.testing.assert_close(out, dense, rtol=0, atol=2e-3)
    st = s.stats()
    # exact although the chunks are split between the GPU pool and the host slab (candidates: keys only)
    assert st["bytes_in_use_host"] > 0 and st["scored_key_bytes"] > 0, st


@pytest.mark.gpu
def test_gpu_token_stage_step_is_one_cuda_graph_equal_to_eager(tiny64, ids, monkeypatch):
    opts = dict(GPU_OPTS, attention="sparse", budget="10%", select_unit="token", token_candidates=3)
    graph, s = run_session(LLM(str(tiny64.path), **opts), ids, 250)
    st = s.stats()
    assert st["decode_mode"] == "graph" and "graph_error" not in st, {k: st.get(k) for k in (
        "decode_mode", "graph_captures", "graph_error")}
    assert st["bytes_in_use_host"] > 0 and st["scored_key_bytes"] > 0, st
    eager, _ = run_session(LLM(str(tiny64.path), cuda_graph=False, **opts), ids, 250)
    torch.testing.assert_close(graph, eager, rtol=0, atol=1e-4)


@pytest.mark.gpu
def test_gpu_token_stage_scratch_fits_what_the_planner_reserves():
    """8B shapes, 2K budget, 4x candidates: the stage's peak allocation stays within backends.token_stage_bytes."""
    from types import SimpleNamespace

    from offload.backends import token_stage_bytes
    hkv, hq, c, d, n_cand, k = 8, 32, 32, 128, 256, 2048
    gen = torch.Generator().manual_seed(0)
    gpu_pool = torch.randn(300, 2, hkv, c, d, generator=gen).to(torch.bfloat16).cuda()   # [S, 2, Hkv, C, D]
    host_pool = torch.randn(300, 2, hkv, c, d, generator=gen).to(torch.bfloat16).pin_memory()
    own = torch.stack([torch.randperm(300, generator=gen)[:n_cand] for _ in range(hkv)])  # own: [Hkv, 256]
    alt = torch.stack([torch.randperm(300, generator=gen)[:n_cand] for _ in range(hkv)])  # alt: [Hkv, 256]
    slots = torch.where(torch.rand(hkv, n_cand, generator=gen) < 0.6, alt | ALT_SLOT, own).int().cuda()
    q = torch.randn(hq, d, generator=gen).to(torch.bfloat16).cuda()                    # q: [Hq, D]
    base = torch.randn(hq, device="cuda")                                                # base: [Hq]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    o, lse = token_attend(q, [(gpu_pool, slots, host_pool)], k, d ** -0.5, "sum", base)
    torch.cuda.synchronize()
    used = torch.cuda.max_memory_allocated() - before
    mc = SimpleNamespace(num_layers=1, num_kv_heads=hkv, num_heads=hq, head_dim=d)
    cfg = OffloadConfig(chunk_tokens=c, budget="2K", select_unit="token", token_candidates=4)
    reserved = token_stage_bytes(mc, cfg, 128 * 1024, torch.bfloat16)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert 0 < used <= reserved, (used, reserved)
