"""The needle suite of bench/fidelity.py: >= 100 questions over 2K-8K tokens, three haystack sources, four tasks.

Sources (all shipped with Python, no download): "pydoc" (pydoc_data.topics), "docstrings" (the module, class
and function docstrings of the stdlib's Lib/*.py), "lists" (generated inventory records, full of numbers that
look like answers). Each document carries every task's needles, and every question about it is one case,
so one exact prefill serves six cases:
    multikey    passkeys of three labelled places; ask one (the other two are distractors)      x3
    single      "the secret passkey"; ask it                                                     x1
    multivalue  two "special magic numbers" for one word at two depths; ask for both            x1
    vartrack    a variable chain A = n ... B copies A ... C copies B (after RULER); ask C's value x1
(wordings: bench/fidelity_needles.py). As in the runtime, the prompt (document and question) is prefilled
exactly; the answer prefix ("The passkey of Lima is Lima-") and the greedy answer go through the method under
test, so every digit of the answer is decided by sparse decode steps. A case is correct when its numbers are
the needles' (multi-value: both, either order); it is kept when full attention's answer is correct and the
method's too (the headline, `suite_rows`); equal to full attention when its numbers are the full session's.
(The older `needle` part routes the whole question through the method: stricter, slower.)
"""
from __future__ import annotations

import ast
import random
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from fidelity_data import _line_starts, _nearest, split_template
from fidelity_needles import needles as make_needles
from fidelity_variants import fixed_budget_tokens

SOURCES = ("pydoc", "docstrings", "lists")
KINDS = ("multikey", "single", "multivalue", "vartrack")
_ADJ = ("blue", "heavy", "small", "antique", "green", "polished", "rusty", "spare", "wooden", "sealed")
_NOUN = ("valve", "crate", "lamp", "gear", "barrel", "cable", "anchor", "kettle", "spindle", "ledger")
_CITY = ("Oslo", "Lyon", "Porto", "Graz", "Turku", "Bergen", "Leeds", "Aarhus", "Trieste", "Cork")


@dataclass(frozen=True)
class SuiteDoc:
    """One document with all tasks' needles; `questions` = [(case name, kind, answer digits, question ids,
    answer-prefix ids, numbers, later prefixes)]: the question ids continue the document, the answer prefix
    continues them; later prefixes (ids; one per number after the first, or none) are fed after each number."""

    name: str
    context: int
    source: str
    head: list[int] = field(repr=False)
    doc: list[int] = field(repr=False)
    questions: tuple = field(repr=False)


def source_text(source: str) -> str:
    if source == "pydoc":
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k].strip() for k in sorted(topics))
    if source == "docstrings":
        parts = []
        for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in [tree, *ast.walk(tree)]:
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 80:
                        parts.append(doc.strip())
        return "\n\n".join(parts)
    if source == "lists":
        rng = random.Random(1234)
        lines = [f"Record {i:04d}: the {rng.choice(_ADJ)} {rng.choice(_NOUN)} from {rng.choice(_CITY)} weighs "
                 f"{rng.randrange(100, 9999)} grams, sits on shelf {rng.randrange(1, 60)} and ships in "
                 f"{rng.randrange(2, 30)} days." for i in range(6000)]
        return "\n".join(lines)
    raise ValueError(f"haystack source {source!r}: use one of {', '.join(SOURCES)}")


def suite_docs(tokenizer, contexts: list[int], sources: list[str], docs_per: int, seed: int = 0,
               reserve: int = 24, first_index: int = 0, wording: str = "v2") -> list[SuiteDoc]:
    """docs_per documents per (context, source); every document holds all tasks (6 questions).
    first_index numbers the documents (names stay unique when a plan asks for one context twice);
    wording: the needles' and questions' words (bench/fidelity_needles.py; v1 = the runs before 2026-11-30)."""
    rng = random.Random(seed)
    hays = {s: tokenizer.encode(source_text(s), add_special_tokens=False) for s in sources}
    out = []
    for ctx in contexts:
        for source in sources:
            hay = hays[source]
            for i in range(docs_per):
                needles, questions = make_needles(rng, wording)
                head, _ = split_template(tokenizer, "", "")
                tails = [split_template(tokenizer, q[1], q[2])[1] for q in questions]
                asks = [split_template(tokenizer, q[1], "")[1] for q in questions]
                assert all(t[:len(a)] == a for t, a in zip(tails, asks)), "answer prefix must start a new token"
                needle_ids = [(d, tokenizer.encode(t + "\n", add_special_tokens=False)) for d, t in needles]
                room = ctx - reserve - len(head) - max(map(len, tails)) - sum(len(n) for _, n in needle_ids)
                start = rng.randrange(0, max(1, len(hay) - room))
                base = hay[start:start + room]
                starts = _line_starts(tokenizer, base)
                spots = sorted(((_nearest(starts, int(d * len(base))), j) for j, (d, _) in enumerate(needle_ids)))
                doc, last = [], 0
                for pos, j in spots:               # needles in depth order; ties keep their listed order
                    doc += base[last:pos] + needle_ids[j][1]
                    last = pos
                doc += base[last:]
                name = f"{ctx // 1024}K-{source}-{i + first_index}"
                qs = tuple((f"{name}-{q[0]}{k if q[0] == 'multikey' else ''}", q[0], q[3], asks[k],
                            tails[k][len(asks[k]):], q[4],
                            tuple(tokenizer.encode(t, add_special_tokens=False) for t in (q[5] if len(q) > 5 else ())))
                           for k, q in enumerate(questions))
                out.append(SuiteDoc(name, ctx, source, head, doc, qs))
    return out


