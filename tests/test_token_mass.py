"""token_mass (issue 13): the token stage keeps, per KV head, the fewest best candidate tokens whose softmax
mass with what is attended anyway reaches p (at least token_floor, at most the budget's tokens). Checked
against a brute-force top-p of exact scores, through a session, and for refused option values."""
import pytest
import torch

from fixtures_models import TIERED_OPTS, run_session
from offload import LLM, ConfigError, OffloadConfig
from offload.kernels.tokens import select_tokens


def _reference_top_p(q, keys, base, p, floor, cap, scale):
    """Per KV head the set of candidate positions a brute-force top-p keeps: q [Hq, D], keys [Hkv, M, D],
    base [Hq] (log-sum-exp of what is attended anyway) -> list of sets."""
    hkv, m, _ = keys.shape
    g = q.shape[0] // hkv
    out = []
    for h in range(hkv):
        s = q[h * g:(h + 1) * g] @ keys[h].T * scale                           # s: [G, M]
        norm = torch.logaddexp(torch.logsumexp(s, 1), base[h * g:(h + 1) * g])  # norm: [G]
        share = torch.exp(s - norm[:, None]).mean(0)                          # share: [M] mean over the group
        have = float(torch.exp(base[h * g:(h + 1) * g] - norm).mean())       # sinks + window + tail
        order = torch.argsort(share, descending=True).tolist()
        kept = set()
        for i in order[:cap]:
            if have >= p and len(kept) >= floor:
                break
            kept.add(i)
            have += float(share[i])
        out.append(kept)
    return out


@pytest.mark.parametrize("p,floor,cap", [(0.5, 0, 40), (0.8, 3, 40), (0.95, 0, 12), (1.0, 0, 64), (0.3, 30, 64)])
def test_select_tokens_with_mass_is_the_brute_force_top_p(p, floor, cap):
    g = torch.Generator().manual_seed(3)
    hkv, G, m, d = 3, 3, 64, 16
    keys = torch.randn(hkv, m, d, generator=g, dtype=torch.float64) * 2      # keys: [Hkv, M, D] peaked scores
    q = torch.randn(hkv * G, d, generator=g, dtype=torch.float64)             # q: [Hq, D]
    base = torch.randn(hkv * G, generator=g, dtype=torch.float64) + 1.0       # base: [Hq]
    valid = torch.ones(hkv, m, dtype=torch.bool)                              # valid: [Hkv, M]
    idx, ok = select_tokens(q, keys, valid, cap, d ** -0.5, "sum", base, mass=p, floor=floor)  # [Hkv, cap]
    want = _reference_top_p(q, keys, base, p, floor, cap, d ** -0.5)
    for h in range(hkv):
        assert set(idx[h][ok[h]].tolist()) == want[h]
    counts = ok.sum(1)
    assert bool((counts >= min(floor, cap)).all()) and bool((counts <= cap).all())


def test_select_tokens_with_mass_never_keeps_invalid_candidates():
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 20, 8, generator=g)                                 # keys: [Hkv, M, D]
    q = torch.randn(4, 8, generator=g)                                        # q: [Hq, D]
    valid = torch.zeros(2, 20, dtype=torch.bool)
    valid[0, :5] = True                                                       # head 0: 5 candidates, head 1: none
    idx, ok = select_tokens(q, keys, valid, 12, 8 ** -0.5, "sum", None, mass=1.0, floor=10)
    assert ok[1].sum() == 0 and set(idx[0][ok[0]].tolist()) == set(range(5))


def test_session_with_token_mass_one_and_a_covering_cap_equals_the_fixed_stage(tiny, ids):
    # p = 1 keeps every candidate up to the cap, which is what the fixed-count stage attends
    common = dict(attention="sparse", budget="10%", select_unit="token", token_candidates=4, **TIERED_OPTS)
    fixed, _ = run_session(LLM(str(tiny.path), **common), ids, 250)
    mass, _ = run_session(LLM(str(tiny.path), token_mass=1.0, **common), ids, 250)
    torch.testing.assert_close(mass, fixed, rtol=0, atol=1e-5)
    low, _ = run_session(LLM(str(tiny.path), token_mass=0.05, **common), ids, 250)
    assert (low - fixed).abs().max() > 1e-4          # a low threshold attends fewer tokens: other logits


