"""Tables of bench/fidelity.py: per-part summaries, the goal check, and the RESULTS.md section."""
from __future__ import annotations

import json
from pathlib import Path

START, END = "<!-- fidelity:start -->", "<!-- fidelity:end -->"
GOAL_BUDGET = "5%"
GOALS = {"needle_eq": 0.95, "needle_n": 40, "top1": 0.99, "recall": 0.9}
KV_BYTES_TOKEN_F32 = 30 * 3 * 64 * 2 * 4   # SmolLM2-135M: layers x KV heads x D x (K, V) x float32


def needle_rows(cases: list[dict], labels: list[str]) -> list[dict]:
    rows = []
    for ctx in sorted({c["context"] for c in cases}):
        group = [c for c in cases if c["context"] == ctx]
        for label in [m for m in labels if all(m in c["methods"] for c in group)]:
            row = {"context": ctx, "method": label, "n": len(group)}
            row["correct"] = _share(group, lambda c: c["methods"][label]["digits"] == c["answer"])
            row["eq_full"] = _share(group, lambda c: c["methods"][label]["digits"] == c["methods"]["full"]["digits"])
            known = [c for c in group if c["methods"]["full"]["digits"] == c["answer"]]
            row["n_full_ok"] = len(known)
            row["eq_full_ok"] = _share(known, lambda c: c["methods"][label]["digits"] == c["answer"])
            for kind in ("single", "multi"):
                sub = [c for c in group if c["kind"] == kind]
                row[f"eq_full_{kind}"] = _share(sub, lambda c: c["methods"][label]["digits"]
                                                == c["methods"]["full"]["digits"]) if sub else None
            rows.append(row)
    return rows


def _share(items, pred) -> float:
    return sum(1 for x in items if pred(x)) / len(items) if items else float("nan")


def _split(label: str) -> tuple[str, str, int]:
    config, _, rest = label.partition("@")
    budget, _, chunk = rest.partition("/")
    chunk, plus, tok = chunk.partition("+")   # "16+tok4sum": recall rows name it config "X+tok4sum"
    return config + plus + tok, budget, int(chunk or 0)


def goal_rows(doc: dict) -> list[dict]:
    """Every method seen at the goal budget: the three goal numbers side by side, with pass marks."""
    needle = doc.get("needle", {}).get("rows", [])
    teacher = {r["method"]: r for r in doc.get("teacher", {}).get("rows", [])}
    recall = {(r["config"], r["chunk"]): r for r in doc.get("recall", {}).get("rows", [])
              if r["budget"] == GOAL_BUDGET}
    big = max((r["context"] for r in needle), default=None)
    # methods measured end to end; recall-only configs are in the recall table
    labels = [r["method"] for r in needle if r["context"] == big] + list(teacher)
    rows = []
    for label in dict.fromkeys(labels):
        if label == "full":
            continue
        config, budget, chunk = _split(label)
        if budget != GOAL_BUDGET:
            continue
        nd = next((r for r in needle if r["context"] == big and r["method"] == label), None)
        tr, rc = teacher.get(label), recall.get((config, chunk))
        row = {"method": label,
               "needle_eq": nd["eq_full"] if nd else None, "needle_n": nd["n"] if nd else None,
               "top1": tr["top1_agree"] if tr else None, "kl": tr["kl_mean"] if tr else None,
               "recall": rc["recall_rt"] if rc else None, "captured": rc["captured"] if rc else None}
        checks = [row["needle_eq"] is None or (row["needle_eq"] >= GOALS["needle_eq"] and nd["n"] >= GOALS["needle_n"]),
                  row["top1"] is None or row["top1"] >= GOALS["top1"],
                  row["recall"] is None or row["recall"] >= GOALS["recall"]]
        complete = None not in (row["needle_eq"], row["top1"], row["recall"])
        row["meets"] = ("yes" if all(checks) else "no") + ("" if complete else " (partial)")
        rows.append(row)
    return rows


