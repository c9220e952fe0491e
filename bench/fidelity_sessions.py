"""Session helpers for bench/fidelity.py: methods under test, forks with index variants, greedy answers,
and a recorder of the real queries a backend sees.

A method is written CONFIG@BUDGET/CHUNK, e.g. "summary-max@5%/16"; CONFIG names an entry of
bench/index_recall.py's CONFIGS or EXTRA_CONFIGS below (index method + options), "full" (exact attention) or "oracle" (the
chunks of largest exact attention mass: the best any chunk index can do at that budget and chunk size).
BUDGET is one budget for every layer ("5%", "2K") or REST+FIRSTxN, e.g. "5%+100%x2": the first 2 layers at
100 % (full attention), the others at 5 % (a per-layer budget list, after DuoAttention), or a mass budget
P:FLOOR:CAP, e.g. "p0.9:64:1K" = "p=0.9,floor=64,cap=1K" (offload.indexes.adaptive).
A suffix +tokF[max|sum] adds the token-level second stage (select_unit="token"): the index proposes F x the
budget's chunks, their keys are scored exactly and the budget's number of tokens is attended, ranked by the
query group's max q.k or summed softmax (default sum); e.g. "summary-max@5%/16+tok4". "oracle@5%/16+tok1000"
has every chunk as a candidate: the best tokens by exact mass (the ceiling of any token selection).
A further mP[fFLOOR] (token_mass, issue 13) makes the budget's tokens a cap: per KV head the fewest candidate
tokens whose softmax mass with sinks + window reaches P, at least FLOOR; e.g. "summary-max@10%/16+tok4m0.95f64"
(cap 10 %, candidates 40 %). "oracle@50%/16+tok10m0.95" is exact top-p over every token (cap 50 %).
"sh" after the reduce (token_scores "shadow", a shadow CONFIG only) ranks the candidates from the index's low-rank
key shadows instead of their keys, e.g. "shadow-r32-mass@5%/16+tok4sumsh".
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from index_recall import CONFIGS
from offload.indexes import chunk_attention_mass, make_index

# variants measured here on top of bench/index_recall.py's CONFIGS: wider candidate pools for the
# shadow's coarse stage (a needle's chunk can have an unremarkable mean key), and exact fine scores (r = D)
EXTRA_CONFIGS = {
    "shadow-r32-mass-cand16": ("shadow", {"rank": 32, "fine_reduce": "mass", "candidate_factor": 16.0,
                                          "min_candidates": 64}),
    "shadow-r32-mass-qcoarse": ("shadow", {"rank": 32, "fine_reduce": "mass", "coarse": "summary"}),
    "shadow-r64-mass-cand16": ("shadow", {"rank": 64, "fine_reduce": "mass", "candidate_factor": 16.0,
                                          "min_candidates": 64}),
    # the token stage ranks the candidates' tokens from the shadows anyway (token_scores "shadow"): the index's
    # own fine pass over 4x as many chunks is then a second ranking; candidate_factor 1 keeps the coarse picks
    "shadow-r32-mass-cf1": ("shadow", {"rank": 32, "fine_reduce": "mass", "candidate_factor": 1.0}),
    # smaller shadows give GPU room back to the KV tier (1.24x instead of 1.29-1.34x at 128K): what they cost
    "shadow-r16-mass-cf1": ("shadow", {"rank": 16, "fine_reduce": "mass", "candidate_factor": 1.0}),
    "shadow-r8-mass-cf1": ("shadow", {"rank": 8, "fine_reduce": "mass", "candidate_factor": 1.0}),
}
ALL_CONFIGS = {**CONFIGS, **EXTRA_CONFIGS}
_SPEC = re.compile(r"^(?P<config>[\w.-]+)(?:@(?P<budget>[\w.%+:]+))?(?:/(?P<chunk>\d+))?$")
_TOK = re.compile(r"\+tok(?P<factor>\d+(?:\.\d+)?)(?P<reduce>max|sum)?(?P<shadow>sh)?"
                  r"(?:m(?P<mass>[\d.]+)(?:f(?P<floor>\d+))?)?$")


@dataclass(frozen=True)
class Method:
    config: str          # a key of CONFIGS, or "full"
    budget: str = "5%"
    chunk: int = 16
    tok: float = 0.0         # > 0: token stage with this candidate factor
    tok_reduce: str = "sum"
    tok_mass: float = 0.0    # > 0: token_mass (the budget's tokens are a cap), with tok_floor
    tok_floor: int = 0
    tok_shadow: bool = False  # token_scores "shadow": candidates ranked from the shadow index's low-rank keys

    @classmethod
    def parse(cls, spec: str) -> "Method":
        spec = spec.strip()
        t = _TOK.search(spec)
        if t:
            spec = spec[:t.start()]
        m = _SPEC.match(spec)
        if not m or (m["config"] not in ("full", "oracle") and m["config"] not in ALL_CONFIGS):
            raise SystemExit(f"method {spec!r}: write CONFIG@BUDGET/CHUNK with CONFIG one of full, oracle, "
                             + ", ".join(ALL_CONFIGS))
        tok = dict(tok=float(t["factor"]), tok_reduce=t["reduce"] or "sum", tok_shadow=bool(t["shadow"])) if t else {}
        if t and t["mass"]:
            tok.update(tok_mass=float(t["mass"]), tok_floor=int(t["floor"] or 0))
        return cls(m["config"], m["budget"] or "5%", int(m["chunk"] or 16), **tok)

    def layer_budgets(self, num_layers: int):
        """The budget for OffloadConfig: one value, or a list with one entry per layer."""
        if self.budget.startswith("p"):
            p, floor, cap = (self.budget[1:].split(":") + ["", ""])[:3]
            return f"p={p}" + (f",floor={floor}" if floor else "") + (f",cap={cap}" if cap else "")
        if "+" not in self.budget:
            return self.budget
        rest, _, first = self.budget.partition("+")
        value, _, count = first.partition("x")
        return [value] * int(count) + [rest] * (num_layers - int(count))

    @property
    def label(self) -> str:
        tok = f"+tok{self.tok:g}{self.tok_reduce}" + ("sh" if self.tok_shadow else "") if self.tok else ""
        tok += f"m{self.tok_mass:g}f{self.tok_floor}" if self.tok_mass else ""
        return "full" if self.config == "full" else f"{self.config}@{self.budget}/{self.chunk}{tok}"


def parse_methods(text: str) -> list[Method]:
    return [Method.parse(s) for s in text.split(",") if s.strip()]


def fork(base, method: Method):
    """A copy of `base` (a prefilled session) running `method`.

    Index variants with options are not reachable through OffloadConfig yet, so for those the fork is
    done here: the sparse session's per-layer indexes are swapped for configured ones before its KV
    is loaded (which builds them). Plain variants go through the public Session.fork.
    """
    if method.config == "full":
        return base.fork(attention="full")
    index, opts = ALL_CONFIGS.get(method.config, ("summary", {"oracle": True}))
    budget = method.layer_budgets(base.llm.model_config.num_layers)
    kw = dict(attention="sparse", index=index, budget=budget, chunk_tokens=method.chunk)
    if method.tok:
        kw.update(select_unit="token", token_candidates=method.tok, token_reduce=method.tok_reduce,
                  token_scores="shadow" if method.tok_shadow else "keys")
    if method.tok_mass:
        kw.update(token_mass=method.tok_mass, token_floor=method.tok_floor)
        TOKEN_PICKS.reset(base.llm.device)
    if not opts:
        return _mass_wrapped(base.fork(**kw), base, budget)
    llm, mc = base.llm, base.llm.model_config
    sess = llm.session(**kw)
    if method.config == "oracle":
        sess.attn.indexes = [OracleIndex(method.chunk) for _ in range(mc.num_layers)]
    else:
        # sized for the whole context, as the runtime's own indexes (backends.new_index): no regrowth mid-session
        sess.attn.indexes = [make_index(index, num_kv_heads=mc.num_kv_heads, num_q_heads=mc.num_heads,
                                        head_dim=mc.head_dim, chunk_tokens=method.chunk, device=llm.device,
                                        dtype=llm.dtype, max_chunks=-(-llm.ctx // method.chunk), **opts)
                             for _ in range(mc.num_layers)]
    _mass_wrapped(sess, base, budget)
    sess.attn.load_kv(base.attn.read_kv(layer) for layer in range(mc.num_layers))
    sess.tokens = list(base.tokens)
    return sess


class TokenPicks:
    """Counts the tokens the token stage attends per KV head and step (a token-mass budget's count varies):
    wraps offload.kernels.tokens.select_tokens, which token_attend looks up at each call. Installed by the
    first reset(), not at import: importing this module (tests do) must not change the runtime. The counts stay on
    the selection's device and are added to in place, without a host sync: a decode step captured in a CUDA graph
    records the additions and every replay counts (a host read there broke the GPU suite's token-stage captures
    after the fidelity tests had imported this module, 2026-11-30)."""

    def __init__(self):
        self.inner, self.counts = None, None                       # counts: [2] int64 = (picked, heads)

    def _select(self, *args, **kw):
        idx, ok = self.inner(*args, **kw)
        with torch.inference_mode():   # the counts may be inference tensors (made in a session): update them as such
            if self.counts is None or self.counts.device != ok.device:
                self.counts = torch.zeros(2, dtype=torch.long, device=ok.device)
            self.counts[0].add_(ok.sum())
            self.counts[1].add_(ok.shape[0])
        return idx, ok

    def reset(self, device=None) -> None:
        """Zero the counts; device: where the next selections run (allocated now, not inside a capture)."""
        if self.inner is None:
            import offload.kernels.tokens as tokens
            self.inner, tokens.select_tokens = tokens.select_tokens, self._select
        with torch.inference_mode():
            self.counts = None if device is None else torch.zeros(2, dtype=torch.long, device=device)

    def mean(self) -> float | None:
        """Tokens per KV head and step since the last reset (None: the stage never ran)."""
        picked, heads = (0, 0) if self.counts is None else (int(x) for x in self.counts.tolist())
        return round(picked / heads, 1) if heads else None


TOKEN_PICKS = TokenPicks()


def _mass_wrapped(sess, base, budget):
    """A mass budget's indexes wrapped in MassBudgetIndex (unless the runtime did it already); KV reloaded."""
    from offload.indexes import Budget
    from offload.indexes.adaptive import wrap_mass_budget
    b = Budget.parse(budget)
    if not b.adaptive or sess.attn.indexes is None:
        return sess
    cfg, C = base.llm.config, sess.attn.C
    sess.attn.indexes = wrap_mass_budget(sess.attn.indexes, b, C, -(-cfg.sink_tokens // C), -(-cfg.window_tokens // C))
    return sess


class OracleIndex:
    """Selects the chunks of largest exact attention mass (keeps every key; a reference, not a method)."""

    def __init__(self, chunk_tokens: int):
        self.chunk_tokens = chunk_tokens
        self.keys: torch.Tensor | None = None                               # keys: [Hkv, N, D]

    def build(self, keys: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        self.keys = keys.clone()

    def extend(self, keys: torch.Tensor) -> None:
        self.keys = keys.clone() if self.keys is None else torch.cat([self.keys, keys], dim=1)

    def chunk_log_mass(self, query: torch.Tensor, cap: int = 0) -> torch.Tensor:
        """The exact log mass per chunk and query head: [Hkv, G, n] (what the indexes estimate)."""
        from offload.indexes.adaptive import true_chunk_log_mass
        return true_chunk_log_mass(query, self.keys, self.chunk_tokens, query.shape[-1] ** -0.5)

    def reserve(self, num_chunks: int) -> None:
        pass

    def gpu_bytes(self, num_chunks: int) -> int:
        return 0

    def graph_key(self):
        return None

    def select(self, query: torch.Tensor, budget: int) -> torch.Tensor:
        mass = chunk_attention_mass(query, self.keys, self.chunk_tokens)     # mass: [Hkv, n]
        return torch.topk(mass, min(budget, mass.shape[1]), dim=1).indices  # ids: [Hkv, k] best first

    @property
    def num_chunks(self) -> int:
        return 0 if self.keys is None else self.keys.shape[1] // self.chunk_tokens

    @property
    def nbytes(self) -> dict[str, int]:
        return {"gpu": 0, "host": 0}


def greedy_answer(sess, tail: list[int], tokenizer, max_new: int = 10, numbers: int = 1) -> tuple[str, list[int], float]:
    """Feed `tail` through sess (prefill), then greedy-decode until EOS, a finished number, or max_new.

    Returns (text, ids, seconds). Stopping right after a number ends saves steps; it is the same rule
    for every method, so answers stay comparable.
    """
    limit = getattr(sess.attn, "token_path_max", None)
    if limit is not None and len(tail) > limit:
        # a longer forward would take the backend's exact staged prefill and bypass the selection
        raise ValueError(f"tail of {len(tail)} tokens > token_path_max {limit}: shorten the question")
    t0 = time.perf_counter()
    logits = sess.prefill(tail)
    eos = set(tokenizer.eos_token_ids)
    out: list[int] = []
    for i in range(max_new):
        tok = int(torch.argmax(logits))
        if tok in eos:
            break
        out.append(tok)
        text = tokenizer.decode(out)
        if len(re.findall(r"\d\D", text)) >= numbers or i == max_new - 1:
            break
        logits = sess.step(tok)
    return tokenizer.decode(out), out, time.perf_counter() - t0


class QueryRecorder:
    """Wraps a backend's `attend` to keep the post-RoPE queries it is given, per layer.

    stride keeps every stride-th query of a multi-token forward (prefill); single-token steps are
    always kept. `active` turns recording on and off without unwrapping.
    """

    def __init__(self, attn, num_layers: int, stride: int = 1):
        self.attn, self.stride, self.active = attn, stride, True
        self.queries: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._inner = attn.attend
        attn.attend = self._attend

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.active:
            step = 1 if q.shape[1] == 1 else self.stride
            self.queries[layer].append(q[:, ::step].detach().float().cpu().clone())  # [Hq, T', D]
        return self._inner(layer, q, k, v)

    def stacked(self, layer: int) -> torch.Tensor:
        """All recorded queries of a layer: [Hq, Nq, D]."""
        return torch.cat(self.queries[layer], dim=1)

    def clear(self) -> None:
        self.queries = [[] for _ in self.queries]

    def detach(self) -> None:
        self.attn.attend = self._inner
