"""The ANN index's build and decode select, split the way a GPU session runs it (issue 13, deliverable 4).

    python bench/ann_cpu.py --tokens 32K,128K --budget 2K --out bench/results/ann_cpu_split.json
    python bench/ann_cpu.py --tokens 128K --search-threads 1,4,16 --device cuda     # on the GPU host
    python bench/ann_cpu.py --tokens 128K --device cuda --layers 8 --queries 6      # + cold caches, host probe
    git show f5ef176:offload/indexes/ann.py > /tmp/ann_before.py
    python bench/ann_cpu.py --tokens 32K,128K --baseline /tmp/ann_before.py          # before/after, same process

One synthetic layer with Llama-3-8B attention shapes (8 KV heads, 32 query heads, D=128, bf16 keys, 32-token
chunks; offload.indexes.synthetic). Per layer:
  kmeans_s   sampled k-means + assignment of every key (kmeans.ivf_lists), on --device (a GPU session runs it on
             the GPU during prefill; on the CPU it is an upper bound of that part).
  file_s     what the background builder does on the host: keys widened to float32, filed into the IVF lists.
  select     one decode select (every KV head), wall and CPU ms, median over the decode queries; the query lives
             on --device, so on a GPU host the copies both ways are in it (the device is synchronised first).
  phases     the same select's steps timed apart (wall ms, minimum): to_host (query to the host), probe (coarse
             matmul + partition), faiss (search_preassigned), votes (scores per chunk), top_k (best_first),
             to_device (ids back). With --device cuda, select's GPU path: probe = the GPU probe + its copies to the
             host (to_host 0), votes = the retrieved tokens' upload + votes + ranking on the GPU (top_k, to_device 0).
  recall     attention mass of the selected chunks / mass of the best chunks of the same count.
  host_probe (--device cuda) select as before the probe moved to the GPU (select_on_host), same index, same ids.
  rotating   (--layers N) one select in each of N copies of the layer index in turn, per query, as a decode step
             visits its layers: the per-layer figure with cold host caches (select_ms repeats one warm query).
Wall times depend on what else the machine runs; CPU ms are the work. The JSON records the load average.
"""
from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median, write_results  # noqa: E402

from offload.config import parse_tokens  # noqa: E402
from offload.indexes import chunk_attention_mass, make_index, mass_recall  # noqa: E402
from offload.indexes.ann_search import best_first  # noqa: E402
from offload.indexes.synthetic import synthetic_layer  # noqa: E402

REPS = [3]             # timed calls per query (--reps)
SHAPE = dict(num_kv_heads=8, num_q_heads=32, head_dim=128, chunk_tokens=32, dtype=torch.bfloat16)


def clock():
    return time.perf_counter(), time.process_time()


