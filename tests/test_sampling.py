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
