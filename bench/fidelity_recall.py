"""Selection quality on SmolLM2's real keys and decode queries, the way the sparse backend selects.

The backend always attends to the sink chunks and the local-window chunks and asks the index for
budget + fixed ids, keeping the first `budget` that are neither (offload/engine/tiered.py). So:

    recall      mass of the index's top `budget` chunks / mass of the best `budget` chunks, over all
                chunks (the definition of bench/index_recall.py's evaluate_layers)
    recall_rt   same, over the chunks the backend selects from (sinks and window excluded), with the
                backend's filtering of the index's answer
    captured    attention mass the step really sees: sinks + window + selection, / all mass
    oracle      captured with the best possible selection (the ceiling of the chunk size)
    select_ms   median wall time of one select (one layer, all KV heads); x layers = per decode step
    B/tok       index.nbytes of all layers / context tokens (gpu = compute-device tier, host)

    token_oracle  captured with the best selection of budget x C single tokens (the ceiling of any
                token-level selection)

Token stage (config "X+tokFsum"): X proposes F x budget candidate chunks, select_tokens keeps the budget's
number of tokens (offload/kernels/tokens.py, as the backend with select_unit="token"); recall_rt is then the
picked tokens' mass / the best tokens' mass (sinks and window excluded), select_ms = select + token ranking.

Masses are exact (float64 softmax over all context keys, query group summed per KV head).
"""
from __future__ import annotations

import math
import time

import torch

from fidelity_sessions import ALL_CONFIGS as CONFIGS
from offload.indexes import Budget, chunk_attention_mass, make_index
from offload.kernels.tokens import select_tokens


def _fixed_mask(n: int, n_sink: int, n_window: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)                       # mask: [n]
    mask[:n_sink] = True
    mask[max(0, n - n_window):] = True
    return mask


def runtime_pick(row: torch.Tensor, fixed: torch.Tensor, budget: int) -> torch.Tensor:
    """The backend's filter: ids row [Hkv, M] best first -> first `budget` non-fixed ids, -1 padded."""
    keep = ~fixed[row]                                            # keep: [Hkv, M]
    keep &= torch.cumsum(keep.int(), dim=1) <= budget
    return torch.where(keep, row, torch.full_like(row, -1))      # [Hkv, M]