@pytest.mark.parametrize("kw,msg", [
    (dict(token_mass=0.0, select_unit="token"), "token_mass must be in (0, 1]"),
    (dict(token_mass=1.5, select_unit="token"), "token_mass must be in (0, 1]"),
    (dict(token_mass=0.9), "needs select_unit 'token'"),
    (dict(token_mass=0.9, select_unit="token", token_reduce="max"), "needs token_reduce 'sum'"),
    (dict(token_mass=0.9, select_unit="token", budget="2K", token_floor=4096), "above the cap"),
    (dict(token_floor=-1), "token_floor must be an integer >= 0"),
    (dict(token_mass="high", select_unit="token"), "must be a number"),
])
def test_bad_token_mass_options_are_one_line_errors(kw, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
        OffloadConfig(**kw)
    assert "\n" not in str(e.value)


# --- the threshold on the GPU (mass.cu, and the mass total of select.cu's rank kernel) against reference.mass_keep ---

def test_reference_mass_keep_takes_ties_at_the_lower_position_and_not_held_last():
    from offload.kernels.reference import mass_fixed, mass_keep
    idx = torch.tensor([[7, 3, 5, 1]])                          # the picks' positions, any order
    r = torch.tensor([[0.2, 0.2, 0.3, float("-inf")]])        # group-summed shares (g = 1); position 1 not held
    ok = torch.tensor([[True, True, True, False]])
    total = mass_fixed(torch.tensor([0.8]))                   # candidates' share: 0.7 picked + 0.1 not picked
    # best first: 5 (0.3), 3 (0.2, the lower of the tie), 7 (0.2), then 1; base 0.2: 0.2 + 0.3 < 0.65, + 0.2 < 0.65
    assert mass_keep(idx, r, ok, total, 1, 0.65, 0).tolist() == [[False, True, True, False]]
    assert mass_keep(idx, r, ok, total, 1, 0.75, 0).tolist() == [[True, True, True, False]]
    assert mass_keep(idx, r, ok, total, 1, 0.1, 2).tolist() == [[False, True, True, False]]   # the floor
    assert mass_keep(idx, r, ok, total, 1, 0.1, 4).tolist() == [[True, True, True, False]]    # never a not-held pick


def _picks(seed, hkv, g, k, held_share=0.85):
    """select_top-like picks: positions ascending, shares with many exact ties, a few not held, head 1 none held
    -> (idx [Hkv, k], val f32 [Hkv, k] (-inf not held), ok, row int32 [Hkv, k], total int64 [Hkv])."""
    from offload.kernels.reference import mass_fixed
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(4 * k, generator=gen)[:k].sort().values for _ in range(hkv)])
    w = torch.exp(2 * torch.randn(hkv, k, generator=gen))                 # w: [Hkv, k] heavy-tailed
    w = (w / w.sum(1, keepdim=True) * g * 0.8 * 2 ** 14).round() / 2 ** 14   # exact ties among the small ones
    ok = torch.rand(hkv, k, generator=gen) > 0.1                           # ok: [Hkv, k]
    ok[1] = False
    val = w.float().masked_fill(~ok, float("-inf"))                        # val: [Hkv, k]
    # every held candidate's share: the picks' plus some of candidates outside the top k
    total = mass_fixed(val.masked_fill(~ok, 0.0)).sum(1) + int(g * (held_share - 0.8) * 2 ** 40)
    row = torch.where(ok, torch.randint(0, 10 ** 6, (hkv, k), generator=gen), -1).int()   # row: [Hkv, k]
    return idx, val, ok, row, total


@pytest.mark.gpu
@pytest.mark.parametrize("k,floor,p", [(2048, 64, 0.93), (4096, 0, 0.9), (700, 16, 0.7), (1, 0, 0.99),
                                       (100, 200, 0.5), (1000, 0, 1.0)])