SUITE_GOALS = {"kept": 0.97, "n_full_ok": 60, "top1": 0.98, "budget_pct": 5.0}   # issue 13 at 8K


def suite_goal_rows(doc: dict) -> list[dict]:
    """Issue 13's goal per method of the needle suite, with teacher forcing beside it. The needle number is
    RETRIEVAL KEPT: of the questions full attention answers correctly, the share the method answers correctly
    too (kept_n of n_full_ok); "= full" (all questions) and "correct" are context. meets: kept >= 97 % over >= 60
    such questions, teacher-forced top-1 >= 98 % and <= 5 % of the context selected per head (where measured)."""
    teacher = {r["method"]: r for r in doc.get("teacher", {}).get("rows", [])}
    rows = []
    for r in doc.get("suite", {}).get("rows", []):
        if r["method"] == "full":
            continue
        t = teacher.get(r["method"], {})
        row = {"method": r["method"], "kept": r.get("kept"), "kept_n": r.get("kept_n"), "n_full_ok": r.get("n_full_ok"),
               **{k: v for k, v in r.items() if k.startswith("kept_") and k != "kept_n"},
               "eq_full": r["eq_full"], "correct": r["correct"], "n": r["n"], "budget_pct": r.get("budget_pct"),
               "top1": t.get("top1_agree"), "kl": t.get("kl_mean"), "teacher_budget_pct": t.get("budget_pct")}
        pct = [x for x in (row["budget_pct"], row["teacher_budget_pct"]) if x is not None]
        checks = [row["kept"] is not None and row["kept"] >= SUITE_GOALS["kept"]
                  and (row["n_full_ok"] or 0) >= SUITE_GOALS["n_full_ok"],
                  row["top1"] is None or row["top1"] >= SUITE_GOALS["top1"],
                  all(x <= SUITE_GOALS["budget_pct"] for x in pct)]
        row["meets"] = ("yes" if all(checks) else "no") + ("" if row["top1"] is not None and pct else " (partial)")
        rows.append(row)
    return rows


def _suite_section(doc: dict) -> list[str]:
    rows = suite_goal_rows(doc)
    full = next((r for r in doc["suite"]["rows"] if r["method"] == "full"), {})
    ctxs = sorted({c["context"] for c in doc["suite"]["cases"]})
    out = [f"### Needle suite: {full.get('n', 0)} questions ({', '.join(f'{c // 1024}K' for c in ctxs)}); full "
           f"attention answers {full.get('kept_n', 0)} correctly ({_pct(full.get('correct'))} %)", "",
           "**retrieval kept** (the issue-13 needle number, goal >= 97 % of >= 60): of the questions full attention "
           "answers correctly, the share the method answers correctly too. = full: the method's numbers equal full "
           "attention's, all questions (full attention's wrong answers flip on rounding: not a goal measure). "
           "correct: all questions. tokens/head: selected beyond sinks + window (% of the context).", ""]
    head = ["method", "retrieval kept", *[f"kept {c // 1024}K" for c in ctxs], "= full %", "correct %",
            "tokens % (suite)", "top-1 %", "KL", "tokens % (teacher)", "meets"]
    body = [[r["method"], f"{_pct(r['kept'])} % ({r['kept_n']}/{r['n_full_ok']})",
             *[_pct(r.get(f"kept_{c // 1024}K")) for c in ctxs], _pct(r["eq_full"]), _pct(r["correct"]),
             _num(r["budget_pct"], "{}"), _pct(r["top1"]), _num(r["kl"], "{:.4f}"), _num(r["teacher_budget_pct"], "{}"),
             r["meets"]] for r in rows]
    out += _table(head, body) + [""]
    ran = len({c["case"].rsplit("-", 1)[0] for c in doc["suite"]["cases"]})
    if doc["suite"].get("documents_planned", ran) > ran:
        out += [f"Stopped at the deadline: {ran} of {doc['suite']['documents_planned']} documents ran.", ""]
    for label, err in {**doc["suite"].get("errors", {}), **doc.get("teacher", {}).get("errors", {})}.items():
        out += [f"- `{label}` failed and was dropped: {err}"]
    return out + [""]


