"""The needle suite of bench/fidelity.py: what it generates, and one small run on the real SmolLM2."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from fixtures_models import smollm2_cpu_llm, smollm2_gguf  # noqa: F401  (session fixture)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from fidelity_sessions import Method, fork, greedy_answer  # noqa: E402
from fidelity_suite import KINDS, SOURCES, answer_numbers, run_suite, suite_docs, suite_rows  # noqa: E402



@pytest.fixture(scope="module")
def llm(smollm2_gguf):  # noqa: F811
    yield from smollm2_cpu_llm(smollm2_gguf, 8192)


def test_default_suite_has_100_cases_over_three_sources_and_four_tasks(llm):
    tok = llm.tokenizer
    docs = suite_docs(tok, [2048, 4096, 8192], list(SOURCES), 2)           # the bench's defaults
    cases = [(d, q) for d in docs for q in d.questions]
    assert len(cases) >= 100 and len({q[0] for _, q in cases}) == len(cases)   # unique names
    assert {d.source for d in docs} == set(SOURCES) and {q[1] for _, q in cases} == set(KINDS)
    for d in docs:
        size = len(d.head) + len(d.doc) + max(len(q[3]) + len(q[4]) for q in d.questions)
        assert d.context - 64 <= size <= d.context, (d.name, size)          # fills its context, never past it
        text = tok.decode(d.doc)
        for name, kind, answer, ask, prefix, numbers, later in d.questions:
            for key in answer.split(","):
                assert key in text, (name, key)                              # every answer is in the document
            assert len(answer.split(",")) == numbers and len(later) in (0, numbers - 1)
            assert tok.decode(prefix).strip() and tok.decode(ask).strip().endswith("assistant")
    # the three sources really differ (not one text three times)
    starts = {d.source: tok.decode(d.doc[:200]) for d in docs if d.context == 2048}
    assert len(set(starts.values())) == 3


def test_answer_numbers_reads_what_a_method_answered():
    assert answer_numbers(" 48213.", 1) == "48213"
    assert answer_numbers(" 12 and 345, then 6", 2) == "12,345"
    assert answer_numbers(" none", 1) == ""


def test_quick_suite_run_oracle_covering_everything_matches_full(llm):
    """One 1K document, six questions: a mass budget of p = 1 over every chunk (the exact path) answers every
    question as full attention does; a real mass budget runs end to end and reports the tokens it used."""
    docs = suite_docs(llm.tokenizer, [1024], ["lists"], 1, seed=3)
    methods = [Method("full"), Method.parse("oracle@p1:0:1K/16"), Method.parse("summary-max@p0.8:16:256/16")]
    cases = run_suite(llm, docs, methods, fork, greedy_answer, lambda *_: None, max_new=8)
    assert len(cases) == 6
    for case in cases:
        full, exact = case["methods"]["full"], case["methods"][methods[1].label]
        assert exact["text"] == full["text"], case["case"]
        used = case["methods"][methods[2].label]["tokens_per_head"]
        assert 16 <= used <= 256
    rows = {r["method"]: r for r in suite_rows(cases, [m.label for m in methods])}
    assert rows[methods[1].label]["eq_full"] == 1.0 and rows["full"]["n"] == 6


def test_suite_plan_names_stay_unique_and_methods_parse():
    """Method specs of every lossy option; the budget a fixed method selects at a length."""
    from fidelity_variants import KVQuantMethod, SparsePrefillMethod, fixed_budget_tokens, parse_any
    assert parse_any("kv:exact:int8") == KVQuantMethod("exact", "int8")
    assert parse_any("prefill:sparse:0.9").label == "prefill:sparse:0.9"
    assert isinstance(parse_any("prefill:sparse:1"), SparsePrefillMethod)
    for bad in ("kv:exact:int3", "kv:dense:int8", "prefill:sparse:1.5", "prefill:dense:0.9"):
        with pytest.raises(SystemExit):
            parse_any(bad)
    # 8K tokens, 32-token chunks: 2K = 64 chunks; at 1K only 32 - 2 sink - 8 window chunks are left to select
    assert fixed_budget_tokens(Method.parse("summary-max@2K/32"), 8192, 64, 256) == 2048
    assert fixed_budget_tokens(Method.parse("summary-max@2K/32"), 1024, 64, 256) == 22 * 32
    assert fixed_budget_tokens(Method.parse("summary-max@5%/16+tok4"), 8192, 64, 256) == 26 * 16  # ceil(409.6/16)
    assert fixed_budget_tokens(KVQuantMethod("sparse", "int4"), 8192, 64, 256) == 2048
    assert fixed_budget_tokens(KVQuantMethod("exact", "int4"), 8192, 64, 256) is None
    assert fixed_budget_tokens(Method.parse("summary-max@p0.8:64:1K/16"), 8192, 64, 256) == 1024   # its cap
    assert fixed_budget_tokens(Method.parse("summary-max@p0.8:64:1K/16"), 1024, 64, 256) == 44 * 16  # all there is
    assert fixed_budget_tokens(Method.parse("summary-max@p0.8/16"), 8192, 64, 256) is None           # no cap given


def test_suite_rows_compare_quantized_kv_with_the_same_attention():
    def case(name, **digits):
        return {"case": name, "context": 2048, "source": "lists", "kind": "single", "answer": "1", "tokens": 2000,
                "methods": {k.replace("_", ":"): {"digits": v} for k, v in digits.items()}}
    # kv:sparse:int8 differs from full twice but from the sparse session it quantizes only once
    cases = [case("a", full="1", kv_sparse_int8="2", **{"summary-max@2K/32": "2"}),
             case("b", full="1", kv_sparse_int8="3", **{"summary-max@2K/32": "1"}),
             case("c", full="1", kv_sparse_int8="1", **{"summary-max@2K/32": "1"})]
    rows = {r["method"]: r for r in suite_rows(cases, ["full", "kv:sparse:int8"])}
    assert rows["kv:sparse:int8"]["eq_full"] == pytest.approx(1 / 3, abs=1e-4)
    assert rows["kv:sparse:int8"]["eq_same_attention"] == pytest.approx(2 / 3, abs=1e-4)


def test_sparse_prefill_method_at_threshold_1_answers_as_exact_prefill(llm):
    """A ~1.6K document: the question (its own prefill chunk) has history past sinks + local band, so
    sparse prefill selects; threshold 1 keeps every block and must answer as exact prefill, a low threshold
    must really skip blocks (density < 1) and still run end to end."""
    from fidelity_variants import fork_any, parse_all
    docs = suite_docs(llm.tokenizer, [1664], ["lists"], 1, seed=5)
    methods = [Method("full")] + parse_all("prefill:sparse:1,prefill:sparse:0.2,kv:exact:int8")
    cases = run_suite(llm, docs, methods, fork_any, greedy_answer, lambda *_: None, max_new=8)
    assert len(cases) == 6
    for case in cases:
        m = case["methods"]
        assert m["prefill:sparse:1"]["text"] == m["full"]["text"], case["case"]
        assert m["prefill:sparse:1"]["prefill_density"] == 1.0
        assert m["prefill:sparse:0.2"]["prefill_density"] < 1.0
        assert "tokens_per_head" not in m["kv:exact:int8"]          # exact attention: no selection budget
    rows = {r["method"]: r for r in suite_rows(cases, [m.label for m in methods])}
    assert rows["prefill:sparse:1"]["eq_full"] == 1.0 and rows["prefill:sparse:0.2"]["prefill_density"] < 1.0


def test_dense_round_trip_matches_the_tiered_store_simulation(llm):
    """Exact attention over int4 KV simulated two ways: in place on a dense session (DenseRoundTrip) and
    through the tiered store's puts (RoundTripPuts): the same chunks are lossy, so the logits agree; and
    they differ from unquantized KV (the simulation is not a no-op)."""
    from kv_quant_fidelity import DenseRoundTrip, RoundTripPuts, quant_session
    ids = list(range(2000, 2600))                       # 600 tokens: 18 chunks, 8 of them outside sinks + window
    base = llm.session(attention="full")
    base.prefill(ids)
    dense, hook = quant_session(base, "full", "int4")
    assert isinstance(hook, DenseRoundTrip) and hook.lossy_chunks == 30 * (18 - 2 - 8)
    tiered = llm.session(attention="full", gpu_mem="24MiB")
    puts = RoundTripPuts(tiered.attn, "int4")
    tiered.attn.load_kv(base.attn.read_kv(layer) for layer in range(llm.model_config.num_layers))
    tiered.tokens = list(base.tokens)
    exact = base.fork(attention="full")
    for t in range(3000, 3040):                         # 40 steps: one more chunk leaves the window
        a, b, ref = dense.step(t), tiered.step(t), exact.step(t)   # logits: [V]
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert hook.lossy_chunks == puts.lossy_chunks == 30 * (20 - 2 - 8)   # 640 tokens: 10 lossy chunks a layer
    assert (a - ref).abs().max() > 1e-3
    for s in (base, dense, tiered, exact):
        s.close()


def test_key_rebuild_simulation_is_exact_at_full_rank_and_lossy_below(llm):
    """kv:exact:rankR (ShadowKV's key rebuild, simulated): at R = head_dim the pre-RoPE projection is the
    identity, so the logits are full attention's; at a low rank the keys outside sinks + window change (and
    only those), pre-RoPE, post-RoPE and joint over the heads alike."""
    from key_rebuild import DenseKeyRebuild
    from kv_quant_fidelity import quant_session
    ids = list(range(2000, 2600))                       # 600 tokens: 18 chunks, 8 of them outside sinks + window
    base = llm.session(attention="full")
    base.prefill(ids)
    exact = base.fork(attention="full")
    D = llm.model_config.head_dim
    full, hook = quant_session(base, "full", f"rank{D}")
    assert isinstance(hook, DenseKeyRebuild) and hook.lossy_chunks == 30 * 8
    torch.testing.assert_close(full.attn.k[:, :, :600], exact.attn.k[:, :, :600], rtol=0, atol=2e-4)
    joint, _ = quant_session(base, "full", f"rank{D * llm.model_config.num_kv_heads}joint")   # full rank, joint
    torch.testing.assert_close(joint.attn.k[:, :, :600], exact.attn.k[:, :, :600], rtol=0, atol=2e-4)
    joint.close()
    for spec in ("rank8", "rank8post", "rank24joint"):
        low, hook = quant_session(base, "full", spec)
        sink, lossy_end = hook.n_sink * hook.C, (600 // hook.C - hook.n_window) * hook.C
        diff = (low.attn.k[:, :, :600] - exact.attn.k[:, :, :600]).abs().amax(dim=(0, 1, 3))   # per position: [600]
        assert float(diff[:sink].max()) == 0 and float(diff[lossy_end:].max()) == 0    # sinks, window, tail exact
        assert float(diff[sink:lossy_end].min()) > 0                                    # every rebuilt key moved
        torch.testing.assert_close(low.attn.v[:, :, :600], exact.attn.v[:, :, :600], rtol=0, atol=0)
        low.close()
    for t in (3000, 3001):
        torch.testing.assert_close(full.step(t), exact.step(t), rtol=0, atol=2e-3)
    for s in (base, exact, full):
        s.close()


def _case(name, answer, kind="single", context=2048, **digits):
    return {"case": name, "context": context, "source": "lists", "kind": kind, "answer": answer, "tokens": 2000,
            "methods": {k: {"digits": v} for k, v in digits.items()}}


def test_retrieval_kept_counts_only_questions_full_attention_answers_correctly():
    """The issue-13 headline: a question full attention gets wrong counts neither for nor against a method, even
    when the method's answer equals full attention's (agreement on a wrong answer is not retrieval kept)."""
    from fidelity_report import suite_goal_rows
    cases = [_case("a", "1111", full="1111", m="1111"),            # kept
             _case("b", "2222", full="2222", m="9999"),            # lost
             _case("c", "3333", full="7777", m="7777"),            # full wrong, m agrees: not in retrieval kept
             _case("d", "4444", full="8888", m="4444"),            # full wrong, m right: correct, not kept
             _case("e", "5,6", kind="multivalue", context=8192, full="6,5", m="5,6")]   # either order is correct
    rows = {r["method"]: r for r in suite_rows(cases, ["full", "m"])}
    m = rows["m"]
    assert (m["n_full_ok"], m["kept_n"]) == (3, 2) and m["kept"] == pytest.approx(2 / 3, abs=1e-4)
    assert m["eq_full"] == pytest.approx(2 / 5, abs=1e-4)              # a, c (e differs in order from full)
    assert m["correct"] == pytest.approx(3 / 5, abs=1e-4)              # a, d, e; not b, c
    assert m["kept_2K"] == 0.5 and m["kept_8K"] == 1.0
    assert rows["full"]["kept"] == 1.0 and rows["full"]["kept_n"] == 3
    goal = suite_goal_rows({"suite": {"rows": list(rows.values())}})
    assert [g["method"] for g in goal] == ["m"] and goal[0]["meets"].startswith("no")


def test_suite_goal_needs_97_percent_of_60_kept_and_the_teacher_goal():
    from fidelity_report import suite_goal_rows
    row = {"method": "x", "n": 100, "kept": 0.98, "kept_n": 59, "n_full_ok": 60, "eq_full": 0.9, "correct": 0.6,
           "budget_pct": 4.5}
    doc = {"suite": {"rows": [row]}, "teacher": {"rows": [{"method": "x", "top1_agree": 0.985, "budget_pct": 4.2}]}}
    assert suite_goal_rows(doc)[0]["meets"] == "yes"
    doc["suite"]["rows"] = [{**row, "n_full_ok": 59}]                     # too few questions full attention knows
    assert suite_goal_rows(doc)[0]["meets"] == "no"
    doc["suite"]["rows"] = [row]
    doc["teacher"]["rows"][0]["top1_agree"] = 0.97
    assert suite_goal_rows(doc)[0]["meets"] == "no"


def test_v1_wording_still_makes_the_earlier_runs_needles():
    """--suite-wording v1 reproduces the documents of the runs in bench/RESULTS.md before the v2 wording."""
    import random

    from fidelity_needles import needles
    old, q_old = needles(random.Random(0), "v1")
    new, q_new = needles(random.Random(0), "v2")
    assert old[0][1].startswith("The passkey of the red door is ") and len(q_old[0][3]) == 5
    assert [q[0] for q in q_old] == [q[0] for q in q_new] == ["multikey"] * 3 + ["single", "multivalue", "vartrack"]
    assert all(q[1].endswith("?") for q in q_new)
    with pytest.raises(ValueError):
        needles(random.Random(0), "v3")


class _Broken:
    label = "broken"

    def fork(self, base):
        raise RuntimeError("no such kernel on this device")


def test_run_suite_drops_a_failing_method_and_stops_at_the_deadline(llm):
    """One method that raises is reported and dropped, full attention's answers still come back; a deadline
    already past starts no document."""
    import time

    from fidelity_variants import fork_any
    docs = suite_docs(llm.tokenizer, [1024], ["lists"], 1, seed=3)
    errors, notes = {}, []
    cases = run_suite(llm, docs, [Method("full"), _Broken()], fork_any, greedy_answer, notes.append, max_new=8,
                      errors=errors)
    assert len(cases) == 6 and all(list(c["methods"]) == ["full"] for c in cases)
    assert list(errors) == ["broken"] and "no such kernel" in errors["broken"]
    assert run_suite(llm, docs, [Method("full")], fork_any, greedy_answer, notes.append,
                     stop_at=time.perf_counter()) == []
    assert "deadline" in notes[-1]


def test_token_picks_counts_on_the_selection_device_without_syncing():
    """The token-mass counter adds on the device (a captured step replays the additions); mean = kept / heads."""
    import offload.kernels.tokens as tokens
    from fidelity_sessions import TOKEN_PICKS
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(6, 8, generator=g), torch.randn(2, 40, 8, generator=g)      # q: [Hq, D], keys: [Hkv, M, D]
    valid = torch.ones(2, 40, dtype=torch.bool)
    TOKEN_PICKS.reset(torch.device("cpu"))
    _, ok = tokens.select_tokens(q, keys, valid, 16, 8 ** -0.5, "sum", None, 0.5, 2)     # the wrapped function
    _, ok2 = tokens.select_tokens(q, keys, valid, 16, 8 ** -0.5, "sum", None, 0.9, 2)
    assert TOKEN_PICKS.counts.device.type == "cpu"
    assert TOKEN_PICKS.mean() == round(float(ok.sum() + ok2.sum()) / 4, 1)
    assert int(ok.sum()) < int(ok2.sum()) <= 32                           # a higher mass keeps more tokens
    TOKEN_PICKS.reset()
    assert TOKEN_PICKS.mean() is None


def test_gpu_script_methods_parse_and_include_the_default_and_the_oracle():
    """bench/fidelity_gpu.sh is pasted into one device call: a typo in its method list would cost the call."""
    import re
    import subprocess

    from fidelity_variants import parse_all
    from offload.config import OffloadConfig
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "fidelity_gpu.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = open(script).read()
    methods = parse_all(re.search(r"METHODS=\$\{METHODS:-(.*?)\}\n", text, re.S)[1].replace("\\\n", ""))
    labels = {m.label for m in methods}
    from fidelity_sessions import EXTRA_CONFIGS
    from offload.selection import ACCURATE
    cfg = OffloadConfig()     # LLM(attention="sparse"): index auto, one of offload.selection's two presets
    assert cfg.index == "auto" and f"summary-max@{cfg.budget}/{cfg.chunk_tokens}" in labels     # whole chunks
    # the accurate preset, spelled as a fidelity method: the same index options, candidates, mass and floor
    name, opts = "shadow-r32-mass-cf1", ACCURATE["index_options"]
    assert EXTRA_CONFIGS[name] == ("shadow", {"rank": opts["rank"], "fine_reduce": "mass",
                                              "candidate_factor": opts["candidate_factor"]})
    accurate = (f"{name}@{cfg.budget}/{cfg.chunk_tokens}+tok{ACCURATE['token_candidates']:g}sumsh"
                f"m{ACCURATE['token_mass']:g}f{ACCURATE['token_floor']}")
    assert accurate in labels, accurate
    assert "oracle@5%/16" in labels and len(methods) >= 9
    assert {m.config.split("-")[0] for m in methods} >= {"summary", "shadow", "ann", "oracle"}
    assert any(m.tok_shadow for m in methods) and any(m.tok_mass for m in methods)


def test_suite_needles_do_not_depend_on_the_hash_seed():
    """Every process must build the same documents: the variable names were a set of strings shuffled in the
    set's iteration order (PYTHONHASHSEED), so each run asked other questions of other documents."""
    import subprocess
    code = ("import random, sys; sys.path.insert(0, 'bench'); from fidelity_needles import needles; "
            "r = random.Random(0); print([needles(r) for _ in range(3)])")
    root = os.path.join(os.path.dirname(__file__), "..")
    outs = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(outs) == 1
