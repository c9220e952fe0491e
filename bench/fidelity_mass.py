"""Adaptive budgets offline: estimated vs true attention mass, and what a mass threshold costs in tokens.

    python bench/fidelity_mass.py --layers L.pt [--chunk 32] [--ps 0.8,0.9,0.95,0.98] [--floor 128] [--cap 4K]
                                  [--radius 0,0.25,0.5,1] [--out bench/out/fidelity_mass.json]

L.pt: the real keys and decode queries of SmolLM2 saved by `bench/fidelity.py --parts recall --save-layers L.pt`
(a list per layer of (keys [Hkv, N, D], queries [Hq, Nq, D], build queries)); --synthetic N uses
offload.indexes.synthetic instead. For each layer, decode query, index estimate and p: each KV head selects
chunks with offload.indexes.adaptive (sinks + window always kept), and the row reports the TRUE mass captured
(mean and worst head), the tokens selected per head (mean, as % of the context), and for comparison a fixed
count per head at the same average (the mass a fixed budget of that size captures).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

from offload.config import parse_tokens  # noqa: E402
from offload.indexes import make_index  # noqa: E402
from offload.indexes.adaptive import (adaptive_counts, adaptive_select, group_shares,  # noqa: E402
                                      selectable_mask, true_chunk_log_mass)

SINK, WINDOW = 64, 256


def estimators(radii: list[float]) -> dict:
    """name -> (method, options) of the index whose chunk_log_mass is measured."""
    out = {f"summary-r{r:g}": ("summary", {"mass_radius": r}) for r in radii}
    out["shadow-r32"] = ("shadow", {"rank": 32})
    out["ann"] = ("ann", {"threads": 1})
    out["oracle"] = (None, {})
    return out


def evaluate(layers, chunk: int, ps: list[float], floor: int, cap: int, radii: list[float],
             queries: int = 8, progress=print) -> list[dict]:
    """Rows per (estimator, p): true captured mass, tokens per head; a fixed count at the same average."""
    acc: dict = {}
    for li, (keys, q_all, *_) in enumerate(layers):
        hkv, n_tok, d = keys.shape
        n_tok -= n_tok % chunk
        keys = keys[:, :n_tok].float()                                          # keys: [Hkv, N, D]
        hq = q_all.shape[0]
        n = n_tok // chunk
        scale = 1.0 / math.sqrt(d)
        n_sink, n_window = math.ceil(SINK / chunk), math.ceil(WINDOW / chunk)
        count = torch.tensor([n])
        sel_mask = selectable_mask(n, count, n_sink, n_window)                  # sel_mask: [n]
        built = {}
        for name, (method, opts) in estimators(radii).items():
            if method is None:
                continue
            idx = make_index(method, num_kv_heads=hkv, num_q_heads=hq, head_dim=d, chunk_tokens=chunk, **opts)
            idx.build(keys)
            built[name] = idx
        pick = torch.linspace(0, q_all.shape[1] - 1, min(queries, q_all.shape[1])).round().long()
        for qi in pick.tolist():
            q = q_all[:, qi].float()                                            # q: [Hq, D]
            true_lm = true_chunk_log_mass(q, keys, chunk, scale)                # true_lm: [Hkv, G, n]
            true_share, true_base = group_shares(true_lm, sel_mask)             # [Hkv, n], [Hkv]
            for name in estimators(radii):
                if name == "oracle":
                    lm = true_lm
                else:
                    idx = built[name]
                    # the cap in chunks: what MassBudgetIndex passes (the shadow fine-scores 4x that many chunks)
                    lm = idx.chunk_log_mass(q, cap // chunk)
                share, base = group_shares(lm, sel_mask)                        # share: [Hkv, n]
                for p in ps:
                    counts = adaptive_counts(share, p, math.ceil(floor / chunk), math.ceil(cap / chunk), base,
                                             sel_mask.sum().expand(hkv))        # counts: [Hkv]
                    ids = adaptive_select(share, counts, math.ceil(cap / chunk))  # ids: [Hkv, W] (-1 = none)
                    got = true_share.gather(1, ids.clamp(min=0)) * (ids >= 0)   # got: [Hkv, W]
                    captured = true_base + got.sum(1)                           # captured: [Hkv]
                    # a fixed count per head with the same total, best chunks by the same estimate
                    k_fix = max(1, round(float(counts.float().mean())))
                    fix_ids = torch.topk(share, k_fix, dim=1).indices           # fix_ids: [Hkv, k]
                    fixed = true_base + true_share.gather(1, fix_ids).sum(1)    # fixed: [Hkv]
                    a = acc.setdefault((name, p), {"cap": [], "fix": [], "tok": [], "est": []})
                    a["cap"].append(captured)
                    a["fix"].append(fixed)
                    a["tok"].append(counts.float() * chunk)
                    a["est"].append(base + (share.gather(1, ids.clamp(min=0)) * (ids >= 0)).sum(1))
        progress(f"layer {li}: {n} chunks")
    rows = []
    for (name, p), a in acc.items():
        cap_t, fix_t, tok, est = (torch.cat(a[k]) for k in ("cap", "fix", "tok", "est"))
        rows.append({"estimate": name, "p": p, "chunk": chunk, "true_mass_mean": round(float(cap_t.mean()), 4),
                     "true_mass_p5": round(float(torch.quantile(cap_t.double(), 0.05)), 4),
                     "true_mass_min": round(float(cap_t.min()), 4), "est_mass_mean": round(float(est.mean()), 4),
                     "tokens_mean": round(float(tok.mean()), 1),
                     "budget_pct": round(100 * float(tok.mean()) / (layers[0][0].shape[1]), 2),
                     "fixed_same_avg_mean": round(float(fix_t.mean()), 4),
                     "fixed_same_avg_p5": round(float(torch.quantile(fix_t.double(), 0.05)), 4),
                     "fixed_same_avg_min": round(float(fix_t.min()), 4)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default=None, help="torch.save'd layers from bench/fidelity.py --save-layers")
    ap.add_argument("--synthetic", default=None, help="tokens of a synthetic layer instead (e.g. 8K)")
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--ps", default="0.8,0.9,0.95,0.98")
    ap.add_argument("--floor", default="128")
    ap.add_argument("--cap", default="4K")
    ap.add_argument("--radius", default="0,0.25,0.5,1")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--out", default="bench/out/fidelity_mass.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.layers:
        layers = torch.load(args.layers)
    else:
        from offload.indexes.synthetic import synthetic_layer
        layers = [synthetic_layer(parse_tokens(args.synthetic or "8K"), 4, 16, 64, seed=s)[:2] for s in range(2)]
    rows = evaluate(layers, args.chunk, [float(p) for p in args.ps.split(",")], parse_tokens(args.floor),
                    parse_tokens(args.cap), [float(r) for r in args.radius.split(",")], args.queries)
    write_results("fidelity_mass", rows, args.out, {"layers": args.layers or f"synthetic {args.synthetic}",
                                                     "command": "python " + " ".join(sys.argv)})


if __name__ == "__main__":
    main()
