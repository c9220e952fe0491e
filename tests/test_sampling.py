import torch

from offload.engine.sampling import Sampler


def test_greedy_is_argmax():
    logits = torch.randn(1000)
    assert Sampler()(logits) == int(logits.argmax())


def test_seed_reproduces_and_differs():
    logits = torch.randn(1000)
    s1, s2, s3 = Sampler(1.0, 1.0, seed=7), Sampler(1.0, 1.0, seed=7), Sampler(1.0, 1.0, seed=8)
    a, b, c = ([s(logits) for _ in range(20)] for s in (s1, s2, s3))
    assert a == b
    assert a != c


def test_top_p_keeps_only_the_nucleus():
    logits = torch.full((100,), -10.0)
    logits[[3, 17, 42]] = torch.tensor([5.0, 4.5, 4.0])  # these three hold > 99% of the mass
    s = Sampler(1.0, top_p=0.9, seed=0)
    seen = {s(logits) for _ in range(300)}
    assert seen <= {3, 17, 42} and len(seen) >= 2
    tight = Sampler(1.0, top_p=0.01, seed=0)
    assert {tight(logits) for _ in range(50)} == {3}


def test_temperature_sharpens():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    cold = Sampler(0.05, seed=0)
    assert all(cold(logits) == 0 for _ in range(50))
    hot = Sampler(5.0, seed=0)
    assert len({hot(logits) for _ in range(200)}) == 4


# ---- SamplingParams, the logits processors against plain references, stop strings -------------------------
import math  # noqa: E402

import pytest  # noqa: E402

from offload.engine.sampling import SamplingParams, StopStrings, apply_penalties, filter_logits  # noqa: E402
from offload.errors import ConfigError  # noqa: E402


def _kept(x: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(x.tolist()) if v != -math.inf}