def _masked_sum(mass: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum of mass [Hkv, n] over ids [Hkv, M] ignoring -1 -> [Hkv]."""
    got = mass.gather(1, ids.clamp(min=0))                        # got: [Hkv, M]
    return torch.where(ids >= 0, got, torch.zeros_like(got)).sum(1)


def evaluate_runtime(layers, config_names: list[str], budgets: list[str], chunks: list[int],
                     sink_tokens: int, window_tokens: int, progress=print, token_stages=()) -> list[dict]:
    """layers: list of (keys [Hkv, N, D], decode queries [Hq, Nq, D], build queries [Hq, Nb, D]).

    One row per (config, chunk, budget), averaged over layers, queries and KV heads; token_stages:
    (factor, reduce) pairs, each adding a row per config named "config+tok{factor}{reduce}".
    """
    acc: dict[tuple, dict] = {}
    for li, (keys_all, queries, build_q) in enumerate(layers):
        hkv, _, d = keys_all.shape
        hq = queries.shape[0]
        for chunk in chunks:
            n_tok = keys_all.shape[1] - keys_all.shape[1] % chunk
            keys = keys_all[:, :n_tok].float()                    # keys: [Hkv, N, D]
            n = n_tok // chunk
            fixed = _fixed_mask(n, math.ceil(sink_tokens / chunk), math.ceil(window_tokens / chunk))
            masses = [chunk_attention_mass(queries[:, i].float(), keys, chunk) for i in range(queries.shape[1])]
            toks = [_token_truth(queries[:, i].float(), keys, chunk, fixed) for i in range(queries.shape[1])]
            for name in config_names:
                method, opts = CONFIGS[name]
                index = make_index(method, num_kv_heads=hkv, num_q_heads=hq, head_dim=d, chunk_tokens=chunk,
                                   device="cpu", dtype=torch.float32, **opts)
                t0 = time.perf_counter()
                index.build(keys, build_q.float())
                build_s = time.perf_counter() - t0
                nbytes = index.nbytes
                for b in budgets:
                    k = Budget.parse(b).chunks(n_tok, chunk)
                    for stage in [None, *token_stages]:
                        key = name if stage is None else f"{name}+tok{stage[0]:g}{stage[1]}"
                        row = acc.setdefault((key, chunk, b), {
                            "recall": [], "recall_rt": [], "captured": [], "oracle": [], "token_oracle": [],
                            "ms": [], "build_s": 0.0, "gpu": 0, "host": 0, "chunks": k, "tokens": n_tok, "layers": {}})
                        mark = {m: len(row[m]) for m in ("recall_rt", "captured", "oracle", "token_oracle")}
                        for i, mass in enumerate(masses):
                            q = queries[:, i].float()             # q: [Hq, D]
                            if stage is None:
                                t0 = time.perf_counter()
                                ids = index.select(q, k + int(fixed.sum()))   # ids: [Hkv, M] as the backend asks
                                row["ms"].append(1000 * (time.perf_counter() - t0))
                                _score(row, mass, ids, fixed, k)
                                row["token_oracle"] += toks[i]["oracle"](k * chunk)
                            else:
                                _score_tokens(row, q, keys, index, toks[i], mass, fixed, k, chunk, *stage)
                        row["layers"][li] = {m: _mean(row[m][mark[m]:]) for m in mark}
                        row["build_s"] += build_s
                        row["gpu"] += nbytes["gpu"]
                        row["host"] += nbytes["host"]
        progress(f"  recall: layer {li + 1}/{len(layers)} done")
    return [_finish(key, r, len(layers)) for key, r in acc.items()]


def _score(row: dict, mass: torch.Tensor, ids: torch.Tensor, fixed: torch.Tensor, k: int) -> None:
    """mass [Hkv, n] of one query; ids [Hkv, M] the index's answer to budget + fixed."""
    total = mass.sum(1)                                           # total: [Hkv]
    top = ids[:, :k]                                              # top: [Hkv, k]
    best = torch.topk(mass, min(k, mass.shape[1]), dim=1).values.sum(1)
    row["recall"] += (_masked_sum(mass, top) / best).tolist()
    free = mass.masked_fill(fixed[None, :], 0.0)                  # free: [Hkv, n] mass outside sinks/window
    kk = min(k, int((~fixed).sum()))
    best_free = torch.topk(free, kk, dim=1).values.sum(1) if kk else torch.zeros_like(total)
    got_free = _masked_sum(mass, runtime_pick(ids, fixed, k))     # got_free: [Hkv]
    fixed_mass = mass[:, fixed].sum(1)                            # fixed_mass: [Hkv]
    row["recall_rt"] += torch.where(best_free > 0, got_free / best_free, torch.ones_like(total)).tolist()
    row["captured"] += ((fixed_mass + got_free) / total).tolist()
    row["oracle"] += ((fixed_mass + best_free) / total).tolist()


def _token_truth(q: torch.Tensor, keys: torch.Tensor, chunk: int, fixed: torch.Tensor) -> dict:
    """Exact per-token mass of one query [Hq, D] over keys [Hkv, N, D]: group-summed token mass [Hkv, N],
    the log-sum-exp of the sinks + window per query head [Hq] (what the backend passes as base_lse), and
    the token oracle (mass of sinks + window + the best m other tokens, / all, averaged over KV heads)."""
    hq, d = q.shape
    hkv, n_tok, _ = keys.shape
    qg = q.double().reshape(hkv, hq // hkv, d)                                  # qg: [Hkv, G, D]
    s = torch.einsum("hgd,hnd->hgn", qg, keys.double()) / math.sqrt(d)         # s: [Hkv, G, N]
    tok_fixed = fixed.repeat_interleave(chunk)                                  # tok_fixed: [N]
    base = torch.logsumexp(s[..., tok_fixed], dim=-1).reshape(hq)              # base: [Hq]
    tm = torch.softmax(s, dim=-1).sum(dim=1)                                   # tm: [Hkv, N]
    total, fixed_mass = tm.sum(1), tm[:, tok_fixed].sum(1)                      # [Hkv] each
    free = tm.masked_fill(tok_fixed[None, :], 0.0)                              # free: [Hkv, N]

    def oracle(m: int) -> list[float]:
        best = torch.topk(free, min(m, int((~tok_fixed).sum())), dim=1).values.sum(1)  # best: [Hkv]
        return ((fixed_mass + best) / total).tolist()
    return {"mass": tm, "base": base, "total": total, "fixed": fixed_mass, "free": free, "oracle": oracle}


def _score_tokens(row: dict, q, keys, index, truth: dict, mass, fixed, k: int, chunk: int, factor: float,
                  reduce: str) -> None:
    """The backend's token stage on one query: candidates from the index, top k*chunk tokens by select_tokens."""
    hkv, n_tok, d = keys.shape
    want = min(int((~fixed).sum()), math.ceil(k * factor))
    t0 = time.perf_counter()
    ids = index.select(q, want + int(fixed.sum()))                              # ids: [Hkv, W + fixed]
    cand = runtime_pick(ids, fixed, want)                                       # cand: [Hkv, W + fixed], -1 pad
    tok = (cand.clamp(min=0)[..., None] * chunk + torch.arange(chunk)).flatten(1)  # tok: [Hkv, M]
    valid = (cand >= 0).repeat_interleave(chunk, dim=1)                         # valid: [Hkv, M]
    ck = keys.gather(1, tok[..., None].expand(-1, -1, d))                       # ck: [Hkv, M, D]
    idx, ok = select_tokens(q, ck, valid, k * chunk, d ** -0.5, reduce, truth["base"].float())  # [Hkv, k*C]
    row["ms"].append(1000 * (time.perf_counter() - t0))
    picked = tok.gather(1, idx)                                                 # picked: [Hkv, k*C]
    got = torch.where(ok, truth["mass"].gather(1, picked), torch.zeros((), dtype=torch.float64)).sum(1)  # [Hkv]
    best = torch.topk(truth["free"], min(k * chunk, int((~fixed).sum()) * chunk), dim=1).values.sum(1)
    row["recall_rt"] += torch.where(best > 0, got / best, torch.ones_like(got)).tolist()
    row["captured"] += ((truth["fixed"] + got) / truth["total"]).tolist()
    free = mass.masked_fill(fixed[None, :], 0.0)                                # free: [Hkv, n] chunk masses
    best_chunks = torch.topk(free, min(k, int((~fixed).sum())), dim=1).values.sum(1)  # [Hkv]
    row["oracle"] += ((mass[:, fixed].sum(1) + best_chunks) / mass.sum(1)).tolist()
    row["token_oracle"] += truth["oracle"](k * chunk)


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def _finish(key: tuple, r: dict, num_layers: int) -> dict:
    name, chunk, budget = key
    mean = _mean
    ms = sorted(r["ms"])
    return {"config": name, "chunk": chunk, "budget": budget, "chunks": r["chunks"],
            "recall": mean(r["recall"]) if r["recall"] else None, "recall_rt": mean(r["recall_rt"]),
            "captured": mean(r["captured"]), "oracle": mean(r["oracle"]), "token_oracle": mean(r["token_oracle"]),
            "select_ms": ms[len(ms) // 2],
            "select_ms_step": ms[len(ms) // 2] * num_layers, "build_s_layer": r["build_s"] / num_layers,
            "B/tok gpu": r["gpu"] / r["tokens"], "B/tok host": r["host"] / r["tokens"],
            "per_layer": {m: [r["layers"][li][m] for li in sorted(r["layers"])]
                          for m in ("recall_rt", "captured", "oracle", "token_oracle")}}
