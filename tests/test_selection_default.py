"""The default sparse selection, index "auto" (offload/selection.py; issue 13, deliverable 6).

The planner gives a session the accurate preset (shadow-ranked token stage with a 0.97 mass cut) where the shadow
index fits the GPU in its default layout, else whole chunks through the summary index; a user who names an index or
sets selection options of their own gets exactly what they asked for.
"""
from __future__ import annotations

import pytest
import torch

from fixtures_models import TIERED_OPTS, write_tiny_checkpoint
from offload import LLM, OffloadConfig, backends, selection
from offload.errors import ConfigError
from test_index_memory import card_24gib  # noqa: F401  (fixture)
from test_planner import _llama8b_llm


def _plan(tmp_path, ctx: str, **kw):
    cfg = OffloadConfig(**{"ctx": ctx, "attention": "sparse", "host_mem": "48GiB", "disk_dir": str(tmp_path), **kw})
    return backends.plan(_llama8b_llm(cfg)), cfg


def test_accurate_where_the_shadows_fit_chunks_at_1m(card_24gib, tmp_path):  # noqa: F811
    p128, cfg = _plan(tmp_path, "128K")
    chosen = dict(p128.selection)
    assert chosen["index"] == "shadow" and chosen["select_unit"] == "token" and chosen["token_scores"] == "shadow"
    assert chosen["token_mass"] == selection.ACCURATE["token_mass"] and p128.index_options == ()
    # the reservation is the accurate preset's own: the same as naming it by hand
    by_hand, _ = _plan(tmp_path, "128K", **selection.ACCURATE)
    assert p128.index_bytes == by_hand.index_bytes and p128.gpu_chunks == by_hand.gpu_chunks
    assert "selection: shadow index, tokens ranked from shadows" in p128.summary()
    run = selection.apply(cfg, p128)
    assert (run.index, run.select_unit, run.token_floor) == ("shadow", "token", 64)

    # packed host KV or a drive tier: not where the accurate preset was measured, so whole chunks
    assert dict(_plan(tmp_path, "128K", kv_dtype="int8")[0].selection) == {"index": "summary"}
    assert dict(_plan(tmp_path, "128K", host_mem="4GiB", disk_mem="16GiB")[0].selection) == {"index": "summary"}

    p1m, cfg = _plan(tmp_path, "1M", kv_dtype="int8")
    assert dict(p1m.selection) == {"index": "summary"}      # shadows (18 GiB) do not fit: whole chunks
    assert p1m.index_options == tuple(backends.COMPACT_INDEX["summary"].items())   # in the compact layout
    assert "selection: summary index, whole chunks" in p1m.summary()


def test_a_named_index_or_own_options_are_kept(card_24gib, tmp_path):  # noqa: F811
    p, cfg = _plan(tmp_path, "128K", index="summary")
    assert p.selection == () and selection.apply(cfg, p) is cfg
    # own selection options without an index: the summary index with them (what the default was before "auto")
    p, cfg = _plan(tmp_path, "128K", select_unit="token", token_candidates=2.0)
    assert dict(p.selection) == {"index": "summary"}
    run = selection.apply(cfg, p)
    assert (run.index, run.select_unit, run.token_candidates, run.token_scores) == ("summary", "token", 2.0, "keys")
    p, _ = _plan(tmp_path, "128K", budget="p=0.75,floor=128,cap=2K")
    assert dict(p.selection) == {"index": "summary"}


def test_the_floor_stays_within_a_small_budget():
    (_, acc), _ = selection.choices(OffloadConfig(budget="32"), head_dim=128)
    assert acc.token_floor == 32 and acc.token_mass == 0.97 and acc.index_options["rank"] == 32
    (_, small), _ = selection.choices(OffloadConfig(), head_dim=16)
    assert small.index_options["rank"] == 16 and small.token_floor == 64


@pytest.mark.parametrize("kw, words", [({"index_options": {"rank": 16}}, "need a named index"),
                                       ({"index": "shadows"}, "not one of|unknown index")])
def test_bad_selection_input_is_one_line(kw, words):
    with pytest.raises(ConfigError, match=words) as e:
        OffloadConfig(**kw)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("auto-sel"), "llama", num_key_value_heads=2)


def _decode(llm, ids, steps: int):
    """Greedy decode after a prefill: the sessions and its last-position logits at every step [steps + 1, V]."""
    s = llm.session()
    last = s.prefill(ids)
    out = []
    for _ in range(steps + 1):
        last = last.reshape(-1, last.shape[-1])[-1].float()          # last: [V]
        out.append(last)
        if len(out) <= steps:
            last = s.step(int(last.argmax()))
    return s, torch.stack(out)


def test_a_cpu_session_runs_the_accurate_preset(tiny):
    ids = torch.randint(0, 200, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    auto = LLM(str(tiny.path), attention="sparse", budget="32", show_progress=False, **TIERED_OPTS)
    s, got = _decode(auto, ids, 24)
    assert (s.config.index, s.config.select_unit, s.config.token_scores) == ("shadow", "token", "shadow")
    assert s.attn.selector.token_mass == 0.97           # the session really runs the mass cut
    from offload.cli.banner import banner
    assert "| attention sparse (shadow index, tokens ranked from shadows, mass 0.97) |" in banner(auto)
    auto.close()
    rank = min(32, auto.model_config.head_dim)   # a tiny model's shadows: its full rank when below 32
    by_hand = LLM(str(tiny.path), attention="sparse", budget="32", show_progress=False, **TIERED_OPTS,
                  **{**selection.ACCURATE, "token_floor": 32, "index_options": {"candidate_factor": 1.0, "rank": rank}})
    _, want = _decode(by_hand, ids, 24)
    by_hand.close()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # a budget that covers every chunk is exact (the mass cut applies only where tokens are left out)
    full = LLM(str(tiny.path), attention="full", show_progress=False, **TIERED_OPTS)
    _, exact = _decode(full, ids, 8)
    full.close()
    wide = LLM(str(tiny.path), attention="sparse", budget="512", show_progress=False, **TIERED_OPTS)
    _, covered = _decode(wide, ids, 8)
    wide.close()
    torch.testing.assert_close(covered, exact, rtol=1e-4, atol=1e-4)