def since(t) -> tuple[float, float]:
    return time.perf_counter() - t[0], time.process_time() - t[1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def built(cls, keys: torch.Tensor, trained, threads: int, device: torch.device, **options):
    """An index of class cls over keys [Hkv, N, D] (host), filed from the given lists (no background thread)."""
    index = cls(device=device, background=False, threads=threads, **SHAPE, **options)
    index._reset()
    index._num_tokens = keys.shape[1]
    index._build_all(keys, None, trained)
    return index


def select_on_host(index, query: torch.Tensor, k: int) -> torch.Tensor:
    """select as it ran before the coarse step moved to the query's GPU: the query to the host (a pageable copy),
    the numpy probe, faiss, votes, best_first, the ids back by a pageable copy. The same ids as index.select."""
    ip, tok = index._search(index._host_query(query), index._tokens_for(k))
    return torch.from_numpy(best_first(index._chunk_votes(ip, tok), k)).to(query.device)


def time_select(index, queries: torch.Tensor, k: int, device: torch.device, fn=None) -> tuple[float, ...]:
    """(median wall, median CPU, min wall) ms of index.select (or fn(index, q, k)) over queries [Hq, m, D] (on
    device), each query --reps times after a warm call: the probed lists are then in the host's caches, which a
    decode step, visiting 32 layers' indexes in turn, does not find (see time_rotating). On a shared box the
    minimum is the figure least inflated by other jobs."""
    fn = fn or (lambda index, q, k: index.select(q, k))
    walls, cpus = [], []
    for i in range(queries.shape[1]):
        fn(index, queries[:, i], k)
        for _ in range(REPS[0]):
            sync(device)
            t = clock()
            fn(index, queries[:, i], k)
            sync(device)
            wall, cpu = since(t)
            walls.append(1000 * wall)
            cpus.append(1000 * cpu)
    return round(median(walls), 3), round(median(cpus), 3), round(min(walls), 3)


def time_rotating(layers: list, queries: torch.Tensor, k: int, device: torch.device, fn=None) -> tuple[float, ...]:
    """(median wall, median CPU, min wall) ms per layer of one select in each of the layer indexes in turn, per
    query, as a decode step runs them: a layer's lists were last read len(layers) - 1 selects ago (cold caches
    once the layers' probed bytes exceed the last-level cache). The first query only warms up (first-call costs)."""
    fn = fn or (lambda index, q, k: index.select(q, k))
    walls, cpus = [], []
    for i in range(queries.shape[1]):
        sync(device)
        t = clock()
        for index in layers:
            fn(index, queries[:, i], k)
        sync(device)
        wall, cpu = since(t)
        if i:
            walls.append(1000 * wall / len(layers))
            cpus.append(1000 * cpu / len(layers))
    return round(median(walls), 3), round(median(cpus), 3), round(min(walls), 3)


def phases(index, queries: torch.Tensor, k: int, device: torch.device) -> dict:
    """select's steps timed apart (wall ms, the minimum over queries x reps: on a shared box the figure least
    inflated by other jobs); their sum is one select without its checks."""
    out = {name: [] for name in ("to_host", "probe", "faiss", "votes", "top_k", "to_device")}
    k_tok = index._tokens_for(k)
    for i in [i for i in range(queries.shape[1]) for _ in range(REPS[0])]:
        sync(device)
        t = [time.perf_counter()]
        if device.type == "cuda":    # what select runs: the probe on the GPU; its copies to the host are in probe
            t.append(t[0])
            q_np, lists, dis = index._probe_on_device(queries[:, i])
        else:
            q_np = index._host_query(queries[:, i])
            t.append(time.perf_counter())
            lists, dis = index._probe(q_np)
        t.append(time.perf_counter())
        ip, tok = index._scan(q_np, lists, dis, k_tok)
        t.append(time.perf_counter())
        if device.type == "cuda":    # what select runs: votes and ranking on the GPU (all in votes, synchronised)
            index._rank_torch(*index._upload(ip=ip, tok=tok), k)
            sync(device)
            t += [time.perf_counter()] * 3
        else:
            score = index._chunk_votes(ip, tok)
            t.append(time.perf_counter())
            ids = best_first(score, k)
            t.append(time.perf_counter())
            index._upload(ids=ids)
            t.append(time.perf_counter())
        for name, a, b in zip(out, t, t[1:]):
            out[name].append(1000 * (b - a))
    return {name: round(min(v), 3) for name, v in out.items()}


def profile(index, queries: torch.Tensor, k: int, rows: int = 12) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for i in range(queries.shape[1]):
        index.select(queries[:, i], k)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(rows)
    return text.getvalue()


def load_baseline(path: str):
    """FaissANNIndex from an older copy of offload/indexes/ann.py (its imports resolve to this checkout)."""
    spec = importlib.util.spec_from_file_location("ann_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FaissANNIndex


def run(tokens: int, budget_tokens: int, args, device: torch.device) -> dict:
    keys, decode, _ = synthetic_layer(tokens, 8, 32, 128, num_queries=args.queries, seed=5)   # keys: [Hkv, N, D]
    keys = keys.bfloat16()
    queries = decode.bfloat16().to(device)                                    # queries: [Hq, m, D]
    from offload.indexes.ann import FaissANNIndex
    index = make_index("ann", background=False, threads=args.threads, **SHAPE)
    sync(device)
    t = clock()
    trained = index._train_keys(keys.to(device))       # what build() runs on the GPU when the keys are there
    sync(device)
    kmeans_s = since(t)
    t = clock()
    index = built(FaissANNIndex, keys, trained, args.threads, device, codec=args.codec)  # the background builder's part
    file_s = since(t)
    k = budget_tokens // 32 + 2 + 8                    # the runtime asks for budget + sinks + window chunks
    row = {"tokens": tokens, "nlist_per_head": index._centroids.shape[1],
           "probed_lists": index._probe(index._host_query(queries[:, 0]))[0].shape[1],
           "retrieved_per_query_head": index._tokens_for(k),
           "kmeans_s": round(kmeans_s[0], 3), "kmeans_cpu_s": round(kmeans_s[1], 3),
           "file_s": round(file_s[0], 3), "file_cpu_s": round(file_s[1], 3)}
    row["select_ms"], row["select_cpu_ms"], row["select_min_ms"] = time_select(index, queries, k, device)
    row["phases_ms"] = phases(index, queries, k, device)
    if device.type == "cuda":    # the same index, the probe on the host as before (the same ids, checked)
        row["host_probe_select_ms"], row["host_probe_select_cpu_ms"], row["host_probe_select_min_ms"] = \
            time_select(index, queries, k, device, select_on_host)
        same = [bool(torch.equal(select_on_host(index, queries[:, i], k), index.select(queries[:, i], k)))
                for i in range(queries.shape[1])]
        row["host_probe_same_ids"] = f"{sum(same)}/{len(same)}"
    if args.layers > 1:          # a decode step's access pattern: each of --layers indexes once per query
        layers = [index] + [built(FaissANNIndex, keys, trained, args.threads, device, codec=args.codec)
                            for _ in range(args.layers - 1)]
        row["rotating_layers"] = args.layers
        row["rotating_select_ms"], row["rotating_select_cpu_ms"], row["rotating_select_min_ms"] = \
            time_rotating(layers, queries, k, device)
        if device.type == "cuda":
            row["rotating_host_probe_select_ms"], _, row["rotating_host_probe_select_min_ms"] = \
                time_rotating(layers, queries, k, device, select_on_host)
        del layers
    recalls = [float(mass_recall(chunk_attention_mass(decode[:, i], keys.float(), 32),
                                 index.select(queries[:, i], k).cpu()).mean()) for i in range(decode.shape[1])]
    row["recall"] = round(sum(recalls) / len(recalls), 4)
    row["by_search_threads"] = {}
    for threads in args.search_threads:
        index.search_threads = threads
        row["by_search_threads"][threads] = time_select(index, queries, k, device)
    index.search_threads = index.threads
    row["by_retrieve_factor"], default = {}, index.retrieve_factor
    for factor in args.retrieve_factors:    # fewer retrieved tokens per query head: a smaller heap in faiss
        index.retrieve_factor = factor
        wall, cpu, _ = time_select(index, queries, k, device)
        got = [float(mass_recall(chunk_attention_mass(decode[:, i], keys.float(), 32),
                                 index.select(queries[:, i], k).cpu()).mean()) for i in range(decode.shape[1])]
        row["by_retrieve_factor"][factor] = {"select_ms": wall, "select_cpu_ms": cpu, "faiss_ms":
                                             phases(index, queries, k, device)["faiss"],
                                             "recall": round(sum(got) / len(got), 4)}
    index.retrieve_factor = default
    if args.baseline:
        before = built(load_baseline(args.baseline), keys, trained, args.threads, device)
        after = (row["select_ms"], row["select_cpu_ms"], row["select_min_ms"])
        row["baseline_select_ms"], row["baseline_select_cpu_ms"], row["baseline_select_min_ms"] = \
            time_select(before, queries, k, device)
        row["select_ms"], row["select_cpu_ms"], row["select_min_ms"] = time_select(index, queries, k, device)
        row["select_ms_first_pass"] = after
        same = [bool(torch.equal(before.select(queries[:, i], k).cpu(), index.select(queries[:, i], k).cpu()))
                for i in range(decode.shape[1])]
        row["baseline_same_ids"] = f"{sum(same)}/{len(same)}"
    if args.profile:
        print(profile(index, queries, k), file=sys.stderr)
    row["host_MiB"] = round(index.nbytes["host"] / 2**20, 1)
    return row


def thp() -> str:
    """The kernel's transparent huge page mode: a cold select's page walks over GBs of lists depend on it."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="32K")
    ap.add_argument("--budget", default="2K")
    ap.add_argument("--threads", type=int, default=0, help="faiss threads (0: all cores)")
    ap.add_argument("--search-threads", default="", help="comma list: also time select with these faiss threads")
    ap.add_argument("--retrieve-factors", default="", help="comma list: also time select + recall at these "
                    "retrieve_factor values (default 0.25)")
    ap.add_argument("--layers", type=int, default=1, help="also time selects rotating over this many copies of the "
                    "layer index, as a decode step visits its layers (cold host caches; ~0.55 GB of host RAM each at 128K)")
    ap.add_argument("--codec", default="flat", choices=("flat", "sq8"), help="the IVF lists' codes (sq8: a quarter of "
                    "the bytes a cold select reads, lossy: see recall)")
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="timed selects per query (min and median over all)")
    ap.add_argument("--device", default="cpu", help="where the keys are trained and the queries live (cuda: GPU)")
    ap.add_argument("--baseline", default="", help="an older offload/indexes/ann.py to time in the same process")
    ap.add_argument("--profile", action="store_true", help="cProfile of the selects, to stderr")
    ap.add_argument("--out", default="bench/out/ann_cpu.json")
    args = ap.parse_args()
    args.search_threads = [int(t) for t in args.search_threads.split(",") if t]
    REPS[0] = max(1, args.reps)
    args.retrieve_factors = [float(f) for f in args.retrieve_factors.split(",") if f]
    device = torch.device(args.device)
    rows = []
    print("tokens  select wall ms (cpu, min wall)  to_host probe faiss votes top_k to_device  recall", file=sys.stderr)
    for n in args.tokens.split(","):
        rows.append(run(parse_tokens(n), parse_tokens(args.budget), args, device))
        r, p = rows[-1], rows[-1]["phases_ms"]
        base = (f"  before {r['baseline_select_ms']} ({r['baseline_select_cpu_ms']}, min {r['baseline_select_min_ms']})"
                if args.baseline else "")
        print(f"{r['tokens']:>6}  {r['select_ms']:7.2f} ({r['select_cpu_ms']:6.2f}, min {r['select_min_ms']:.2f})  " +
              " ".join(f"{p[name]:.2f}" for name in p) + f"  {r['recall']}{base}", file=sys.stderr)
        if "host_probe_select_ms" in r:
            print(f"        probe on the host (before): {r['host_probe_select_ms']} ms (min {r['host_probe_select_min_ms']}),"
                  f" same ids {r['host_probe_same_ids']}", file=sys.stderr)
        if "rotating_select_ms" in r:
            print(f"        rotating over {r['rotating_layers']} layers: {r['rotating_select_ms']} ms per layer (cpu "
                  f"{r['rotating_select_cpu_ms']}, min {r['rotating_select_min_ms']})"
                  + (f"; probe on the host {r['rotating_host_probe_select_ms']}" if "rotating_host_probe_select_ms" in r
                     else ""), file=sys.stderr)
        print(f"        by search threads {r['by_search_threads']}  by retrieve_factor {r['by_retrieve_factor']}",
              file=sys.stderr, flush=True)
    import faiss
    write_results("ann_cpu", rows, args.out, {"torch_threads": torch.get_num_threads(), "cores": os.cpu_count(),
                                               "faiss_threads": faiss.omp_get_max_threads(),
                                               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
                                               "load_average": os.getloadavg()[0], "budget": args.budget,
                                               "reps": REPS[0], "device": str(device),
                                               "codec": args.codec, "transparent_hugepages": thp()})


if __name__ == "__main__":
    main()
