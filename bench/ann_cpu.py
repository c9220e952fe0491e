"""The ANN index's build and search on the CPU, split the way a GPU session runs it (issue 13, deliverable 4).

    python bench/ann_cpu.py --tokens 32K,128K --budget 2K --out bench/results/ann_cpu_split.json

One synthetic layer with Llama-3-8B attention shapes (8 KV heads, 32 query heads, D=128, bf16 keys, 32-token
chunks; offload.indexes.synthetic). Per layer:
  kmeans_s   sampled k-means + assignment of every key (kmeans.ivf_lists). On a GPU session this runs on the
             GPU during prefill; here it runs in torch on the CPU, so it is an upper bound of that part.
  file_s     what the background builder does on the host: keys widened to float32, filed into the IVF lists
             (add_core with the pre-assigned lists), chunk means.
  select_ms  one decode select (every KV head, one faiss search_preassigned call), wall and CPU.
  recall     attention mass of the selected chunks / mass of the best chunks of the same count.
Wall times depend on what else the machine runs; CPU seconds are the work. The JSON records the load average.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median, write_results  # noqa: E402

from offload.config import parse_tokens  # noqa: E402
from offload.indexes import chunk_attention_mass, make_index, mass_recall  # noqa: E402
from offload.indexes.synthetic import synthetic_layer  # noqa: E402


def clock():
    return time.perf_counter(), time.process_time()


def since(t) -> tuple[float, float]:
    return time.perf_counter() - t[0], time.process_time() - t[1]


def run(tokens: int, budget_tokens: int, threads: int, queries: int) -> dict:
    keys, decode, _ = synthetic_layer(tokens, 8, 32, 128, num_queries=queries, seed=5)   # keys: [Hkv, N, D]
    keys = keys.bfloat16()
    shape = dict(num_kv_heads=8, num_q_heads=32, head_dim=128, chunk_tokens=32, dtype=torch.bfloat16)
    index = make_index("ann", background=False, threads=threads, **shape)
    t = clock()
    trained = index._train_keys(keys)                  # what build() runs on the GPU when the keys are there
    kmeans_s = since(t)
    index._reset()
    index._num_tokens = tokens
    t = clock()
    index._build_all(keys, None, trained)              # what the background builder does on the host
    file_s = since(t)
    k = budget_tokens // 32 + 2 + 8                    # the runtime asks for budget + sinks + window chunks
    walls, cpus, recalls = [], [], []
    for i in range(decode.shape[1]):
        q = decode[:, i]                                                       # q: [Hq, D]
        index.select(q, k)                                                     # warm
        t = clock()
        ids = index.select(q, k)                                               # ids: [Hkv, k]
        wall, cpu = since(t)
        walls.append(1000 * wall)
        cpus.append(1000 * cpu)
        recalls.append(float(mass_recall(chunk_attention_mass(q, keys.float(), 32), ids).mean()))
    nlist = index._centroids.shape[1]
    return {"tokens": tokens, "nlist_per_head": nlist, "probed_lists": max(1, -(-nlist * 5 // 100)),
            "kmeans_s": round(kmeans_s[0], 3), "kmeans_cpu_s": round(kmeans_s[1], 3),
            "file_s": round(file_s[0], 3), "file_cpu_s": round(file_s[1], 3),
            "select_ms": round(median(walls), 2), "select_cpu_ms": round(median(cpus), 2),
            "recall": round(sum(recalls) / len(recalls), 4), "host_MiB": index.nbytes["host"] / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="32K")
    ap.add_argument("--budget", default="2K")
    ap.add_argument("--threads", type=int, default=0, help="faiss threads (0: all cores)")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--out", default="bench/out/ann_cpu.json")
    args = ap.parse_args()
    rows = []
    for n in args.tokens.split(","):
        rows.append(run(parse_tokens(n), parse_tokens(args.budget), args.threads, args.queries))
        print(rows[-1], flush=True)
    write_results("ann_cpu", rows, args.out, {"torch_threads": torch.get_num_threads(),
                                               "load_average": os.getloadavg()[0], "budget": args.budget})


if __name__ == "__main__":
    main()
