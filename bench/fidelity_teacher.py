"""Teacher forcing of bench/fidelity.py (--parts teacher, and the query capture of --parts recall): natural text,
then a continuation fed token by token through full attention and through each method's Session.step."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fidelity_data import haystack_ids, teacher_text_ids
from fidelity_sessions import Method, QueryRecorder, fork
from fidelity_suite import selected_tokens
from fidelity_variants import fixed_budget_tokens, fork_any


def run_teacher(llm, args, methods: list, capture: bool, log, stop_at: float | None = None) -> tuple[dict, list | None]:
    """--continuation tokens of text after --teacher-context tokens, teacher-forced through full attention and each
    method: top-1 agreement, KL(full || method), next-token accuracy, ms/token, the budget used. capture: also the
    real keys and decode queries of every layer (for the recall part). stop_at: no method starts after it."""
    mc = llm.model_config
    tok = llm.tokenizer
    ids = teacher_text_ids(tok, haystack_ids(tok), args.teacher_context, args.continuation)
    n_ctx, cont = args.teacher_context, ids[args.teacher_context:]
    log(f"teacher: prefill {n_ctx} tokens")
    base = llm.session()
    rec_pre = QueryRecorder(base.attn, mc.num_layers, stride=args.build_query_stride) if capture else None
    base.prefill(ids[:n_ctx])
    if rec_pre:
        rec_pre.detach()
    full = fork(base, Method("full"))
    rec = QueryRecorder(full.attn, mc.num_layers) if capture else None
    ref_logp, ref_top = [], []
    t0 = time.perf_counter()
    for t in cont:
        lp = torch.log_softmax(full.step(t).float(), -1)          # lp: [V]
        ref_logp.append(lp)
        ref_top.append(int(lp.argmax()))
    full_ms = 1000 * (time.perf_counter() - t0) / len(cont)
    log(f"teacher: full attention {len(cont)} steps, {full_ms:.0f} ms/token")
    truth = cont[1:]   # the text's own next tokens (the last step has none)
    errors: dict = {}
    rows = [{"method": "full", "top1_agree": 1.0, "kl_mean": 0.0, "kl_p99": 0.0, "kl_max": 0.0,
             "next_acc": sum(a == b for a, b in zip(ref_top, truth)) / len(truth), "ms_token": full_ms}]
    for m in methods:
        if stop_at is not None and time.perf_counter() > stop_at:
            log(f"teacher: deadline reached, {m.label} and later methods not run")
            break
        sess = None
        try:
            sess = fork_any(base, m)
            kls, agree, top = [], 0, []
            t0 = time.perf_counter()
            for i, t in enumerate(cont):
                lp = torch.log_softmax(sess.step(t).float(), -1)      # lp: [V]
                kls.append(float((ref_logp[i].exp() * (ref_logp[i] - lp)).sum()))
                top.append(int(lp.argmax()))
                agree += top[-1] == ref_top[i]
        except Exception as e:   # noqa: BLE001  one method failing (on a device, say) is reported, not the run
            errors[m.label] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            log(f"  {m.label} failed: {errors[m.label]}")
            if sess is not None:
                sess.close()
            continue
        ms = 1000 * (time.perf_counter() - t0) / len(cont)
        kls_sorted = sorted(kls)
        row = {"method": m.label, "top1_agree": agree / len(cont), "kl_mean": sum(kls) / len(kls),
               "kl_p99": kls_sorted[int(0.99 * (len(kls) - 1))], "kl_max": kls_sorted[-1],
               "next_acc": sum(a == b for a, b in zip(top, truth)) / len(truth), "ms_token": ms,
               "selection_ms_step": sess.stats().get("selection_ms_per_step")}
        used = selected_tokens(sess, m)     # mass budgets: the mean it took; fixed: what it selects at n_ctx
        used = used if used is not None else fixed_budget_tokens(m, n_ctx, llm.config.sink_tokens,
                                                                 llm.config.window_tokens)
        if used is not None:
            row["tokens_per_head"], row["budget_pct"] = used, round(100 * used / n_ctx, 2)
        st = sess.stats()   # token stage: its own time, and the key bytes it scores next to what it attends
        row.update({k: st[k] for k in ("token_stage_ms_per_step", "scored_key_bytes", "token_attended_bytes",
                                       "attended_bytes_gpu") if k in st})
        rows.append(row)
        sess.close()
        Path(args.out + ".teacher.partial").write_text(json.dumps({"context": n_ctx, "continuation": len(cont),
                                                                   "rows": rows}, indent=1, default=str))
        log(f"  {m.label:28s} top1 {row['top1_agree']:.3f}  KL {row['kl_mean']:.4f}  {ms:.0f} ms/token")
    layers = None
    if capture:
        pick = torch.linspace(0, len(cont) - 1, min(args.recall_queries, len(cont))).round().long()
        keep = [int(x) for x in (args.recall_layers.split(",") if args.recall_layers != "all" else range(mc.num_layers))]
        layers = [(base.attn.read_kv(layer)[0][:, :n_ctx].float().clone(),            # keys: [Hkv, N, D]
                   rec.stacked(layer)[:, pick],                                       # queries: [Hq, Nq, D]
                   rec_pre.stacked(layer)) for layer in keep]                         # build q: [Hq, Nb, D]
    full.close()
    base.close()
    return {"context": n_ctx, "continuation": len(cont), "rows": rows, "errors": errors}, layers