# ---- markdown --------------------------------------------------------------------------------
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
           ["| " + " | ".join(r) + " |" for r in rows]


def render(doc: dict) -> str:
    out = [START, "## Fidelity: sparse attention on SmolLM2-135M-Instruct (real weights)", ""]
    out += [f"Device: {doc.get('device')} ({doc.get('dtype', 'float32')}), torch {doc.get('torch')}, {doc.get('threads')} thread(s); "
            f"date {doc.get('date')}; sinks {doc.get('sink_tokens')} + window {doc.get('window_tokens')} tokens "
            "always attended; budget = selected chunks on top. Method = index config @ budget / chunk tokens "
            "(configs: bench/index_recall.py CONFIGS). Commands:", ""]
    out += [f"    {c}" for c in doc.get("commands", [])] + [""]
    if doc.get("goals"):
        out += [f"### Goals at {GOAL_BUDGET} (needle at the largest context, = full >= 95 % of >= 40 cases; "
                "teacher-forced top-1 >= 99 %; recall of attention mass >= 0.9)", ""]
        out += _table(["method", "needle = full %", "n", "top-1 agree %", "KL", "recall", "captured", "meets"],
                      [[r["method"], _pct(r["needle_eq"]), _num(r["needle_n"], "{}"), _pct(r["top1"]),
                        _num(r["kl"], "{:.4f}"), _num(r["recall"]), _num(r["captured"]), r["meets"]]
                       for r in doc["goals"]]) + [""]
    if doc.get("notes"):
        out += [doc["notes"].strip(), ""]
    if doc.get("suite"):
        out += _suite_section(doc)
    if doc.get("needle"):
        out += ["### Needle (passkey) retrieval: question + answer prefix fed through the method, greedy", ""]
        out += ["= full | full ok: agreement on the cases full attention answers correctly (n ok of them).", ""]
        out += _table(["context", "method", "n", "correct %", "= full %", "= full single %", "= full multi %",
                       "= full, full ok %", "n ok"],
                      [[str(r["context"]), r["method"], str(r["n"]), _pct(r["correct"]), _pct(r["eq_full"]),
                        _pct(r["eq_full_single"]), _pct(r["eq_full_multi"]), _pct(r.get("eq_full_ok")),
                        str(r.get("n_full_ok", "-"))] for r in doc["needle"]["rows"]]) + [""]
    if doc.get("teacher"):
        t = doc["teacher"]
        out += [f"### Teacher-forced: {t['context']} tokens of text, then {t['continuation']} tokens through step()",
                "", "next acc = argmax equals the text's next token; ms/token on the run's device (above).", ""]
        out += _table(["method", "top-1 agree %", "KL mean", "KL p99", "KL max", "next acc %", "ms/token"],
                      [[r["method"], _pct(r["top1_agree"]), _num(r["kl_mean"], "{:.4f}"), _num(r["kl_p99"], "{:.4f}"),
                        _num(r["kl_max"], "{:.3f}"), _pct(r["next_acc"]), _num(r["ms_token"], "{:.0f}")]
                       for r in t["rows"]]) + [""]
    if doc.get("recall"):
        out += _recall_section(doc["recall"])
    out.append(END)
    return "\n".join(out)


