"""Markdown tables of a needle-suite run (bench/fidelity.py --parts suite, or --merge of split runs), split by
the issue each lossy option belongs to, with the goal checks.

    python bench/fidelity_tables.py SUITE.json [--teacher TEACHER.json] [--context 8192]

issue 13  sparse decode configurations: retrieval kept (of the questions full attention answers correctly, the
          share the method answers correctly: the headline), answers equal to full attention at --context (all contexts too),
          per task, the tokens a head selected (share of the context); teacher-forced top-1 and KL from a
          bench/fidelity.py --parts teacher JSON. Goal: >= 97 % needles, >= 98 % top-1 at <= 5 % of 8K.
issue 12  kv:ATTN:DTYPE: equal to full attention, and to the same attention on unquantized KV.
issue 11  prefill:sparse:P: answers equal to exact prefill's (goal >= 95 %), mean block density kept.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fidelity_suite import KINDS, is_correct, suite_rows


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _count(cases, label, pred) -> str:
    group = [c for c in cases if label in c["methods"]]
    return f"{sum(1 for c in group if pred(c))}/{len(group)}"


def _table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]


def tables(cases: list[dict], teacher: dict | None, context: int) -> str:
    labels = list(dict.fromkeys(m for c in cases for m in c["methods"]))
    at = [c for c in cases if c["context"] == context]
    rows_all = {r["method"]: r for r in suite_rows(cases, labels)}
    rows_at = {r["method"]: r for r in suite_rows(at, labels)} if at else {}
    same = lambda label: (lambda c: c["methods"][label]["digits"] == c["methods"]["full"]["digits"])  # noqa: E731
    ctxs = sorted({c["context"] for c in cases})
    per_ctx = ", ".join(f"{sum(c['context'] == x for c in cases)} at {x // 1024}K" for x in ctxs)
    right = _count(cases, "full", lambda c: is_correct(c, "full"))
    out = [f"Cases: {len(cases)} questions ({per_ctx}); full attention answers {right} correctly.", "",
           "Retrieval kept (the issue-13 needle goal, >= 97 %): of the questions full attention answers correctly, "
           "the share the method answers correctly too. = full: agreement with full attention on every question "
           "(kinds: counted at the goal context).", ""]
    # issue 13
    sparse = [m for m in labels if m != "full" and not m.startswith(("kv:", "prefill:"))]
    teach = {r["method"]: r for r in (teacher or {}).get("rows", [])}
    head = ["method", "retrieval kept (all ctx)", f"kept @{context // 1024}K", f"= full @{context // 1024}K",
            "= full, all ctx"] + [k for k in KINDS] + \
           [f"tokens/head @{context // 1024}K (% ctx)", "top-1 %", "KL mean", "teacher tokens/head (%)"]
    body = []
    for m in sparse:
        r, ra, t = rows_at.get(m, {}), rows_all[m], teach.get(m, {})
        body.append([m, f"{_pct(ra['kept'])} % ({ra['kept_n']}/{ra['n_full_ok']})",
                     f"{_pct(r.get('kept'))} % ({r.get('kept_n', 0)}/{r.get('n_full_ok', 0)})",
                     _count(at, m, same(m)) + f" ({_pct(r.get('eq_full'))} %)", f"{_pct(ra['eq_full'])} %"]
                    + [_count([c for c in at if c["kind"] == k], m, same(m)) for k in KINDS]
                    + [f"{r.get('tokens_per_head', '-')} ({r.get('budget_pct', '-')})",
                       _pct(t.get("top1_agree")), "-" if "kl_mean" not in t else f"{t['kl_mean']:.4f}",
                       f"{t.get('tokens_per_head', '-')} ({t.get('budget_pct', '-')})"])
    out += ["Issue 13 (sparse decode; kinds counted at the goal context):", ""] + _table(head, body) + [""]
    # issue 12
    kv = [m for m in labels if m.startswith("kv:")]
    if kv:
        body = [[m, _count(cases, m, same(m)) + f" ({_pct(rows_all[m]['eq_full'])} %)",
                 f"{_pct(rows_all[m].get('eq_same_attention'))} %",
                 _count(cases, m, lambda c, m=m: c["methods"][m]["digits"] == c["answer"])] for m in kv]
        out += ["Issue 12 (compressed KV):", ""] + _table(
            ["method", "= full attention (fp32 KV)", "= same attention, unquantized KV", "correct"], body) + [""]
    # issue 11
    pf = [m for m in labels if m.startswith("prefill:")]
    if pf:
        body = []
        for m in pf:
            per = " / ".join(_count([c for c in cases if c["context"] == x], m, same(m)) for x in ctxs)
            body.append([m, _count(cases, m, same(m)) + f" ({_pct(rows_all[m]['eq_full'])} %)", per,
                         rows_all[m].get("prefill_density", "-")])
        out += ["Issue 11 (sparse prefill vs exact prefill):", ""] + _table(
            ["method", "= exact prefill", " / ".join(f"{x // 1024}K" for x in ctxs), "density kept"], body) + [""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", nargs="+", help="suite JSON files (or .partial files); later ones win per case")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--context", type=int, default=8192)
    args = ap.parse_args()
    cases = {}
    for p in args.suite:
        doc = json.loads(Path(p).read_text())
        suite = doc["suite"] if isinstance(doc["suite"], list) else doc["suite"]["cases"]   # .partial: a list
        for c in suite:        # the same question in several runs: their methods side by side, but only
            old = cases.get(c["case"], {"methods": {}})   # when full attention answered the same (same code)
            same = old["methods"].get("full", {}).get("text") == c["methods"]["full"]["text"]
            cases[c["case"]] = {**c, "methods": {**(old["methods"] if same else {}), **c["methods"]}}
    teacher = None
    if args.teacher:
        t = json.loads(Path(args.teacher).read_text())
        teacher = t.get("teacher", t)
    print(tables(list(cases.values()), teacher, args.context))


if __name__ == "__main__":
    main()