def test_gpu_mass_keep_kernel_keeps_the_reference_set(k, floor, p):
    """mass.cu against reference.mass_keep on the same shares: the same kept set, pick for pick (ties to the lower
    position), dropped rows -1, the kept held picks counted."""
    hkv, g = 8, 4
    idx, val, ok, row, total = _picks(k + floor, hkv, g, k)
    want = _kernel_keeps_the_reference_set(idx, val, ok, row, total, g, p, floor)   # want: [Hkv, k]
    if k >= 700 and p < 1:                    # the threshold acts: some head keeps fewer than it holds
        assert bool((want.sum(1) < ok.sum(1)).any()) and bool((want.sum(1) > floor).any())


def _kernel_keeps_the_reference_set(idx, val, ok, row, total, g, p, floor) -> torch.Tensor:
    """mass.cu on the GPU against reference.mass_keep: the same kept set, dropped rows -1, the kept picks counted."""
    from offload.kernels import _cupy_tokens as cp
    from offload.kernels.reference import mass_keep
    want = mass_keep(idx, val, ok, total, g, p, floor)                        # want: [Hkv, k]
    got_ok, got_row = ok.cuda(), row.cuda()
    rows = torch.zeros(1, dtype=torch.long, device="cuda")
    cp.mass_keep(val.cuda(), got_ok, got_row, total.cuda(), g, p, floor, rows)
    assert torch.equal(got_ok.cpu(), want)
    assert torch.equal(got_row.cpu(), torch.where(want, row, -1))
    assert int(rows) == int(want.sum())
    return want


def _tied_picks(seed, hkv, g, k, p):
    """Picks whose shares take five values (long runs of equal keys, one of them zero) and whose base leaves half of
    the held picks' mass to reach p, so the threshold falls inside a run of ties -> (val, ok, row, total)."""
    from offload.kernels.reference import MASS_UNIT, mass_fixed, mass_need
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor([1e-3, 2e-3, 2e-3 * (1 + 2 ** -20), 5e-4, 0.0]) * g   # two keys one float step apart
    val = levels[torch.randint(0, len(levels), (hkv, k), generator=gen)]         # val: [Hkv, k]
    ok = torch.rand(hkv, k, generator=gen) > 0.2                                 # ok: [Hkv, k]
    val = val.masked_fill(~ok, float("-inf"))
    picked = mass_fixed(val.masked_fill(~ok, 0.0)).sum(1)                        # picked: [Hkv]
    total = g * MASS_UNIT - mass_need(p, g) + picked // 2                        # base = need - half of it
    row = torch.where(ok, torch.randint(0, 10 ** 6, (hkv, k), generator=gen), -1).int()   # row: [Hkv, k]
    return val, ok, row, total


@pytest.mark.gpu
@pytest.mark.parametrize("k,floor,p", [(2048, 0, 0.9), (2048, 700, 0.9), (4096, 64, 0.5), (4096, 4096, 0.5),
                                       (1, 0, 0.5), (1, 1, 0.5), (333, 100, 1.0), (1000, 0, 1e-9)])
def test_gpu_mass_keep_kernel_splits_runs_of_equal_shares_like_the_reference(k, floor, p):
    """The radix select's hard cases: the share that reaches p lies inside a run of equal keys (kept in position
    order up to the one that reaches it), a floor inside a run, a base that already reaches p (only the floor
    stays), p = 1, k = 1 and the largest k."""
    hkv, g = 8, 4
    val, ok, row, total = _tied_picks(k + floor, hkv, g, k, p)
    if p < 1e-6:
        total = total * 0                                                      # base g: p is reached without picks
    idx = torch.arange(k).expand(hkv, k)                                       # idx: [Hkv, k] position order
    want = _kernel_keeps_the_reference_set(idx, val, ok, row, total, g, p, floor)   # want: [Hkv, k]
    if k >= 2048 and floor < k:               # the cut falls inside the held picks, not at their end
        assert bool((want.sum(1) < ok.sum(1)).all()) and bool((want.sum(1) >= min(floor, k)).all())


