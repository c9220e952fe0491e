"""Decode speed and peak GPU memory: offload's paths against HF transformers, same process, same context.

    python bench/decode.py --model llama3-8b --ctx 8K,32K --modes exact,hf --steps 32 --gpu-cap 24

Modes: exact (offload, whole KV on the device, CUDA graph), offload-full (offload, tiered exact attention),
MODE@KVDTYPE (e.g. offload-full@int8: host and disk KV compressed, issue 12), MODE:WEIGHTS (e.g. exact:q4:
weights quantized at load, issue 16; `--weights bf16,q8_0,q4` runs every offload mode with each),
sparse (offload, sparse retrieval), MODE+hot (promote_hot: hot host chunks trade places with cold GPU ones,
issue 13), hf (transformers, whole KV on the GPU), hf-offload
(transformers DynamicCache(offloading=True)). Writes JSON (bench/out/decode.json) and prints a table.
`--gemv` adds the quantized-weight GEMV kernels alone on the model's layer shapes (GB/s of weight bytes read)
beside the device's copy ceiling (a 2 GiB device-to-device copy, read + write bytes) in the same process.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cap_gpu, event_ms, graph_ms, median, peak_gib, reset_peak, sync, write_results  # noqa: E402

from offload.config import parse_tokens  # noqa: E402


def run_offload(args, ctx: int, mode: str) -> dict:
    from offload import LLM
    mode, _, weights = mode.partition(":")      # e.g. exact:q4: weights quantized at load (issue 16)
    mode, _, kv_dtype = mode.partition("@")     # e.g. offload-full@int8: host/disk KV in int8 (issue 12)
    mode, hot = mode.removesuffix("+hot"), mode.endswith("+hot")   # sparse+hot: promote_hot (tiers/hot.py)
    attention = {"exact": "full", "offload-full": "full", "sparse": "sparse"}[mode]
    opts = dict(model=args.model, load_format="dummy", ctx=ctx + args.steps + 8, attention=attention)
    if mode == "offload-full":
        opts["gpu_mem"] = args.kv_gpu_mem   # forces most of the KV to the host tier
    if kv_dtype:
        opts["kv_dtype"] = kv_dtype
    if hot:
        opts["promote_hot"] = True
    if weights:
        opts["weights"] = weights
    if mode != "exact" and args.host_mem:
        opts["host_mem"] = args.host_mem
    if mode == "sparse" and args.budget:
        opts["budget"] = args.budget
    if mode == "sparse" and args.index:
        opts["index"] = args.index
        opts["index_options"] = json.loads(args.index_options) if args.index_options else None
    if mode == "sparse" and args.select_unit == "token":
        opts.update(select_unit="token", token_candidates=args.token_candidates)
        if args.token_mass:
            opts.update(token_mass=args.token_mass, token_floor=args.token_floor)
        opts["token_scores"] = args.token_scores
    reset_peak()
    llm = LLM(**opts, show_progress=False)
    sess = llm.session()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, llm.model_config.vocab_size, (ctx,), generator=g).tolist()
    t0 = time.perf_counter()
    logits = sess.prefill(ids)
    sync()
    ttft = time.perf_counter() - t0
    tok = int(logits.argmax())
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t1 = time.perf_counter()
        tok = int(sess.step(tok).argmax())
        times.append(1000 * (time.perf_counter() - t1))
    mode_name = f"sparse-{args.index}" if mode == "sparse" and args.index else mode
    chosen = dict(llm.plan.selection)     # index "auto" (the default): the preset the planner chose
    if mode == "sparse" and chosen:
        mode_name += "-auto:" + ("tokens" if chosen.get("select_unit") == "token" else "chunks")
    if mode == "sparse" and args.select_unit == "token":
        mode_name += f"+tok{args.token_candidates:g}" + (f"m{args.token_mass:g}" if args.token_mass else "")
        mode_name += "sh" if args.token_scores == "shadow" else ""
    mode_name += "+hot" if hot else ""
    mode_name += f"@{kv_dtype}" if kv_dtype else ""
    mode_name += f":{weights}" if weights else ""
    row = {"mode": mode_name, "ctx": ctx, "ms_per_token": median(times[args.warmup:]),
           "mean_ms": sum(times[args.warmup:]) / max(1, args.steps), "ttft_s": ttft,
           "peak_gib": peak_gib(), "weights": llm.model.weight_format, "weight_gib": llm.model.weight_bytes / 2**30,
           "gpu_kv_room_gib": llm.plan.available[0] / 2**30, "gpu_kv_gib": llm.plan.gpu_bytes / 2**30,
           "selection": chosen, "plan": llm.plan.summary(), "stats": llm.stats}
    llm.close()
    del sess, llm
    gc.collect()
    return row


def run_hf(args, ctx: int, mode: str) -> dict:
    import transformers
    from transformers import DynamicCache
    from offload.model.loaders.build import arch_config

    arch = arch_config(args.model)
    hc = transformers.AutoConfig.for_model(**arch)
    reset_peak()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(hc).eval()
    torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch["vocab_size"], (1, ctx), generator=g).cuda()
    cache = DynamicCache(config=hc, offloading=(mode == "hf-offload"))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, ctx, args.hf_chunk):
            out = model(input_ids=ids[:, s:s + args.hf_chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync()
        ttft = time.perf_counter() - t0
        tok = out.logits[:, -1:].argmax(-1)
        times = []
        for i in range(args.warmup + args.steps):
            sync()
            t1 = time.perf_counter()
            out = model(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)
            int(tok)
            times.append(1000 * (time.perf_counter() - t1))
    mode_name = f"sparse-{args.index}" if mode == "sparse" and args.index else mode
    if mode == "sparse" and args.select_unit == "token":
        mode_name += f"+tok{args.token_candidates:g}"
    row = {"mode": mode_name, "ctx": ctx, "ms_per_token": median(times[args.warmup:]),
           "mean_ms": sum(times[args.warmup:]) / max(1, args.steps), "ttft_s": ttft, "peak_gib": peak_gib()}
    del model, cache, out
    gc.collect()
    return row


def run_gemv(args) -> list[dict]:
    """GB/s of the dequantize-GEMV kernels over one layer set of the model's shapes (several copies, so L2
    cannot hold them), against the HBM copy ceiling and dense bf16 (cuBLAS) GEMV of the same shapes."""
    from offload.model.loaders.build import arch_config
    from offload.model.qlinear import QuantWeight, linear
    a = arch_config(args.model)
    H, I, D = a["hidden_size"], a["intermediate_size"], a["head_dim"]
    shapes = [((a["num_attention_heads"] + 2 * a["num_key_value_heads"]) * D, H),
              (H, a["num_attention_heads"] * D), (2 * I, H), (H, I)]
    from offload.kernels import _cupy_wquant
    src = torch.ones(1 << 28, dtype=torch.float32, device="cuda")   # 1 GiB each
    dst = torch.empty_like(src)
    copy_ms = _cuda_ms(lambda: dst.copy_(src), 10, graph=False)
    ceiling = 2 * src.numel() * 4 / copy_ms / 1e6     # GB/s: read + write
    del src, dst
    rows = [{"mode": "hbm-copy", "gb_per_s": ceiling}]
    variants = [() if v.strip() in ("", "default") else tuple(v.split()) for v in args.gemv_variants.split(";")]
    x = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in {c for _, c in shapes}}
    for fmt in ("bf16", "Q8_0", "Q4_K", "Q4_0", "Q4_1", "Q6_K"):
        copies = []
        for _ in range(args.gemv_copies):
            for r, c in shapes:
                w = torch.randn(r, c, device="cuda", dtype=torch.bfloat16) * 0.02
                copies.append(w if fmt == "bf16" else QuantWeight.quantize(fmt, w))
        nbytes = sum(w.numel() * 2 if fmt == "bf16" else w.nbytes for w in copies)

        def step():
            for w in copies:
                linear(x[w.shape[1]], w)
        for defines in variants if fmt != "bf16" else [()]:
            _cupy_wquant.wquant_defines = defines
            ms = _cuda_ms(step, 20)
            rows.append({"mode": "gemv", "weights": fmt, "variant": " ".join(defines) or "default",
                         "gb_per_s": nbytes / ms / 1e6, "ms_per_layer_set": ms / args.gemv_copies,
                         "x_of_copy": nbytes / ms / 1e6 / ceiling})
            print(rows[-1], flush=True)
        _cupy_wquant.wquant_defines = ()
        del copies
        torch.cuda.empty_cache()
    return rows


def _cuda_ms(fn, reps: int, graph: bool = True) -> float:
    """Median ms of fn() between CUDA events, captured in a CUDA graph (the decode step's launch cost)."""
    return graph_ms(fn, reps) if graph else event_ms(fn, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--ctx", default="8K,32K")
    ap.add_argument("--modes", default="exact,hf")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--gpu-cap", type=float, default=24.0, help="GiB cap for offload's modes (consumer card)")
    ap.add_argument("--hf-cap", type=float, default=None, help="GiB cap for HF modes (default: none, as the anchors)")
    ap.add_argument("--kv-gpu-mem", default="4GiB", help="GPU KV budget for offload-full")
    ap.add_argument("--host-mem", default=None, help="host KV budget for offload modes (default: detected)")
    ap.add_argument("--budget", default=None, help="sparse budget (tokens or %%)")
    ap.add_argument("--hf-chunk", type=int, default=8192)
    ap.add_argument("--index", default=None, help="sparse index: summary | shadow | ann")
    ap.add_argument("--index-options", default=None, help='JSON, e.g. \'{"rank": 16}\'')
    ap.add_argument("--select-unit", default="chunk", choices=["chunk", "token"], help="sparse: whole chunks or tokens")
    ap.add_argument("--token-candidates", type=float, default=4.0, help="select-unit token: candidate chunks per budget chunk")
    ap.add_argument("--token-mass", type=float, default=None, help="select-unit token: the budget is a cap; "
                    "per KV head attend the fewest tokens reaching this softmax mass (issue 13)")
    ap.add_argument("--token-floor", type=int, default=0, help="--token-mass: tokens a head attends at least")
    ap.add_argument("--token-scores", default="keys", choices=["keys", "shadow"], help="select-unit token: rank "
                    "candidates by their keys, or (--index shadow) by the shadows, reading only the picks' K/V")
    ap.add_argument("--weights", default=None, help="bf16,q8_0,q4: run every offload mode with each (issue 16)")
    ap.add_argument("--gemv", action="store_true", help="also time the quantized GEMV kernels against the copy ceiling")
    ap.add_argument("--gemv-copies", type=int, default=4, help="layer sets cycled by the GEMV timing (beat the L2)")
    ap.add_argument("--gemv-variants", default="", help="';'-separated -D sets of wquant.cu to time (empty: default)")
    ap.add_argument("--out", default="bench/out/decode.json")
    args = ap.parse_args()
    rows = []
    if args.gemv and torch.cuda.is_available():
        rows.extend(run_gemv(args))
    if args.weights:
        args.modes = ",".join(m if m.startswith("hf") else ",".join(f"{m}:{w}" for w in args.weights.split(","))
                              for m in args.modes.split(","))
    for ctx in [parse_tokens(c) for c in args.ctx.split(",")]:
        for mode in args.modes.split(","):
            hf = mode.startswith("hf")
            if torch.cuda.is_available():
                cap_gpu(args.hf_cap if hf else args.gpu_cap) if (args.hf_cap or not hf) else cap_gpu(1e9)
            try:
                row = run_hf(args, ctx, mode) if hf else run_offload(args, ctx, mode)
            except torch.OutOfMemoryError as e:
                row = {"mode": mode, "ctx": ctx, "error": "OOM: " + str(e).splitlines()[0][:120]}
            except Exception as e:  # a failed mode must not hide the others' figures
                row = {"mode": mode, "ctx": ctx, "error": f"{type(e).__name__}: {str(e)[:160]}"}
            rows.append(row)
            st = row.get("stats") or {}
            print({k: v for k, v in row.items() if k != "stats"},
                  {k: st.get(k) for k in ("decode_mode", "graph_captures", "graph_error", "selection_ms")}, flush=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    for ctx in {r["ctx"] for r in rows if "ctx" in r}:
        base = {r["mode"]: r.get("ms_per_token") for r in rows if r.get("ctx") == ctx}
        ttft = {r["mode"]: r.get("ttft_s") for r in rows if r.get("ctx") == ctx}
        for r in rows:
            mode, _, weights = r["mode"].partition(":")
            bf16 = f"{mode}:bf16"
            if r.get("ctx") == ctx and weights and r.get("ms_per_token") and base.get(bf16):
                r["x_time_vs_bf16"] = r["ms_per_token"] / base[bf16]     # issue 16 goals: q8_0 <= 0.6, q4 <= 0.4
                r["x_prefill_vs_bf16"] = r["ttft_s"] / ttft[bf16]       # goal <= 1.2
            if r.get("ctx") == ctx and r.get("ms_per_token") and base.get("hf"):
                r["x_vs_hf"] = base["hf"] / r["ms_per_token"]
            if r.get("ctx") == ctx and r.get("ms_per_token") and base.get("hf-offload"):
                r["x_vs_hf_offload"] = base["hf-offload"] / r["ms_per_token"]
    table = [{k: v for k, v in r.items() if k != "stats"} for r in rows]
    write_results("decode", rows, args.out, {"args": vars(args)})
    del table


if __name__ == "__main__":
    main()