def _reference_keep(logits: list[float], t: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Written out per token in Python: top-k by rank, top-p over the renormalised survivors, min-p."""
    x = [v / t for v in logits]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep = set(order) if top_k == 0 else {i for i in order if x[i] >= x[order[top_k - 1]]}
    z = sum(math.exp(x[i]) for i in keep)
    mass = 0.0
    nucleus = set()
    for i in order:
        if i in keep and mass < top_p:
            nucleus.add(i)
            mass += math.exp(x[i]) / z
    keep = nucleus
    top = max(math.exp(x[i]) for i in keep)
    return {i for i in keep if math.exp(x[i]) >= min_p * top}


@pytest.mark.parametrize("top_k,top_p,min_p,t", [(5, 1.0, 0.0, 1.0), (0, 0.8, 0.0, 0.7), (0, 1.0, 0.1, 1.3),
                                                 (8, 0.9, 0.05, 0.9), (1, 1.0, 0.0, 1.0), (0, 1.0, 1.0, 1.0)])
def test_filter_masks_match_the_reference(top_k, top_p, min_p, t):
    logits = torch.randn(64, generator=torch.Generator().manual_seed(top_k + 7))   # logits: [64]
    got = filter_logits(logits, SamplingParams(temperature=t, top_k=top_k, top_p=top_p, min_p=min_p))
    assert _kept(got) == _reference_keep(logits.tolist(), t, top_k, top_p, min_p)
    kept = sorted(_kept(got))
    torch.testing.assert_close(got[kept], logits[kept] / t)      # survivors keep their tempered logits


def test_draws_follow_the_filtered_distribution():
    logits = torch.tensor([3.0, 2.5, 2.0, 0.5, 0.0, -4.0])
    p = SamplingParams(temperature=0.8, top_k=4, min_p=0.1, seed=3)
    want = torch.softmax(filter_logits(logits, p), -1)            # want: [6]
    s = Sampler(p)
    counts = torch.bincount(torch.tensor([s(logits) for _ in range(4000)]), minlength=6).float() / 4000
    assert counts[4:].sum() == 0 and want[4:].sum() == 0          # top-k 4 removed the last two
    torch.testing.assert_close(counts, want, atol=0.03, rtol=0)


def test_penalties_match_the_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g) * 3                     # logits: [50], both signs
    context, output = [1, 2, 3, 3, 40], [3, 7, 7, 7, 9]
    p = SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.25)
    seen = torch.zeros(50, dtype=torch.bool)
    seen[context + output] = True
    counts = torch.bincount(torch.tensor(output), minlength=50)
    got = apply_penalties(logits, seen, counts, p)
    want = logits.tolist()
    for i in set(context + output):
        want[i] = want[i] / 1.3 if want[i] > 0 else want[i] * 1.3
    for i in set(output):
        want[i] -= 0.4 + 0.25 * output.count(i)
    torch.testing.assert_close(got, torch.tensor(want))


def test_sampler_penalises_its_own_output_and_the_context():
    logits = torch.tensor([0.0, 5.0, 4.9, 4.8, 1.0])
    greedy = Sampler(SamplingParams(repetition_penalty=2.0), context_ids=[1])
    assert [greedy(logits) for _ in range(3)] == [2, 3, 1]       # 1 in context: 5 -> 2.5; each pick then counts
    freq = Sampler(SamplingParams(frequency_penalty=2.0))
    assert [freq(logits) for _ in range(3)] == [1, 2, 3]
    plain = Sampler(SamplingParams())
    assert {plain(logits) for _ in range(3)} == {1}
    late = Sampler(SamplingParams(repetition_penalty=2.0))
    late.observe([1, 2])
    assert late(logits) == 3


def test_sampling_params_validate_in_one_line():
    bad = [dict(temperature=-1), dict(temperature=math.nan), dict(top_p=0), dict(top_k=-2), dict(top_k=2.5),
           dict(min_p=1.5), dict(repetition_penalty=0), dict(presence_penalty=3), dict(frequency_penalty=-2.5),
           dict(stop=[""]), dict(stop=["x" * 300]), dict(stop=[1]), dict(stop=[str(i) for i in range(17)]),
           dict(max_tokens=-1), dict(seed=-1), dict(seed=2**64), dict(top_p=True)]
    for kw in bad:
        with pytest.raises(ConfigError) as e:
            SamplingParams(**kw)
        key = next(iter(kw))
        assert key in str(e.value) and "\n" not in str(e.value), (kw, str(e.value))
    p = SamplingParams(top_k=-1, stop="END", temperature=1)
    assert p.top_k == 0 and p.stop == ("END",) and isinstance(p.temperature, float)
    assert p.override(max_new_tokens=5, top_p=None).max_tokens == 5 and p.override(top_p=None).top_p == 1.0
    with pytest.raises(ConfigError, match="unknown sampling option"):
        p.override(top_q=0.5)


def _stream(stops, pieces):
    s = StopStrings(stops)
    out = [s.push(x) for x in pieces]
    return "".join(out) + s.flush(), s.stopped, out


def test_stop_strings_cut_the_text():
    assert _stream(["END"], ["Hello E", "N", "D tail"])[:2] == ("Hello ", True)
    text, stopped, out = _stream(["END"], ["Hello E", "ither", " way"])
    assert (text, stopped) == ("Hello Either way", False)
    assert out[0] == "Hello " and out[1] == "Either"              # "E" held back until it cannot start "END"
    assert _stream(["\n\n", "User:"], ["a\nUs", "er: b\n\nc"])[:2] == ("a\n", True)   # the earliest stop wins
    assert _stream(["ab"], ["xa"])[:2] == ("xa", False)            # a held prefix comes out at the end
    assert _stream(["é!"], ["caf", "é", "!", "more"])[:2] == ("caf", True)


def test_sampling_keys_in_config_yaml_and_env(tmp_path):
    from offload.config import OffloadConfig, env_overrides, load_yaml
    y = tmp_path / "c.yaml"
    y.write_text("top-k: 40\nmin_p: 0.05\nrepetition-penalty: 1.1\nstop: [\"User:\", \"\\n\\n\"]\n")
    cfg = OffloadConfig(**{**load_yaml(y), **env_overrides({"OFFLOAD_PRESENCE_PENALTY": "0.5", "OFFLOAD_STOP": "END"})})
    p = SamplingParams.from_config(cfg)
    assert (p.top_k, p.min_p, p.repetition_penalty, p.presence_penalty, p.stop) == (40, 0.05, 1.1, 0.5, ("END",))
    assert OffloadConfig(**load_yaml(y)).stop == ("User:", "\n\n")
    with pytest.raises(ConfigError, match=r"--top-k \(top_k\)"):
        OffloadConfig(top_k=-5)
    with pytest.raises(ConfigError, match="--top-k"):
        OffloadConfig(top_k="40")                    # YAML/API types are checked like every other key
