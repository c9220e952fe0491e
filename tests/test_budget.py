"""Adaptive budgets: parsing a mass threshold, and the pure functions that turn estimated shares into counts."""
from __future__ import annotations

import math

import pytest
import torch

from offload.errors import ConfigError
from offload.indexes import Budget
from offload.indexes.adaptive import (adaptive_counts, adaptive_select, group_shares, selectable_mask,
                                      true_chunk_log_mass)


# ---- parsing -----------------------------------------------------------------------------------
def test_mass_budget_parses_from_text_and_mapping():
    b = Budget.parse("p=0.95,floor=256,cap=4K")
    assert b.adaptive and b.mass() == 0.95
    assert b.chunks(8192, 32) == 128 and b.floor_chunks(32) == 8        # cap and floor in chunks
    assert b.chunks(1 << 20, 32) == 128                                   # the cap does not grow with ctx
    m = Budget.parse({"p": 0.9, "cap": "2K", "floor": 0})
    assert m.mass() == 0.9 and m.chunks(8192, 16) == 128 and m.floor_chunks(16) == 0
    layered = Budget.parse(["2K", "p=0.8,floor=64,cap=1K"])
    assert layered.mass(0) == 0.0 and layered.mass(1) == 0.8 and layered.floor_chunks(16, 0) == 0
    assert not Budget.parse("2K").adaptive and Budget.parse("5%").chunks(8192, 64) == 7  # old forms stay


@pytest.mark.parametrize("bad, words", [
    ("p=1.5", "outside (0, 1]"), ("p=0", "outside (0, 1]"), ("p=-0.1,cap=1K", "outside (0, 1]"),
    ("p=0.9,floor=4K,cap=1K", "above cap"), ("p=0.9,cap=5%", "token counts"), ("p=abc", "not a number"),
    ("floor=64,cap=1K", "no mass threshold"), ("p=0.9,depth=3", "unknown key"), ("p=0.9,cap", "key=value"),
    ({"p": [0.9]}, "not a number"), ({"p": True}, "not a number"), ("p=0.9,cap=0", "> 0"),
])
def test_mass_budget_rejects_bad_input_in_one_line(bad, words):
    with pytest.raises(ConfigError) as e:
        Budget.parse(bad)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and msg.startswith("budget")


# ---- counts from shares ------------------------------------------------------------------------
def test_counts_take_the_fewest_chunks_that_reach_p():
    share = torch.tensor([[0.05, 0.5, 0.2, 0.0, 0.1],        # sorted: .5 .2 .1 .05 -> .8 after 3
                          [0.1, 0.1, 0.1, 0.1, 0.1]])        # spread: needs more
    base = torch.tensor([0.1, 0.4])
    got = adaptive_counts(share, 0.9, floor=0, cap=5, base=base)
    # head 0: .1 + .5 + .2 = .8 < .9, + .1 = .9 -> 3; head 1: .4 + 5 x .1 = .9 -> 5
    assert got.tolist() == [3, 5]
    assert adaptive_counts(share, 0.9, floor=5, cap=5, base=base).tolist() == [4, 5]  # floor, but head 0 has 4
    assert adaptive_counts(share, 0.9, floor=0, cap=2, base=base).tolist() == [2, 2]  # cap
    assert adaptive_counts(share, 0.3, floor=0, cap=5, base=base).tolist() == [1, 0]  # base alone reaches p
    assert adaptive_counts(share, 1.0, floor=0, cap=9, base=base).tolist() == [4, 5]  # p = 1: every available


def test_counts_are_order_free_and_select_is_best_first_with_padding():
    gen = torch.Generator().manual_seed(0)
    share = torch.rand(3, 40, generator=gen)
    share = share / share.sum(1, keepdim=True) * 0.7                          # share: [3, 40]
    base = torch.full((3,), 0.3)
    counts = adaptive_counts(share, 0.9, 2, 30, base)
    perm = torch.randperm(40, generator=gen)
    assert torch.equal(adaptive_counts(share[:, perm], 0.9, 2, 30, base), counts)
    ids = adaptive_select(share, counts, 30)                                   # ids: [3, 30]
    for h in range(3):
        k = int(counts[h])
        assert (ids[h, k:] == -1).all() and (ids[h, :k] >= 0).all()
        picked = share[h, ids[h, :k]]
        assert torch.equal(picked, torch.sort(share[h], descending=True).values[:k])   # best first
        assert float(base[h] + picked.sum()) >= 0.9 - 1e-6                    # reaches p ...
        assert float(base[h] + picked[:-1].sum()) < 0.9                       # ... with no chunk to spare


