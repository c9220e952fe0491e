"""The token stage with a mass threshold, offline: true attention mass and tokens per head (issue 13).

    python bench/token_mass_sim.py --layers L.pt [--chunk 16] [--factors 4,8] [--ps 0.9,0.95] [--cap 10%]
                                   [--floor 64] [--configs summary-max,shadow-r32-mass] [--out J.json]

L.pt: SmolLM2's real keys and decode queries at 8K (`bench/fidelity.py --parts recall --save-layers L.pt`: per
layer keys [Hkv, N, D], queries [Hq, Nq, D], build queries). Per layer, decode query and KV head, the index
proposes F x the cap's chunks as candidates; their keys are scored exactly and `select_tokens(mass=p)` keeps the
fewest best tokens whose share (normalised over sinks + window + candidates) reaches p, between floor and cap.
Rows: tokens attended per head beyond sinks + window (mean, % of the context), the TRUE mass of sinks + window +
kept tokens under exact attention over all N (mean over queries and heads, 5th percentile, minimum), and for
comparison "oracle" = the same rule over every token (exact top-p) and "fixed" = the best `budget` tokens of the
same candidates (the shipped token stage) at the same mean count.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, write_results  # noqa: E402
from index_recall import CONFIGS  # noqa: E402

from offload.config import parse_tokens  # noqa: E402
from offload.indexes import make_index  # noqa: E402
from offload.kernels.tokens import select_tokens  # noqa: E402

SINK, WINDOW = 64, 256


def parse_count(text: str, n: int) -> int:
    return round(n * float(text[:-1]) / 100) if text.endswith("%") else parse_tokens(text)


def candidate_tokens(index, q, n_chunks: int, chunk: int, want: int, n_sink: int, n_window: int):
    """Token positions [Hkv, M] (-1 padding) of the index's `want` best chunks outside sinks + window."""
    ids = index.select(q, want + n_sink + n_window).long()                     # ids: [Hkv, W]
    ids = ids.masked_fill((ids < n_sink) | (ids >= n_chunks - n_window), -1)
    keep = torch.sort((ids >= 0).int(), dim=1, descending=True, stable=True).indices[:, :want]
    ids = ids.gather(1, keep)                                                  # ids: [Hkv, want] best first
    pos = ids[..., None] * chunk + torch.arange(chunk)                         # pos: [Hkv, want, C]
    return torch.where(ids[..., None] >= 0, pos, -1).flatten(1)                # [Hkv, want * C]


def evaluate_layer(keys, queries, index, chunk, factors, ps, cap, floor, fixed_too=True):
    """Per (factor, p): (kept tokens [Hkv x Nq], true mass [Hkv x Nq], fixed-count true mass) of one layer."""
    hkv, n, d = keys.shape
    hq, nq, _ = queries.shape
    g, scale = hq // hkv, d ** -0.5
    n_chunks, n_sink, n_window = n // chunk, math.ceil(SINK / chunk), math.ceil(WINDOW / chunk)
    base_mask = torch.zeros(n, dtype=torch.bool)
    base_mask[:n_sink * chunk] = True
    base_mask[(n_chunks - n_window) * chunk:] = True
    out = {}
    for t in range(nq):
        q = queries[:, t]                                                      # q: [Hq, D]
        s = torch.einsum("hgd,hnd->hgn", q.reshape(hkv, g, d), keys) * scale   # s: [Hkv, G, N]
        prob = torch.softmax(s, -1)                                            # prob: [Hkv, G, N] exact
        base_lse = torch.logsumexp(s[..., base_mask], -1).reshape(hq)          # base_lse: [Hq]
        base_true = prob[..., base_mask].sum(-1).mean(1)                       # [Hkv]
        for f in factors:
            if index is None:       # oracle: every token outside sinks + window is a candidate
                pos = torch.arange(n)[~base_mask].expand(hkv, -1)              # pos: [Hkv, M]
            else:
                pos = candidate_tokens(index, q, n_chunks, chunk, math.ceil(f * cap / chunk), n_sink, n_window)
            valid = pos >= 0                                                   # valid: [Hkv, M]
            ck = keys.gather(1, pos.clamp(min=0)[..., None].expand(-1, -1, d))  # ck: [Hkv, M, D]
            for p in ps:
                idx, ok = select_tokens(q, ck, valid, cap, scale, "sum", base_lse, mass=p, floor=floor)
                kept = torch.where(ok, pos.gather(1, idx), 0)                  # kept: [Hkv, k]
                got = prob.mean(1).gather(1, kept).masked_fill(~ok, 0).sum(1)  # [Hkv]
                row = out.setdefault((f, p), {"count": [], "mass": [], "fixed": []})
                row["count"] += ok.sum(1).tolist()
                row["mass"] += (base_true + got).tolist()
                if fixed_too:       # the shipped stage at this step's mean count: best tokens of the same candidates
                    k = max(1, round(float(ok.sum(1).float().mean())))
                    i2, ok2 = select_tokens(q, ck, valid, k, scale, "sum", base_lse)
                    got2 = prob.mean(1).gather(1, torch.where(ok2, pos.gather(1, i2), 0)).masked_fill(~ok2, 0).sum(1)
                    row["fixed"] += (base_true + got2).tolist()
    return out