def answer_numbers(text: str, numbers: int) -> str:
    """The first `numbers` digit runs of an answer, comma-joined ('' if none)."""
    return ",".join(re.findall(r"\d+", text)[:numbers])


# ---- running it ----------------------------------------------------------------------------------
def run_suite(llm, docs: list[SuiteDoc], methods, fork, greedy_answer, log, max_new: int = 10,
              partial: str | None = None, cache_dir: str | None = None, stop_at: float | None = None,
              errors: dict | None = None) -> list[dict]:
    """Every question of every document through full attention and each method -> one row per case.

    cache_dir: exact document prefills are saved there (Session.save) and loaded by a later run of the same
    documents, so a re-run with other methods skips the prefill (minutes per 8K document on 2 CPU cores).
    stop_at: a time.perf_counter() value after which no further document is started (a bounded device call).
    errors: filled with {method label: first error}; a method that raises is dropped from the rest of the run.
    """
    import hashlib
    import json
    import time
    rows, errors = [], ({} if errors is None else errors)
    for n_done, d in enumerate(docs):
        if stop_at is not None and time.perf_counter() > stop_at:
            log(f"suite: deadline reached after {n_done} of {len(docs)} documents")
            break
        t0 = time.perf_counter()
        ids = d.head + d.doc
        path = None
        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            path = Path(cache_dir) / (hashlib.sha1(json.dumps([llm.name, ids]).encode()).hexdigest()[:16] + ".offload")
        if path is not None and path.exists():
            base = llm.load_session(path)
        else:
            base = llm.session()
            base.prefill(ids)                        # exact: the document is never what is being measured
            if path is not None:
                base.save(path)
        # document-level variants (sparse prefill): their own prefill of the same document
        doc_bases = {m.label: m.prefill_document(llm, ids) for m in methods if hasattr(m, "prefill_document")}
        prefill_s = time.perf_counter() - t0
        for name, kind, answer, ask, prefix, numbers, later in d.questions:
            row = {"case": name, "context": d.context, "source": d.source, "kind": kind, "answer": answer,
                   "tokens": len(d.head) + len(d.doc) + len(ask) + len(prefix), "methods": {}}
            asked = base.fork(attention="full")
            asked.prefill(ask)                       # the question, exactly (it is part of the prompt)
            for m in methods:
                if m.label in errors:
                    continue
                try:
                    row["methods"][m.label] = _answer(llm, m, asked, doc_bases, fork, greedy_answer, ask,
                                                      (prefix, *later), max_new, numbers, row["tokens"])
                except Exception as e:   # noqa: BLE001  one method failing (on a device, say) drops it, not the run
                    if m.label == "full":
                        raise
                    errors[m.label] = f"{name}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                    log(f"  {m.label} dropped from the run: {errors[m.label]}")
            full = row["methods"]["full"]["digits"]
            short = " ".join(f"{k.split('@')[0][:7]}={'=' if v['digits'] == full else v['digits'] or '-'}"
                             for k, v in row["methods"].items() if k != "full")
            log(f"  {name:28s} key {answer:11s} full {full or '-':11s} {short}")
            rows.append(row)
            if partial:
                Path(partial).write_text(json.dumps({"suite": rows}, indent=1))
            asked.close()
        base.close()
        for sess in doc_bases.values():
            sess.close()
        log(f"{d.name}: {len(d.questions)} questions (prefill {prefill_s:.0f}s)")
    return rows


