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
