"""Chosen needle-suite questions x chosen methods, with an optional per-step trace of where a needle is lost.

    python bench/needle_ladder.py --cases 8K-pydoc-1-single,8K-lists-1-multivalue \
        --methods "summary-max@10%/16+tok8m0.97f64,summary-max@10%/16+tok10m0.97f64" [--trace METHOD] \
        [--out bench/results/needle_ladder.json]

The documents are bench/fidelity.py's suite documents (--contexts 8K --docs 3 --seed 0 --wording v2 rebuild the
54-question CPU run's), prefilled exactly (cached under --cache: a re-run skips the 8K prefill), questions
asked exactly, answer prefix and answer through each method (bench/fidelity_suite.run_suite, unchanged).

--trace METHOD re-runs each case's answer through METHOD with hooks around the selector and the token stage
(no runtime change: the module attribute kernels.tokens.select_tokens is wrapped, as fidelity_sessions'
TOKEN_PICKS does) and prints, per decode query of the answer (prefix tokens, then generated tokens), over every
layer and KV head: how many (layer, query head) pairs put > 10 % of their exact softmax on the needle's digit
tokens ("needle heads"), how many of those had the needle's tokens among the candidates, and how many among
the attended picks; the worst query head's captured mass (sinks + window + tail + picks, of the exact softmax over
sinks + window + tail + candidates) and the group mean the threshold sees.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fidelity_sessions import greedy_answer  # noqa: E402
from fidelity_suite import SOURCES, is_correct, run_suite, suite_docs  # noqa: E402
from fidelity_variants import fork_any, parse_all  # noqa: E402

from offload import LLM  # noqa: E402
from offload.config import parse_tokens  # noqa: E402
from offload.kernels import reference  # noqa: E402

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.0f}s] {msg}", flush=True)


def needle_positions(tokenizer, ids: list[int], numbers: list[str]) -> list[int]:
    """Token positions (in ids) of the digits of every occurrence of the numbers that follows a needle's words."""
    text, starts = "", []
    for t in ids:
        starts.append(len(text))
        text += tokenizer.decode([t])
    out = []
    for num in numbers:
        for m in re.finditer(rf"(?<!\d){num}(?!\d)", text):
            before = text[max(0, m.start() - 40):m.start()]
            if not re.search(r"passkey|magic number|value of", before):
                continue                                     # a haystack number that happens to match
            out += [i for i, s in enumerate(starts) if m.start() <= s < m.end()]
    return sorted(set(out))