def _answer(llm, m, asked, doc_bases, fork, greedy_answer, ask, prefixes, max_new, numbers, tokens) -> dict:
    """One method's answer to one question: {text, digits, s, tokens_per_head?, prefill_density?}. prefixes: the
    answer prefix, then (staged answers) one prefix per further number, fed after the previous number's digits."""
    extra = {}
    if m.label in doc_bases:
        sess, extra["prefill_density"] = m.ask(doc_bases[m.label], ask)
    else:
        sess = fork(asked, m)
    try:
        each = 1 if len(prefixes) > 1 else numbers
        text, secs = "", 0.0
        for prefix in prefixes:
            part, _, s = greedy_answer(sess, list(prefix), llm.tokenizer, max_new * each, numbers=each)
            text, secs = text + (" | " if text else "") + part, secs + s
        used = selected_tokens(sess, m)
    finally:
        sess.close()
    if used is None:     # a fixed budget: what it selects at this length (None: exact attention)
        used = fixed_budget_tokens(m, tokens, llm.config.sink_tokens, llm.config.window_tokens)
    if used is not None:
        extra["tokens_per_head"] = used
    return {"text": text, "digits": answer_numbers(text, numbers), "s": round(secs, 2), **extra}


def selected_tokens(sess, method) -> float | None:
    """Mean tokens a head selected per step (mass budgets: what the threshold really took), else None."""
    if getattr(method, "tok_mass", 0):
        from fidelity_sessions import TOKEN_PICKS
        return TOKEN_PICKS.mean()
    indexes = getattr(sess.attn, "indexes", None) or []
    used = [idx.selected_chunks() for idx in indexes if hasattr(idx, "selected_chunks")]
    # 0: no step selected (the cap covered the context, everything was attended): the caller reports the cap
    return round(sum(used) / len(used) * method.chunk, 1) if used and sum(used) > 0 else None


def is_correct(case: dict, label: str) -> bool:
    """The method's numbers are the needles' (multi-value: both, in either order)."""
    got = case["methods"][label]["digits"]
    return sorted(got.split(",")) == sorted(case["answer"].split(",")) if got else False


def suite_rows(cases: list[dict], labels: list[str]) -> list[dict]:
    """Per method: retrieval kept (the headline: of the questions full attention answers correctly, the share the
    method answers correctly; n_full_ok of them), answers equal to full attention (all, per task, per source),
    correct answers (all), budget used."""
    out = []
    for label in labels:
        group = [c for c in cases if label in c["methods"]]
        if not group:
            continue
        eq = lambda c: c["methods"][label]["digits"] == c["methods"]["full"]["digits"]  # noqa: E731
        known = [c for c in group if is_correct(c, "full")]      # full attention retrieved the needle(s)
        kept = sum(1 for c in known if is_correct(c, label))
        row = {"method": label, "n": len(group), "kept": _share(known, lambda c: is_correct(c, label)),
               "kept_n": kept, "n_full_ok": len(known), "eq_full": _share(group, eq),
               "correct": _share(group, lambda c: is_correct(c, label))}
        for ctx in sorted({c["context"] for c in known}):
            row[f"kept_{ctx // 1024}K"] = _share([c for c in known if c["context"] == ctx], lambda c: is_correct(c, label))
        for key, values in (("kind", KINDS), ("source", SOURCES)):
            for v in values:
                sub = [c for c in group if c[key] == v]
                if sub:
                    row[f"eq_{v}"] = _share(sub, eq)
        for ctx in sorted({c["context"] for c in group}):
            row[f"eq_{ctx // 1024}K"] = _share([c for c in group if c["context"] == ctx], eq)
        used = [(c["methods"][label]["tokens_per_head"], c["tokens"]) for c in group
                if "tokens_per_head" in c["methods"][label]]
        if used:
            row["tokens_per_head"] = round(sum(u for u, _ in used) / len(used), 1)
            # selected tokens as a share of the context (sinks + window come on top: 320 tokens)
            row["budget_pct"] = round(100 * sum(u / n for u, n in used) / len(used), 2)
        dens = [c["methods"][label]["prefill_density"] for c in group if "prefill_density" in c["methods"][label]]
        if dens:
            row["prefill_density"] = round(sum(dens) / len(dens), 4)
        ref = SAME_ATTENTION.get(label.rsplit(":", 1)[0]) if label.startswith("kv:") else None
        paired = [c for c in group if ref in c["methods"]]
        if paired:   # compressed KV against the same attention on unquantized KV: what quantization alone changes
            row["eq_same_attention"] = _share(paired, lambda c: c["methods"][label]["digits"]
                                              == c["methods"][ref]["digits"])
        out.append(row)
    return out


# kv:ATTN:DTYPE methods and the method that is the same attention on unquantized KV
SAME_ATTENTION = {"kv:exact": "full", "kv:sparse": "summary-max@2K/32"}


def _share(items, pred) -> float:
    return round(sum(1 for x in items if pred(x)) / len(items), 4) if items else float("nan")
