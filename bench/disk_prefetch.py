"""Does reading a layer's drive chunks a step ahead pay on a real model? (issue 12, deliverable 6)

    python bench/disk_prefetch.py [--model smollm2|tiny] [--ctx 8K] [--steps 64] [--budget 512]
        [--modes always,adaptive,off] [--kv-dtype bf16] [--gpu-mem 16MiB] [--host-mem 256KiB]
        [--out bench/out/disk_prefetch.json]

SmolLM2-135M (the cached GGUF) on the CPU: ctx - steps tokens of CPython's pydoc text prefilled, then `steps`
decode steps teacher-forced on the text that follows (ctx tokens in all), sparse attention (chunk selection,
`budget` tokens), the host tier small so most chunks sit on the drive (a tmp dir). Per prefetch mode
(offload.tiers.prefetch): prefetch hit / miss / unused chunks, drive bytes per token, ms per token; and, from
the chunk ids each layer attends, the overlap of consecutive steps' selections (fraction of step t's
index-selected chunks, sinks and window excluded, also selected at t-1), per KV head and for the union over
heads (what a chunk read serves). Logits of every mode are compared with mode "off" (they must be equal:
prefetching never changes what is attended).
Writes JSON and prints two tables (modes; per-layer overlap of the first mode).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boundary import TINY, _tiny_checkpoint  # noqa: E402
from common import print_table, write_results  # noqa: E402
from fidelity_data import haystack_ids, teacher_text_ids  # noqa: E402


class SelectionLog:
    """Records the chunk ids [Hkv, K] every layer attends each step (wraps kernels.plan_slots as the store calls it)."""

    def __init__(self, store):
        from offload.tiers import decode
        self.store, self.steps = store, []       # steps: [{layer: ids [Hkv, K] cpu}]
        self._mod, self._real = decode.kernels, decode.kernels.plan_slots
        self._layer = None
        real_plan = store.plan

        def plan(layer, sel):
            self._layer = layer
            return real_plan(layer, sel)
        store.plan = plan

        def plan_slots(sel, table, merged=False, with_ids=False):
            lists = self._real(sel, table, merged, True)
            if self._layer == 0 or not self.steps:
                self.steps.append({})
            self.steps[-1][self._layer] = lists.ids.cpu()
            return lists if with_ids else dataclasses.replace(lists, ids=None)
        self._mod.plan_slots = plan_slots

    def close(self) -> None:
        self._mod.plan_slots = self._real

    def overlap(self, sink: int, window: int) -> list[dict]:
        """Per layer: mean over steps t >= 1 of |S_t & S_t-1| / |S_t|, per head and for the union over heads."""
        rows = []
        for layer in sorted(self.steps[0]):
            head, union = [], []
            for prev, cur in zip(self.steps, self.steps[1:]):
                a, b = prev[layer], cur[layer]                              # [Hkv, K] each
                n = int(self.store._num[layer])
                keep = lambda x: x[(x >= sink) & (x < n - window)]          # noqa: E731  index-selected chunks
                for h in range(b.shape[0]):
                    s, p = keep(b[h]).unique(), keep(a[h]).unique()
                    if s.numel():
                        head.append(float(torch.isin(s, p).float().mean()))
                s, p = keep(b).unique(), keep(a).unique()
                if s.numel():
                    union.append(float(torch.isin(s, p).float().mean()))
            rows.append({"layer": layer, "overlap_per_head": round(sum(head) / max(1, len(head)), 3),
                         "overlap_union": round(sum(union) / max(1, len(union)), 3)})
        return rows


def _used(store) -> int:
    """Bytes of the drive selections attended so far: one KV head's part of a stored chunk each."""
    return store.decode_counts().get("disk", 0) * (store.cold_shape.nbytes // store.shape.num_kv_heads)


def run_mode(llm, ids: list[int], ctx: int, mode: str, record: bool):
    sess = llm.session()
    store = sess.attn.store
    try:
        from offload.tiers.prefetch import PrefetchRule
        store.prefetch_rule = PrefetchRule(store.num_layers, mode)
    except ImportError:                  # a tree before the rule (the scheme "always"), for a before/after figure
        mode = "before"
    log = None
    with torch.inference_mode():
        sess.prefill(ids[:ctx])
        log = SelectionLog(store) if record else None
        d0, u0 = store.stats().get("disk2h_bytes", 0), _used(store)
        logits, times = [], []
        try:
            for t in ids[ctx:]:
                t0 = time.perf_counter()
                logits.append(sess.step(t).float().cpu())
                times.append(1000 * (time.perf_counter() - t0))
        finally:
            if log is not None:
                log.close()
    st = sess.stats()
    n = len(times)
    row = {"mode": mode, "steps": n, "ms_median": round(sorted(times)[n // 2], 1),
           "hit_rate_disk": st.get("hit_rate_disk"), "disk_read_bytes_per_token": (st.get("disk2h_bytes", 0) - d0) // n,
           **{k: st.get(k, 0) for k in ("prefetch_hit_chunks", "prefetch_miss_chunks", "prefetch_unused_chunks",
                                        "prefetch_layers", "prefetch_skipped_layers", "promoted_chunks")}}
    # drive bytes read per byte attended from the drive: whole chunks are read, each selection uses one head's part
    row["read_per_used"] = round((st.get("disk2h_bytes", 0) - d0) / max(1, _used(store) - u0), 2)
    hit, pre = row["prefetch_hit_chunks"], row["prefetch_hit_chunks"] + row["prefetch_unused_chunks"]
    row["prefetch_precision"] = round(hit / pre, 3) if pre else None
    overlap = None
    if log is not None:
        cfg = llm.config
        overlap = log.overlap(cfg.sink_tokens // cfg.chunk_tokens, cfg.window_tokens // cfg.chunk_tokens)
    sess.close()
    return row, torch.stack(logits), overlap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (real weights), or tiny: bench/boundary.py's 32-layer "
                    "random model on random token ids (consecutive queries nearly independent, as with dummy weights)")
    ap.add_argument("--ctx", default="8K")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--budget", default="512")
    ap.add_argument("--chunk-tokens", type=int, default=32)
    ap.add_argument("--kv-dtype", default="bf16")
    ap.add_argument("--gpu-mem", default="16MiB", help="the device tier (sinks + windows + a little)")
    ap.add_argument("--host-mem", default="256KiB", help="small: most chunks sit on the drive")
    ap.add_argument("--modes", default="always,adaptive,off")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/out/disk_prefetch.json")
    args = ap.parse_args()
    from offload import LLM
    from offload.config import parse_tokens
    torch.set_num_threads(args.threads)
    ctx = parse_tokens(args.ctx) - args.steps       # prefilled; the steps fill the rest
    with tempfile.TemporaryDirectory(prefix="disk_prefetch_") as kv:
        model = "smollm2-135m" if args.model == "smollm2" else _tiny_checkpoint(Path(kv))
        llm = LLM(model, device="cpu", ctx=ctx + args.steps, attention="sparse", budget=args.budget,
                  chunk_tokens=args.chunk_tokens, kv_dtype=args.kv_dtype, gpu_mem=args.gpu_mem,
                  host_mem=args.host_mem, disk_dir=kv, show_progress=False)
        print(llm.plan.summary(), file=sys.stderr, flush=True)
        if args.model == "smollm2":
            ids = teacher_text_ids(llm.tokenizer, haystack_ids(llm.tokenizer), ctx, args.steps)
        else:
            ids = torch.randint(0, TINY["vocab_size"], (ctx + args.steps,), generator=torch.Generator().manual_seed(0))
            ids = ids.tolist()
        rows, logits, overlap = [], {}, None
        for i, mode in enumerate(args.modes.split(",")):
            row, logits[mode], ov = run_mode(llm, ids, ctx, mode, record=i == 0)
            row["mode"] = mode if row["mode"] == mode else f"{mode} ({row['mode']})"
            overlap = overlap or ov
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        ref = "off" if "off" in logits else next(iter(logits))
        for row in rows:       # prefetching never changes what is attended: the logits must be equal
            row["logits_equal_" + ref] = bool(torch.equal(logits[row["mode"].split()[0]], logits[ref]))
        plan = llm.plan.summary()
        llm.close()
    # every mode's logits against the reference mode's ("off" when run)
    meta = {"model": "SmolLM2-135M (GGUF)" if args.model == "smollm2" else "tiny random 32-layer (boundary.py)",
            "prefilled": ctx, "steps": args.steps, "budget": args.budget, "chunk_tokens": args.chunk_tokens,
            "kv_dtype": args.kv_dtype, "plan": plan, "command": "python " + " ".join(sys.argv),
            "overlap_per_layer": overlap,
            "overlap_mean": {k: round(sum(r[k] for r in overlap) / len(overlap), 3)
                             for k in ("overlap_per_head", "overlap_union")} if overlap else None}
    write_results("disk_prefetch", rows, args.out, meta)
    if overlap:
        print_table(overlap)
        print(json.dumps(meta["overlap_mean"]))


if __name__ == "__main__":
    main()
