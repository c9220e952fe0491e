"""The needle suite of bench/fidelity.py: what it generates, and one small run on the real SmolLM2."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from fixtures_models import smollm2_gguf  # noqa: F401  (session fixture)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from fidelity_sessions import Method, fork, greedy_answer  # noqa: E402
from fidelity_suite import KINDS, SOURCES, answer_numbers, run_suite, suite_docs, suite_rows  # noqa: E402

from offload import LLM  # noqa: E402


@pytest.fixture(scope="module")
def llm(smollm2_gguf):  # noqa: F811
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    model = LLM(str(smollm2_gguf), device="cpu", ctx=8192, show_progress=False)
    yield model
    model.close()
    torch.set_num_threads(threads)


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
        for name, kind, answer, ask, prefix, numbers in d.questions:
            for key in answer.split(","):
                assert key in text, (name, key)                              # every answer is in the document
            assert len(answer.split(",")) == numbers
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
