"""Methods of the needle suite beyond sparse decode: compressed KV (issue 12) and sparse prefill (issue 11),
plus the budget a method really attends, so one run compares every lossy option on the same questions.

Spec strings (bench/fidelity.py --suite-methods mixes them with fidelity_sessions' CONFIG@BUDGET/CHUNK):
    kv:exact:int8      exact attention over KV whose chunks outside sinks + window went through int8
                       quantize -> dequantize, as the host tier stores them (bench/kv_quant_fidelity.py)
    kv:sparse:int4     the runtime's default sparse session (summary index, 2K budget, 32-token chunks) on
                       int4 KV; its unquantized reference is the method summary-max@2K/32
    kv:exact:rank32    exact attention whose keys outside sinks + window are rebuilt from a rank-32 basis fitted
                       before RoPE (ShadowKV's key rebuild, values exact); rank32post: the basis after RoPE
    prefill:sparse:0.95  the document AND the question prefilled with block-sparse prefill (threshold 0.95,
                       engine/sparse_prefill.py), then the answer prefix and the answer decoded exactly; the
                       reference (full) prefills both exactly. The question is its own prefill chunk here
                       (one query block picks its history blocks), stricter than a one-shot prompt whose last
                       2K chunk holds the question with 15 more query blocks whose union it shares.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from fidelity_sessions import Method, fork


@dataclass(frozen=True)
class KVQuantMethod:
    """Decode (exact or the default sparse) over KV simulated at kv_dtype outside sinks + window."""

    attention: str        # "exact" | "sparse"
    kv_dtype: str         # "int8" | "int4" | "bf16"

    @property
    def label(self) -> str:
        return f"kv:{self.attention}:{self.kv_dtype}"

    def fork(self, base):
        from kv_quant_fidelity import quant_session
        sess, _ = quant_session(base, "full" if self.attention == "exact" else "sparse", self.kv_dtype)
        return sess


@dataclass(frozen=True)
class SparsePrefillMethod:
    """Document and question through sparse prefill; the answer through exact decode (document-level)."""

    threshold: float = 0.95

    @property
    def label(self) -> str:
        return f"prefill:sparse:{self.threshold:g}"

    def _config(self):
        from offload.engine.sparse_prefill import SparsePrefill
        return SparsePrefill(threshold=self.threshold)

    def prefill_document(self, llm, ids: list[int]):
        sess = llm.session(prefill="exact")
        sess.attn.sparse_prefill = self._config()
        sess.prefill(ids)
        return sess

    def ask(self, doc_sess, ask_ids: list[int]):
        """A fork of the sparse-prefilled document with the question prefilled sparsely; decode exact after.
        (The dense CPU backend would also run T=1 decode steps through sparse_causal_attend: switched off.)"""
        sess = doc_sess.fork(prefill="exact")
        sess.attn.sparse_prefill = self._config()
        sess.prefill(ask_ids)
        density = sess.attn.prefill_stats.as_dict()["sparse_prefill_density"]
        sess.attn.sparse_prefill = None
        return sess, density


def parse_any(spec: str):
    """A suite method from its spec: kv:ATTN:DTYPE, prefill:sparse:THRESHOLD, or CONFIG@BUDGET/CHUNK."""
    spec = spec.strip()
    if spec.startswith("kv:"):
        _, attention, dtype = spec.split(":")
        rank = re.fullmatch(r"rank\d+(post|joint)?", dtype) is not None and attention == "exact"
        if attention not in ("exact", "sparse") or (dtype not in ("int8", "int4", "bf16") and not rank):
            raise SystemExit(f"method {spec!r}: write kv:exact|sparse:int8|int4|bf16 or kv:exact:rankR[post|joint]")
        return KVQuantMethod(attention, dtype)
    if spec.startswith("prefill:"):
        _, kind, threshold = spec.split(":")
        if kind != "sparse" or not 0 < float(threshold) <= 1:
            raise SystemExit(f"method {spec!r}: write prefill:sparse:P with P in (0, 1]")
        return SparsePrefillMethod(float(threshold))
    return Method.parse(spec)


def parse_all(text: str) -> list:
    return [parse_any(s) for s in text.split(",") if s.strip()]


def fork_any(base, method):
    """fidelity_sessions.fork for index methods; the method's own fork for the others."""
    return method.fork(base) if hasattr(method, "fork") else fork(base, method)


def fixed_budget_tokens(method, length: int, sink_tokens: int, window_tokens: int) -> float | None:
    """Tokens a head selects per step beyond sinks + window for a fixed budget (None: exact attention or not a
    sparse index method; a mass budget: its cap, for when it never selected). kv:sparse is summary@2K/32."""
    from offload.indexes import Budget
    if isinstance(method, KVQuantMethod):
        if method.attention == "exact":
            return None
        budget, chunk = "2K", 32
    elif isinstance(method, Method) and method.config != "full" and method.budget.startswith("p"):
        # a mass budget that never selected (its cap covers the context: all is attended): the cap
        from offload.config import parse_tokens
        cap = (method.budget.split(":") + ["", ""])[2]
        if not cap:
            return None
        budget, chunk = str(parse_tokens(cap)), method.chunk
    elif isinstance(method, Method) and method.config != "full":
        budget, chunk = method.budget.split("+")[0], method.chunk
    else:
        return None
    n = length // chunk
    free = max(0, n - -(-sink_tokens // chunk) - -(-window_tokens // chunk))
    return float(min(Budget.parse(budget).chunks(length, chunk), free) * chunk)