def _recall_section(rc: dict) -> list[str]:
    rows = rc["rows"]
    budgets = sorted(dict.fromkeys(r["budget"] for r in rows), key=lambda b: float(b.rstrip("%")))
    keys = list(dict.fromkeys((r["config"], r["chunk"]) for r in rows))
    at = {(r["config"], r["chunk"], r["budget"]): r for r in rows}
    out = [f"### Selection on real keys/queries: {rc['tokens']} tokens, {rc['layers']} layers, "
           f"{rc['queries']} decode queries per layer", "",
           "recall = mass of the chunks the backend selects (sinks/window excluded) / best possible of the same "
           "count; captured = mass seen by the step (sinks + window + selection) / all; oracle = captured with "
           "the best selection; select ms = one select x 30 layers (CPU, float32); metadata = index.nbytes of "
           f"all layers per token (KV is {KV_BYTES_TOKEN_F32} B/token in float32).", ""]
    gb = GOAL_BUDGET if GOAL_BUDGET in budgets else budgets[-1]
    header = ["config", "C"] + [f"recall@{b}" for b in budgets] + [f"captured@{gb}", f"oracle@{gb}",
                                                                 f"select ms/step@{gb}", "metadata B/tok"]
    lines = []
    for config, chunk in keys:
        r = at.get((config, chunk, gb), {})
        lines.append([config, str(chunk)] + [_num(at.get((config, chunk, b), {}).get("recall_rt")) for b in budgets]
                     + [_num(r.get("captured")), _num(r.get("oracle")), _num(r.get("select_ms_step"), "{:.1f}"),
                        _num(r["B/tok gpu"] + r["B/tok host"] if r else None, "{:.0f}")])
    return out + _table(header, lines) + [""]


def write_markdown(path: str, doc: dict) -> None:
    """Replace (or append) only the fidelity section of the results file."""
    p = Path(path)
    text = p.read_text() if p.exists() else ""
    section = render(doc)
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        text = before + section + after
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section + "\n"
    p.write_text(text)


# ---- merging split runs ------------------------------------------------------------------------
def merge(paths: list[str], command: str) -> dict:
    """Later files win per part; commands and dates are kept from all."""
    from fidelity_sessions import ALL_CONFIGS as CONFIGS
    from fidelity_suite import suite_rows
    doc: dict = {}
    commands, cases, teacher, recall, suite = [], {}, {}, {}, {}
    for p in paths:
        part = json.loads(Path(p).read_text())
        commands += part.get("commands", [])
        for case in part.get("suite", {}).get("cases", []):
            if case["case"] in suite:     # same question, other methods: add them
                case = {**case, "methods": {**suite[case["case"]]["methods"], **case["methods"]}}
            suite[case["case"]] = case
        # rows of split runs add up (a later file wins for the same case / method / config)
        for case in part.get("needle", {}).get("cases", part.get("cases", [])):
            if case["case"] in cases:     # same prompt, other methods: add them (full is deterministic)
                case = {**case, "methods": {**cases[case["case"]]["methods"], **case["methods"]}}
            cases[case["case"]] = case
        for row in part.get("teacher", {}).get("rows", []):
            teacher[row["method"]] = row
        for row in part.get("recall", {}).get("rows", []):
            recall[(row["config"], row["chunk"], row["budget"])] = row
        doc.update({k: v for k, v in part.items() if k not in ("commands", "cases")})
    if teacher:
        doc["teacher"] = {**doc["teacher"], "rows": list(teacher.values())}
    if recall:
        configs = {n: list(CONFIGS[n.split("+")[0]]) for n in dict.fromkeys(k[0] for k in recall)}
        doc["recall"] = {**doc["recall"], "configs": configs, "rows": list(recall.values())}
    if suite:
        labels = list(dict.fromkeys(m for c in suite.values() for m in c["methods"]))
        doc["suite"] = {"cases": list(suite.values()), "rows": suite_rows(list(suite.values()), labels)}
    if cases:
        labels = list(dict.fromkeys(m for c in cases.values() for m in c["methods"]))
        doc["needle"] = {"cases": list(cases.values()), "rows": needle_rows(list(cases.values()), labels)}
    doc["commands"] = commands + [command]
    doc["goals"] = goal_rows(doc)
    if suite:
        doc["suite_goals"] = suite_goal_rows(doc)
    return doc