def summarise(name, acc, n_tok) -> list[dict]:
    rows = []
    for (f, p), r in sorted(acc.items()):
        m, fx = torch.tensor(r["mass"]), torch.tensor(r["fixed"])
        c = sum(r["count"]) / len(r["count"])
        rows.append({"candidates": name, "factor": f, "p": p, "tokens_per_head": round(c, 1),
                     "budget_pct": round(100 * c / n_tok, 2), "true_mass": round(float(m.mean()), 4),
                     "true_mass_p5": round(float(m.quantile(0.05)), 4), "true_mass_min": round(float(m.min()), 4),
                     "fixed_same_mean": round(float(fx.mean()), 4), "fixed_p5": round(float(fx.quantile(0.05)), 4),
                     "fixed_min": round(float(fx.min()), 4)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", required=True)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--factors", default="4,8")
    ap.add_argument("--ps", default="0.9,0.95")
    ap.add_argument("--cap", default="10%")
    ap.add_argument("--floor", type=int, default=64)
    ap.add_argument("--queries", type=int, default=8, help="decode queries per layer (of those saved)")
    ap.add_argument("--configs", default="summary-max,shadow-r32-mass,oracle")
    ap.add_argument("--out", default="bench/out/token_mass_sim.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    layers = torch.load(args.layers)
    factors = [float(x) for x in args.factors.split(",")]
    ps = [float(x) for x in args.ps.split(",")]
    rows = []
    for name in args.configs.split(","):
        acc: dict = {}
        for li, (keys, queries, *_) in enumerate(layers):
            hkv, n, d = keys.shape
            n -= n % args.chunk
            keys = keys[:, :n].float()                                         # keys: [Hkv, N, D]
            pick = torch.linspace(0, queries.shape[1] - 1, args.queries).round().long()
            qs = queries[:, pick].float()                                      # qs: [Hq, Nq, D]
            cap = parse_count(args.cap, n)
            index = None
            if name != "oracle":
                method, opts = CONFIGS[name]
                index = make_index(method, num_kv_heads=hkv, num_q_heads=qs.shape[0], head_dim=d,
                                   chunk_tokens=args.chunk, **opts)
                index.build(keys)
            got = evaluate_layer(keys, qs, index, args.chunk, [0.0] if index is None else factors, ps, cap,
                                 args.floor)
            for key, r in got.items():
                a = acc.setdefault(key, {"count": [], "mass": [], "fixed": []})
                for k in a:
                    a[k] += r[k]
            print(f"{name} layer {li} done", file=sys.stderr, flush=True)
        rows += summarise(name, acc, n)
    print_table(rows)
    write_results("token_mass_sim", rows, args.out, {"args": vars(args), "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