@pytest.mark.gpu
def test_gpu_select_mass_total_sums_every_held_rank():
    """select.cu's rank kernel adds each held candidate's rank in fixed point: with k = every candidate it is the
    picks' sum exactly, the same with fewer picks, and the torch ranks' sum up to float rounding."""
    from test_token_kernels import C, D, _inputs, _ref_logits, _valid

    from offload.kernels import _cupy_tokens as cp
    from offload.kernels.reference import mass_fixed
    from offload.kernels.tokens import rank_logits
    q, basis, shadows, cand, slots = _inputs(seed=7)
    base = torch.randn(q.shape[0], device="cuda") + 4                      # base: [Hq]
    m = cand.shape[1] * C
    _, val, ok, _, total = cp.ranked_select(q, basis, shadows, cand, slots, m, D ** -0.5, "sum", base, C, True,
                                            None, True)
    assert torch.equal(total, mass_fixed(val.masked_fill(~ok, 0.0)).sum(1))
    assert torch.equal(cp.ranked_select(q, basis, shadows, cand, slots, 300, D ** -0.5, "sum", base, C, True, None,
                                        True)[4], total)
    r = rank_logits(_ref_logits(q, basis, shadows, cand, D ** -0.5), _valid(cand, slots), "sum", base)  # [Hkv, M]
    want = mass_fixed(r.masked_fill(~_valid(cand, slots), 0.0)).sum(1)    # want: [Hkv]
    torch.testing.assert_close(total.double() / 2 ** 40, want.double() / 2 ** 40, rtol=1e-4, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_ranked_token_attend_with_mass_equals_the_torch_path(dtype):
    """The fused stage with a mass threshold (four launches) attends what token_attend(logits, mass) does, GPU pool
    and pinned host slab in one list, and counts the kept rows only."""
    from types import SimpleNamespace

    from test_token_kernels import CAP, C, D, G, HKV, _inputs, _ref_logits

    from offload.kernels.tokens import candidate_valid, ranked_token_attend, select_tokens, token_attend
    q, basis, shadows, cand, slots = _inputs(seed=3, dtype=dtype)
    gen = torch.Generator().manual_seed(5)
    gpu_pool = torch.randn(CAP, 2, HKV, C, D, generator=gen).to(dtype).cuda()          # [S, 2, Hkv, C, D]
    host_pool = torch.randn(CAP, 2, HKV, C, D, generator=gen).to(dtype).pin_memory()  # [S, 2, Hkv, C, D]
    base = torch.randn(HKV * G, generator=gen).cuda() + 6                             # base: [Hq]
    scale, k, p, floor = D ** -0.5, 700, 0.8, 16
    parts = [(gpu_pool, slots, host_pool)]

    def refuse(*a):
        raise AssertionError("the fused path must not compute the logits in torch")
    ranker = SimpleNamespace(shadow_operands=lambda: (basis, shadows, scale), token_logits=refuse)
    rows = torch.zeros(1, dtype=torch.long, device="cuda")                            # rows: [1] statistics
    o, lse = ranked_token_attend(q, parts, cand, ranker, k, scale, "sum", base, mass=p, floor=floor, rows_out=rows)
    logits = _ref_logits(q, basis, shadows, cand, scale)                              # logits: [Hkv, G, M]
    want_o, want_lse = token_attend(q, parts, k, scale, "sum", base, mass=p, floor=floor, logits=logits)
    held = candidate_valid(parts, C, "cuda")                                           # held: [Hkv, M]
    _, ok = select_tokens(q, None, held, k, scale, "sum", base, p, floor, logits)     # ok: [Hkv, k] kept
    kept = ok.sum(1)                                                                   # kept: [Hkv]
    assert int(rows) == int(kept.sum()), "the mass kernel counts the kept rows"
    assert bool((kept < held.sum(1).clamp(max=k)).any()) and bool((kept > floor).any()), kept
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, want_o, rtol=1e-4, atol=1e-4)