class Trace:
    """Hooks on one session: the selection of each (layer, query) and the token stage's picks, scored against
    the exact softmax over what the stage saw (sinks + window + tail through base_lse, candidates' keys)."""

    def __init__(self, sess, needle: list[int], C: int):
        import offload.kernels.tokens as tokens
        self.tokens, self.needle, self.C = tokens, torch.tensor(needle), C
        self.sel = sess.attn.selector
        self.inner_select, self.inner_tokens = self.sel.select, tokens.select_tokens
        self.sel.select, tokens.select_tokens = self._select, self._tokens
        self.last, self.steps = None, []      # steps: per query, list over layers of per-head records

    def close(self):
        self.sel.select, self.tokens.select_tokens = self.inner_select, self.inner_tokens

    def _select(self, layer, q, n_chunks, length):
        s = self.inner_select(layer, q, n_chunks, length)
        if layer == 0:
            self.steps.append([])
        self.last = (layer, s, n_chunks)
        return s

    def _tokens(self, q, keys, valid, k, scale, group_reduce="sum", base_lse=None, mass=0.0, floor=0, logits=None):
        idx, ok = self.inner_tokens(q, keys, valid, k, scale, group_reduce, base_lse, mass, floor, logits)
        layer, sel, n = self.last
        C, hkv = self.C, valid.shape[0]
        picked = reference.combine_selection(sel.ids, torch.tensor([n]), sel.n_sink, sel.n_window, sel.take,
                                             sel.streaming)[:, sel.n_sink + sel.n_window:]   # picked: [Hkv, M] chunk ids
        col = torch.arange(valid.shape[1])                                                   # col: [M*C]
        pos = picked[:, col // C] * C + col % C                                              # pos: [Hkv, M*C]
        pos = torch.where(picked[:, col // C] >= 0, pos, -1)
        is_needle = torch.isin(pos, self.needle)                                             # [Hkv, M*C]
        g = q.shape[0] // hkv
        if keys is None:
            s = logits.float()                                                               # s: [Hkv, G, M*C]
        else:
            s = torch.einsum("hgd,hmd->hgm", q.float().reshape(hkv, g, -1), keys.float()) * scale
        s = s.masked_fill(~valid[:, None], float("-inf"))
        lse = torch.logaddexp(torch.logsumexp(s, -1), base_lse.float().reshape(hkv, g))     # lse: [Hkv, G]
        p = torch.exp(s - lse[..., None])                                                    # p: [Hkv, G, M*C]
        base = torch.exp(base_lse.float().reshape(hkv, g) - lse)                             # base: [Hkv, G]
        chosen = torch.zeros_like(valid)
        chosen.scatter_(1, idx, ok)                                                          # chosen: [Hkv, M*C]
        captured = base + (p * chosen[:, None]).sum(-1)                                      # [Hkv, G]
        needle_p = (p * is_needle[:, None]).sum(-1)                                          # [Hkv, G]
        needle_kept = (p * (is_needle & chosen)[:, None]).sum(-1)                            # [Hkv, G]
        # is the needle chunk a candidate at all (its chunk ids among the picked chunk ids)?
        nchunks = torch.unique(self.needle // C)
        cand = torch.isin(picked, nchunks).any(1)                                            # [Hkv]
        self.steps[-1].append(dict(layer=layer, captured=captured, needle=needle_p, kept=needle_kept,
                                   cand=cand, n_ok=ok.sum(1)))
        return idx, ok

    def summary(self) -> list[dict]:
        out = []
        for recs in self.steps:
            if not recs:
                continue
            heads = needle_heads = in_cand = picked_heads = 0
            lost = 0.0
            for r in recs:
                for h in range(r["needle"].shape[0]):
                    for gi in range(r["needle"].shape[1]):
                        heads += 1
                        if r["needle"][h, gi] > 0.1:
                            needle_heads += 1
                            in_cand += bool(r["cand"][h])
                            picked_heads += bool(r["kept"][h, gi] > 0.5 * r["needle"][h, gi])
                        lost += float(r["needle"][h, gi] - r["kept"][h, gi])
            cap = torch.stack([r["captured"] for r in recs])                                # [L, Hkv, G]
            out.append(dict(needle_heads=needle_heads, needle_in_cand=in_cand, needle_picked=picked_heads,
                            needle_mass_lost=round(lost, 3), worst_q_captured=round(float(cap.min()), 3),
                            worst_group_mean=round(float(cap.mean(-1).min()), 3),
                            mean_picks=round(float(torch.stack([r["n_ok"].float() for r in recs]).mean()), 1)))
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", required=True, help="comma list of suite case names, e.g. 8K-pydoc-1-single")
    ap.add_argument("--methods", default="", help="comma list of suite methods (bench/fidelity_sessions.py)")
    ap.add_argument("--trace", default=None, help="one method to trace step by step")
    ap.add_argument("--margins", default=None, help="methods (comma list) to teacher-force with the needle's answer: "
                    "per answer token, logit of the right token minus the best other (negative: a wrong greedy pick)")
    ap.add_argument("--contexts", default="8K")
    ap.add_argument("--docs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wording", default="v2")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/needle_ladder_cache")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, device="cpu", dtype="float32", ctx="8K", show_progress=False, cuda_graph=False)
    wanted = args.cases.split(",")
    docs = suite_docs(llm.tokenizer, [parse_tokens(c) for c in args.contexts.split(",")], list(SOURCES), args.docs,
                      seed=args.seed, wording=args.wording)
    docs = [replace(d, questions=tuple(q for q in d.questions if q[0] in wanted)) for d in docs]
    docs = [d for d in docs if d.questions]
    missing = set(wanted) - {q[0] for d in docs for q in d.questions}
    if missing:
        raise SystemExit(f"error: no such case {sorted(missing)}; names look like 8K-pydoc-1-single")
    doc = {"bench": "needle_ladder", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": "CPU",
           "threads": args.threads, "command": "python " + " ".join(sys.argv), "cases": []}
    if args.methods:
        methods = parse_all("full," + args.methods)
        cases = run_suite(llm, docs, methods, fork_any, greedy_answer, log, cache_dir=args.cache)
        doc["cases"] = cases
        labels = [m.label for m in methods]
        print(f"{'case':30s} {'key':10s} " + " ".join(f"{i}" for i in range(len(labels))))
        for i, lab in enumerate(labels):
            print(f"  {i}: {lab}")
        for c in cases:
            cells = [f"{c['methods'][lab]['digits'] or '-'}{'*' if is_correct(c, lab) else ''}"
                     f"({c['methods'][lab].get('tokens_per_head', '')})" for lab in labels]
            print(f"{c['case']:30s} {c['answer']:10s} " + " ".join(cells))
    if args.margins:
        doc["margins"] = run_margins(llm, docs, parse_all(args.margins), args.cache)
    if args.trace:
        doc["trace"] = run_trace(llm, docs, parse_all(args.trace)[0], args.cache)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1, default=str))
        log(f"wrote {args.out}")


def _base(llm, d, cache):
    """The document's exact prefill, from the cache when there (as run_suite saves it)."""
    import hashlib
    ids = d.head + d.doc
    path = Path(cache) / (hashlib.sha1(json.dumps([llm.name, ids]).encode()).hexdigest()[:16] + ".offload")
    if path.exists():
        return llm.load_session(path)
    base = llm.session()
    base.prefill(ids)
    Path(cache).mkdir(parents=True, exist_ok=True)
    base.save(path)
    return base


def answer_parts(tokenizer, answer: str, prefix, later) -> list[tuple[list[int], list[int]]]:
    """[(prefix ids, the needle's digits as the model writes them)] per number: the digits are encoded after the
    prefix's text (a leading space when the prefix ends in a word), then split at the prefix's length."""
    out = []
    for pre, num in zip((prefix, *later), answer.split(",")):
        text = tokenizer.decode(list(pre))
        sep = "" if text.endswith(("-", " ")) else " "
        full = tokenizer.encode(text + sep + num + ".", add_special_tokens=False)
        assert full[:len(pre)] == list(pre), "the prefix must tokenize the same with its answer"
        out.append((list(pre), full[len(pre):]))
    return out


def run_margins(llm, docs, methods, cache) -> list[dict]:
    """Every chosen case, teacher-forced with its needle's answer through full attention and each method."""
    out = []
    for d in docs:
        base = _base(llm, d, cache)
        for name, kind, answer, ask, prefix, numbers, later in d.questions:
            parts = answer_parts(llm.tokenizer, answer, prefix, later)
            asked = base.fork(attention="full")
            asked.prefill(ask)
            row = {"case": name, "answer": answer,
                   "tokens": [[llm.tokenizer.decode([t]) for t in a] for _, a in parts], "margins": {}}
            for m in [parse_all("full")[0], *methods]:
                sess = fork_any(asked, m)
                try:
                    row["margins"][m.label] = _forced_all(sess, parts)
                finally:
                    sess.close()
            asked.close()
            log(f"{name} key {answer} tokens {row['tokens']}")
            for lab, v in row["margins"].items():
                print(f"   {lab:45s} {' '.join(f'{x:+6.2f}' for x in v)}")
            out.append(row)
        base.close()
    return out


def _forced_all(sess, parts) -> list[float]:
    """Teacher-force each (prefix, answer digits + the stop token) through sess: per answer token, its logit minus
    the best other's. The stop token is scored, not fed (as greedy_answer, whose next prefix follows the digits)."""
    out = []
    for pre, ans in parts:
        logits = sess.prefill(pre)
        for i, t in enumerate(ans):
            lg = logits.float().flatten()
            other = lg.clone()
            other[t] = float("-inf")
            out.append(round(float(lg[t] - other.max()), 2))
            if i + 1 < len(ans):
                logits = sess.step(t)
    return out


def run_trace(llm, docs, method, cache) -> list[dict]:
    """Every chosen case's answer through `method`, traced; the answer prefix and every generated token."""
    out = []
    for d in docs:
        ids = d.head + d.doc
        base = _base(llm, d, cache)
        for name, kind, answer, ask, prefix, numbers, later in d.questions:
            needle = needle_positions(llm.tokenizer, ids, answer.split(","))
            asked = base.fork(attention="full")
            asked.prefill(ask)
            sess = fork_any(asked, method)
            tr = Trace(sess, needle, method.chunk)
            text = ""
            try:
                for pre in (prefix, *later):
                    part, got, _ = greedy_answer(sess, list(pre), llm.tokenizer, 10, numbers=1)
                    text += (" | " if text else "") + part
                    tokens = [llm.tokenizer.decode([t]) for t in list(pre)] + [llm.tokenizer.decode([t]) for t in got]
            finally:
                tr.close()
                sess.close()
                asked.close()
            steps = tr.summary()
            log(f"{name} key {answer} -> {text!r}  needle tokens {needle}")
            for i, s in enumerate(steps):
                print(f"   q{i:02d} {s}")
            out.append({"case": name, "answer": answer, "text": text, "needle": needle, "steps": steps,
                        "last_tokens": tokens})
        base.close()
    return out


if __name__ == "__main__":
    main()