def test_adaptive_functions_are_graph_safe_shapes():
    """Fixed output shapes whatever the data, and no Python numbers taken from tensors (CUDA graph replay)."""
    lm = torch.randn(2, 4, 64)                                                 # lm: [Hkv, G, n]
    mask = selectable_mask(64, torch.tensor([50]), n_sink=2, n_window=4)       # written 50, fixed 2 + 4
    assert mask.sum() == 50 - 6 and not mask[:2].any() and not mask[46:].any()
    share, base = group_shares(torch.where(torch.arange(64) < 50, lm, torch.tensor(-math.inf)), mask,
                               tail_lse=torch.randn(8))
    assert share.shape == (2, 64) and base.shape == (2,)
    assert torch.allclose(share.sum(1) + base, torch.ones(2), atol=1e-5)
    assert (share[:, ~mask] == 0).all()
    ids = adaptive_select(share, adaptive_counts(share, 0.5, 1, 16, base, mask.sum().expand(2)), 16)
    assert ids.shape == (2, 16) and int(ids.max()) < 46


def test_group_shares_match_the_exact_softmax():
    gen = torch.Generator().manual_seed(1)
    keys, q = torch.randn(2, 8 * 16, 32, generator=gen), torch.randn(6, 32, generator=gen) * 2
    tail_k = torch.randn(2, 5, 32, generator=gen)                              # tail_k: [Hkv, T, D]
    scale = 32 ** -0.5
    lm = true_chunk_log_mass(q, keys, 16, scale)                               # lm: [Hkv, G, n]
    tail_lse = torch.logsumexp(torch.einsum("hgd,htd->hgt", q.reshape(2, 3, 32), tail_k) * scale, -1).reshape(6)
    share, base = group_shares(lm, torch.ones(8, dtype=torch.bool), tail_lse)
    # reference: one softmax per query head over chunks + tail, averaged over the group
    all_k = torch.cat([keys, tail_k], dim=1)                                   # all_k: [Hkv, N + T, D]
    p = torch.softmax(torch.einsum("hgd,hnd->hgn", q.reshape(2, 3, 32), all_k) * scale, -1)  # [Hkv, G, N+T]
    want = p[..., :128].reshape(2, 3, 8, 16).sum(-1).mean(1)                   # want: [Hkv, n]
    assert torch.allclose(share, want, atol=1e-5)
    assert torch.allclose(base, p[..., 128:].sum(-1).mean(1), atol=1e-5)


# ---- bad input reaches the user as one line, before any weight loads ------------------------------
@pytest.mark.parametrize("options, words", [
    ({"budget": "p=1.2"}, "outside (0, 1]"),
    ({"budget": "p=0.9,floor=2K,cap=1K"}, "above cap"),
    ({"index": "shadow", "index_options": {"rank": "sixteen"}}, "rank='sixteen' must be a whole number"),
    ({"index": "summary", "index_options": {"candidate_factor": "4"}}, "must be a number"),
    ({"index": "shadow", "index_options": {"rank": 0}}, "rank=0 must be positive"),
    ({"index": "ann", "index_options": {"nprobe": -1}}, "nprobe=-1 must be >= 0"),
    ({"index": "ann", "index_options": {"probe_fraction": 0.0}}, "probe_fraction=0.0 must be positive"),
])
def test_api_refuses_bad_sparse_options_before_resolving_the_model(tmp_path, options, words):
    """The model path does not exist: the sparse option is what gets reported, so it is checked first."""
    from offload import LLM
    with pytest.raises(ConfigError, match=None) as e:
        LLM(str(tmp_path / "no-such-model"), **options)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_mass_budget_exits_2_with_one_line(tmp_path):
    import os
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "offload.cli.main", "-m", str(tmp_path / "no-such-model"),
                        "--budget", "p=0", "-p", "x"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OFFLOAD_NO_PROGRESS": "1", "OFFLOAD_OFFLINE": "1"})
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "outside (0, 1]" in lines[0], r.stderr
