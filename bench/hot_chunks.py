"""Hot chunks up to the GPU pool (issue 13, deliverable 2; offload/tiers/hot.py): how much of what sparse decode
selects is read from the GPU pool, with and without promotion, on real attention (SmolLM2-135M, natural text).

    python bench/hot_chunks.py [--context 8K] [--continuation 256] [--gpu-share 0.2] [--policies lru,attention]
        [--configs chunk,token] [--device cpu] [--out bench/out/hot_chunks.json]

One prefill of --context tokens of CPython's docs (exact), then --continuation tokens of the same text teacher-forced
through forks of that session (same KV; a GPU tier of --gpu-share of the context's KV, the rest on the host), one
per (config, policy, promotion on/off). Per row: the share of selected chunks read from the GPU pool (chunk mode:
attended whole; token stage: candidates, whose keys cross PCIe to be scored), the host bytes per token that saves,
chunks promoted, and top-1 agreement with the run without promotion (promotion moves bytes, not values).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, print_table  # noqa: E402
from fidelity_data import haystack_ids  # noqa: E402

CONFIGS = {    # the default's 5% form and the accurate token-mass row of the fidelity tables
    "chunk": dict(index="summary", budget="5%"),
    "token": dict(index="summary", budget="10%", select_unit="token", token_candidates=8, token_mass=0.97,
                  token_floor=64),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--context", default="8K")
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--gpu-share", type=float, default=0.2, help="the GPU tier as a share of the context's KV")
    ap.add_argument("--policies", default="lru,attention")
    ap.add_argument("--configs", default="chunk,token")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/out/hot_chunks.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from offload import LLM
    from offload.config import parse_tokens
    n_ctx = parse_tokens(args.context, "--context")
    ctx = n_ctx + args.continuation + 64
    full = LLM(args.model, device=args.device, ctx=ctx, attention="full", show_progress=False)   # the prefill
    mc = full.model_config
    kv_bytes = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * full.spec.dtype.itemsize * n_ctx
    gpu_mem = int(args.gpu_share * kv_bytes)
    llm = LLM(args.model, device=args.device, ctx=ctx, attention="sparse", gpu_mem=gpu_mem, host_mem=4 * kv_bytes,
              show_progress=False)
    ids = haystack_ids(llm.tokenizer)[:n_ctx + args.continuation]
    t0 = time.perf_counter()
    base = full.session()
    base.prefill(ids[:n_ctx])
    print(f"prefill {n_ctx} tokens: {time.perf_counter() - t0:.0f} s; GPU tier {gpu_mem / 2**20:.0f} MiB "
          f"({args.gpu_share:.0%} of the KV)", file=sys.stderr)
    rows = []
    for cname in args.configs.split(","):
        for policy in args.policies.split(","):
            tops = {}
            for promote in (False, True):
                s = llm.session(policy=policy, promote_hot=promote, **CONFIGS[cname])   # a fork across LLMs
                s.attn.load_kv(base.attn.read_kv(layer) for layer in range(mc.num_layers))
                s.tokens = list(base.tokens)
                t1 = time.perf_counter()
                tops[promote] = [int(s.step(t).argmax()) for t in ids[n_ctx:]]
                st = s.stats()
                tok = cname == "token"
                gpu = st["candidate_gpu_selections" if tok else "attended_gpu_selections"]
                host = st["candidate_host_selections" if tok else "attended_host_selections"]
                head_chunk = st["attended_bytes_gpu"] // max(1, st["attended_gpu_selections"])
                rows.append(dict(config=cname, policy=policy, promote_hot=promote,
                                 gpu_share_of_selected=round(gpu / max(1, gpu + host), 4),
                                 host_MB_per_token=round(host * head_chunk / args.continuation / 1e6, 3),
                                 promoted_chunks=st["promoted_hot_chunks"],
                                 top1_vs_off=None if not promote else round(
                                     sum(a == b for a, b in zip(tops[True], tops[False])) / len(tops[False]), 4),
                                 s=round(time.perf_counter() - t1, 1)))
                print(rows[-1], file=sys.stderr)
                s.close()
    meta = dict(date=str(date.today()), device=device_name() if args.device != "cpu" else "CPU", model=args.model, context=n_ctx,
                continuation=args.continuation, gpu_share=args.gpu_share, gpu_mem=gpu_mem)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
