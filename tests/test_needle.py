"""Passkey retrieval through the sparse path on the real SmolLM2-135M-Instruct (CPU, ~2K tokens).

The document is prefilled exactly; the question and answer prefix are fed through each fork, so the
sparse fork must find the needle (1000 tokens back, far outside its 256-token window) by selection.
Five random digits cannot be guessed, so a selection that misses the needle's chunk fails the test.
"""
from __future__ import annotations

import math
import os
import sys

import pytest

from fixtures_models import smollm2_cpu_llm, smollm2_gguf  # noqa: F401  (session fixture)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from fidelity_data import extract_digits, haystack_ids, needle_cases  # noqa: E402
from fidelity_sessions import greedy_answer  # noqa: E402



@pytest.fixture(scope="module")
def llm(smollm2_gguf):  # noqa: F811
    yield from smollm2_cpu_llm(smollm2_gguf, 4096)


def test_passkey_mid_depth_sparse_matches_full(llm):
    tok = llm.tokenizer
    case = needle_cases(tok, haystack_ids(tok), [2048], [0.5], ["single"], seed=0)[0]
    doc = llm.session(attention="full")
    doc.prefill(case.head + case.doc)

    full = doc.fork(attention="full")
    full_text, _, _ = greedy_answer(full, case.tail, tok)
    # the configuration bench/fidelity.py recommends (bench/RESULTS.md, fidelity section)
    sparse = doc.fork(attention="sparse", index="shadow", chunk_tokens=16, budget="5%")
    sparse_text, _, _ = greedy_answer(sparse, case.tail, tok)

    cfg = sparse.config
    context = len(case.head) + len(case.doc)
    chunks = context // cfg.chunk_tokens
    always = math.ceil(cfg.sink_tokens / cfg.chunk_tokens) + math.ceil(cfg.window_tokens / cfg.chunk_tokens)
    selected = math.ceil(0.05 * context / cfg.chunk_tokens)
    assert chunks > 2 * (always + selected), "the sparse fork must leave most chunks out for this test to mean anything"
    needle_at = len(case.head) + case.first
    assert context - needle_at > cfg.window_tokens + cfg.chunk_tokens, "the needle must be outside the local window"

    assert extract_digits(full_text) == case.answer, f"full attention answered {full_text!r}"
    assert extract_digits(sparse_text) == case.answer, f"sparse attention answered {sparse_text!r}"
    assert extract_digits(sparse_text) == extract_digits(full_text)
    full.close()
    sparse.close()
    doc.close()
