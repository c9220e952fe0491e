"""Chunk selection side by side: recall of attention mass, selection latency, metadata bytes.

    python bench/index_recall.py [--tokens 8K] [--chunk 64] [--budgets 1%,2%,5%,10%] [--configs all]
                                 [--loader pkg.module:function] [--out bench/out/index_recall.json]

Recall = attention mass of the selected chunks / mass of the best chunks of the same count (exact,
per KV head, query group summed); "captured" = selected mass / all mass. Latency = median wall time
of one `select` (one layer, all KV heads), synchronised. Bytes per token = nbytes of one layer's index
/ tokens; "GiB@1M" extrapolates each config, built in bf16 with Llama-3-8B shapes (8 KV heads, 32 query
heads, D=128) at 4K and 8K tokens, extrapolated linearly to 32 layers x 1M tokens.

Keys are pluggable: --loader names a function returning an iterable of (keys [Hkv,N,D],
queries [Hq,Nq,D]) or (keys, queries, build_queries [Hq,Nb,D]) per layer, post-RoPE. The queries are
decode-time queries that attend to all N keys (for real prompts: take keys up to N and the queries
of later positions); build_queries feed query-aware indexes. `evaluate_layers()` is the same thing as
a function for bench/fidelity.py. Default: synthetic topic-segment keys (offload.indexes.synthetic).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median, sync, write_results  # noqa: E402

from offload.config import parse_tokens  # noqa: E402
from offload.indexes import Budget, chunk_attention_mass, make_index, mass_recall  # noqa: E402
from offload.indexes.synthetic import synthetic_layer  # noqa: E402

TWO_LEVEL = {"bounds": "int8", "coarse_group": 4}
CONFIGS = {
    "summary-max": ("summary", {}),
    "summary-sum": ("summary", {"group_reduce": "sum"}),
    "summary-int8": ("summary", {"bounds": "int8"}),
    "summary-2lvl-int8": ("summary", TWO_LEVEL),
    "shadow-r32-max": ("shadow", {"rank": 32, "fine_reduce": "max"}),
    "shadow-r32-mass": ("shadow", {"rank": 32, "fine_reduce": "mass"}),
    "shadow-r16-mass-2lvl-host": ("shadow", {"rank": 16, "fine_reduce": "mass", "coarse": "summary",
                                             "shadows_on": "host", "summary_options": TWO_LEVEL}),
    "ann-l2aug": ("ann", {}),
    "ann-ip-keys": ("ann", {"space": "ip"}),
    "ann-ip-queries": ("ann", {"space": "ip", "train_on": "queries"}),
    "ann-l2aug-sq8": ("ann", {"codec": "sq8"}),
    "ann-exact-flat": ("ann", {"min_ivf_tokens": 1 << 62}),
    "ann-gpu": ("ann", {"search": "gpu"}),                      # list ids scored on the device (ann_gpu.py)
    "ann-gpu-nl512": ("ann", {"search": "gpu", "nlist": 512}),    # finer lists: ~16 keys a list at 8K
    "ann-gpu-nl1024": ("ann", {"search": "gpu", "nlist": 1024}),
}
LLAMA8B = {"layers": 32, "num_kv_heads": 8, "num_q_heads": 32, "head_dim": 128}


def synthetic_loader(tokens: int, layers: int = 1, queries: int = 8):
    """Llama-3-8B head shapes, `layers` independent synthetic layers."""
    return [synthetic_layer(tokens, 8, 32, 128, num_queries=queries, num_prefill_queries=512, seed=s)
            for s in range(layers)]


def load(spec: str):
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn or "load")()


def projected_gib_at_1m(method: str, opts: dict, chunk: int) -> dict:
    """GiB of a bf16 index with 8B shapes at 32 layers x 1M tokens, from builds at 4K and 8K tokens.

    Two sizes separate the per-token part (bounds, shadows, codes) from the fixed part (SVD basis,
    IVF centroids), so the fixed part is not multiplied by the token count.
    """
    sizes = {}
    for tokens in (4096, 8192):
        keys, _, prefill = synthetic_layer(tokens, 8, 32, 128, num_queries=1, num_prefill_queries=512, seed=99)
        index = make_index(method, chunk_tokens=chunk, device="cpu", dtype=torch.bfloat16,
                           **{k: v for k, v in LLAMA8B.items() if k != "layers"}, **opts)
        index.build(keys.bfloat16(), prefill.bfloat16())
        sizes[tokens] = index.nbytes
    out = {}
    for tier in sizes[8192]:
        per_token = (sizes[8192][tier] - sizes[4096][tier]) / 4096
        fixed = max(0.0, sizes[8192][tier] - per_token * 8192)
        out[tier] = LLAMA8B["layers"] * (fixed + per_token * (1 << 20)) / 2**30
    return out


def evaluate_layers(layers, configs: dict, budgets: list[str], chunk: int, device: str,
                    reps: int = 5) -> list[dict]:
    """One row per (config, budget), averaged over layers, queries and KV heads."""
    acc: dict[tuple[str, str], dict] = {}
    for layer in layers:
        keys, queries = layer[0], layer[1]
        build_queries = layer[2] if len(layer) > 2 else queries
        hkv, n_tok, d = keys.shape
        hq = queries.shape[0]
        n_tok -= n_tok % chunk
        keys = keys[:, :n_tok]                                              # keys: [Hkv, N, D]
        masses = [chunk_attention_mass(queries[:, i], keys, chunk) for i in range(queries.shape[1])]
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        for name, (method, opts) in configs.items():
            index = make_index(method, num_kv_heads=hkv, num_q_heads=hq, head_dim=d, chunk_tokens=chunk,
                               device=device, dtype=dtype, **opts)
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            index.build(keys.to(device, dtype), build_queries.to(device, dtype))
            sync()
            call_s = time.perf_counter() - t0           # what the prefill waits for (ANN builds in the background)
            getattr(index, "wait", lambda: None)()
            build_s, build_cpu_s = time.perf_counter() - t0, time.process_time() - c0   # CPU: all threads
            for b in budgets:
                k = Budget.parse(b).chunks(n_tok, chunk)
                row = acc.setdefault((name, b), {"recall": [], "captured": [], "ms": [], "build_s": [],
                                                 "call_s": [], "cpu_s": [], "cpu_ms": [], "bytes": [], "chunks": k})
                for i, mass in enumerate(masses):
                    q = queries[:, i].to(device, dtype)                     # q: [Hq, D]
                    ids = index.select(q, k)
                    for _ in range(reps):
                        sync()
                        t0, c0 = time.perf_counter(), time.process_time()
                        index.select(q, k)
                        sync()
                        row["ms"].append(1000 * (time.perf_counter() - t0))
                        row["cpu_ms"].append(1000 * (time.process_time() - c0))
                    row["recall"] += mass_recall(mass, ids).tolist()
                    got = mass.gather(1, ids.cpu()).sum(1) / mass.sum(1)    # got: [Hkv]
                    row["captured"] += got.tolist()
                row["build_s"].append(build_s)
                row["call_s"].append(call_s)
                row["cpu_s"].append(build_cpu_s)
                row["bytes"].append({t: v / n_tok for t, v in index.nbytes.items()})
    rows = []
    for (name, b), r in acc.items():
        rows.append({"config": name, "budget": b, "chunks": r["chunks"],
                     "recall": sum(r["recall"]) / len(r["recall"]),
                     "captured": sum(r["captured"]) / len(r["captured"]),
                     "select_ms": median(r["ms"]), "build_s": sum(r["build_s"]) / len(r["build_s"]),
                     "build_blocking_s": sum(r["call_s"]) / len(r["call_s"]),
                     "build_cpu_s": sum(r["cpu_s"]) / len(r["cpu_s"]), "select_cpu_ms": median(r["cpu_ms"]),
                     "B/tok gpu": sum(x["gpu"] for x in r["bytes"]) / len(r["bytes"]),
                     "B/tok host": sum(x["host"] for x in r["bytes"]) / len(r["bytes"])})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="8K")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--budgets", default="1%,2%,5%,10%")
    ap.add_argument("--configs", default="all", help="comma list of " + ",".join(CONFIGS))
    ap.add_argument("--layers", type=int, default=1, help="synthetic layers")
    ap.add_argument("--queries", type=int, default=8, help="decode queries per synthetic layer")
    ap.add_argument("--loader", default=None, help="module:function returning layers (see docstring)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-memory", action="store_true", help="skip the bf16 1M-token projection")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch CPU threads (1: stable latencies on a shared machine; faiss: the index's threads)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    configs = CONFIGS if args.configs == "all" else {c: CONFIGS[c] for c in args.configs.split(",")}
    budgets = args.budgets.split(",")
    tokens = parse_tokens(args.tokens)
    layers = load(args.loader) if args.loader else synthetic_loader(tokens, args.layers, args.queries)
    rows = evaluate_layers(layers, configs, budgets, args.chunk, args.device)
    if not args.no_memory:
        mem = {name: projected_gib_at_1m(m, o, args.chunk) for name, (m, o) in configs.items()}
        for row in rows:
            row["GiB@1M gpu"] = mem[row["config"]]["gpu"]
            row["GiB@1M host"] = mem[row["config"]]["host"]
    meta = {"tokens": tokens, "chunk_tokens": args.chunk, "loader": args.loader or "synthetic",
            "torch_threads": torch.get_num_threads(), "faiss_threads": "index option threads (default: all cores)",
            "load_average": os.getloadavg()[0],
            "configs": {k: [m, o] for k, (m, o) in configs.items()}}
    write_results("index_recall", rows, args.out, meta)


if __name__ == "__main__":
    main()
