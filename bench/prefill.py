"""Prefill speed: offload's exact prefill on the old and the new attention kernel, sparse prefill, and HF
transformers, against the dense GEMM ceiling measured in the same process (issue 11).

    python bench/prefill.py --ctx 32K,128K --modes exact,exact-old,sparse,hf --micro 32K,128K,512K --gpu-cap 24

micro      the attention op alone: one 2K-token chunk of 32 query heads over S keys of 8 KV heads, d=128,
           bf16, history part with its log-sum-exp: old (mem-efficient SDPA op) vs new (cuDNN), TFLOPS
           = 4 x Hq x T x S x D / time, and the largest difference between the two outputs.
exact      offload.LLM (Llama-3-8B architecture, load_format="dummy"), session().prefill of N random ids on
           the new kernel; exact-old the same on the mem-efficient op (ops.prefill_kernel("efficient")).
sparse     prefill="sparse" (threshold 0.95), dense or tiered sessions alike.
Long contexts: --kv-dtype int4 --host-mem 48GiB keeps 1M tokens in host RAM; --stage 128K prefills in calls
(times per call kept); --decode-steps N decodes right after (the end-to-end check).
hf         transformers LlamaForCausalLM from the same config (SDPA), prefilled in --hf-chunk chunks into a
           DynamicCache (offloaded to the host when the KV does not fit under the cap).
TFLOPS of a prefill = the FLOP model of offload.progress.prefill_flops / wall time. Writes JSON and a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cap_gpu, median, peak_gib, reset_peak, sync, timed, write_results  # noqa: E402

from offload.config import parse_tokens  # noqa: E402

_T0 = time.perf_counter()


def gemm_tflops(n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)  # a: [n, n]
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)  # b: [n, n]
    for _ in range(3):
        a @ b
    ms = median(timed(lambda: a @ b, reps))
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def micro(S: int, reps: int) -> dict:
    from offload.engine import ops
    Hq, Hkv, T, D = 32, 8, 2048, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(Hq, T, D, device="cuda", dtype=torch.bfloat16, generator=g)  # q: [Hq, T, D]
    k = torch.randn(Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)  # k: [Hkv, S, D]
    v = torch.randn(Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)  # v: [Hkv, S, D]
    row, outs = {"bench": "micro", "S": S}, {}
    for name in ("efficient", "auto"):
        with ops.prefill_kernel(name):
            outs[name] = ops.attend_lse(q, k, v, causal=False)
            ms = median(timed(lambda: ops.attend_lse(q, k, v, causal=False), reps))
        label = "old" if name == "efficient" else "new"
        row[f"{label}_ms"] = ms
        row[f"{label}_tflops"] = 4 * Hq * T * S * D / (ms * 1e-3) / 1e12
    row["max_abs_diff_o"] = (outs["auto"][0].float() - outs["efficient"][0].float()).abs().max().item()
    row["max_abs_diff_lse"] = (outs["auto"][1] - outs["efficient"][1]).abs().max().item()
    row["speedup"] = row["old_ms"] / row["new_ms"]
    row["kernel"] = ops.kernel_report()
    del q, k, v, outs
    return row


def load_offload(args, n: int):
    from offload import LLM
    ctx = max(n + 64 + args.decode_steps, parse_tokens(args.plan_ctx) if args.plan_ctx else 0)
    opts = dict(model=args.model, load_format="dummy", ctx=ctx, attention=args.attention,
                kv_dtype=args.kv_dtype, prefill_chunk=args.prefill_chunk, stream_chunk=args.stream_chunk)
    if args.stream:
        from offload.tiers.store import TieredKVStore
        TieredKVStore.stream_copy = args.stream == "copy"
    if args.host_mem:
        opts["host_mem"] = args.host_mem
    if args.disk_dir:
        opts["disk_dir"] = args.disk_dir
    return LLM(**opts, show_progress=False)


def micro_sparse(S: int, density: float, reps: int) -> dict:
    """Sparse prefill's parts on one 2K chunk over S keys: the block-mass estimate + selection, and the attention
    over a fixed fraction of key blocks (random ids: dummy weights give near-uniform attention, so the density
    real text reaches is measured on SmolLM2 instead)."""
    from offload.engine import sparse_prefill as sp
    Hq, Hkv, T, D = 32, 8, 2048, 128
    cfg = sp.SparsePrefill()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(Hq, T, D, device="cuda", dtype=torch.bfloat16, generator=g)  # q: [Hq, T, D]
    k = torch.randn(Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)  # k: [Hkv, S, D]
    v = torch.randn(Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)  # v: [Hkv, S, D]
    nK = S // cfg.block
    c = max(1, int(density * nK))
    idx = torch.rand(Hq, nK, device="cuda", generator=g).argsort(1)[:, :c].sort(1).values  # idx: [Hq, c]
    sp.select_blocks(q, k, cfg)
    sp.attend_blocks(q, k, v, idx, cfg)
    sel_ms = median(timed(lambda: sp.select_blocks(q, k, cfg), reps))
    att_ms = median(timed(lambda: sp.attend_blocks(q, k, v, idx, cfg), reps))
    dense_flops = 4 * Hq * T * S * D
    row = {"bench": "micro-sparse", "S": S, "density": density, "select_ms": sel_ms, "attend_ms": att_ms,
           "total_ms": sel_ms + att_ms, "attend_tflops": density * dense_flops / (att_ms * 1e-3) / 1e12,
           "dense_equiv_tflops": dense_flops / ((sel_ms + att_ms) * 1e-3) / 1e12}
    del q, k, v
    return row


def run_offload(args, llm, n: int, mode: str) -> dict:
    from offload.engine import ops
    from offload.progress import prefill_flops
    reset_peak()
    pf = "sparse" if mode == "sparse" else "exact"
    # one session at a time: each takes the GPU room the LLM was planned with (a second would not fit beside it)
    new_session = (lambda: llm.session()) if llm.config.prefill == pf else (lambda: llm.session(prefill=pf))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, llm.model_config.vocab_size, (n,), generator=g).tolist()
    if args.warmup and n > args.warmup:   # kernels load and the cuDNN probe runs outside the timed prefill
        warm = new_session()
        with ops.prefill_kernel("efficient" if mode == "exact-old" else "auto"):
            warm.prefill(ids[:args.warmup])
        warm.close()
        gc.collect()
        torch.cuda.empty_cache()
    sess = new_session()
    label = mode
    stage = parse_tokens(args.stage) if args.stage else n
    stages = []
    with ops.prefill_kernel("efficient" if mode == "exact-old" else "auto"):
        sync()
        t0 = time.perf_counter()
        for s in range(0, n, stage):     # each stage a prefill call: its time is kept even if a later one dies
            logits = sess.prefill(ids[s:s + stage])
            sync()
            stages.append({"tokens": min(n, s + stage), "s": time.perf_counter() - t0, "peak_gib": peak_gib(),
                           "allocated_gib": torch.cuda.memory_allocated() / 2**30})
            print(f"  {mode} {stages[-1]['tokens']} tokens at {stages[-1]['s']:.1f} s", flush=True)
            # a run cut by its call's time limit still leaves its stages (the 1M run of 2026-11-29 left none)
            Path(args.out + ".stages").parent.mkdir(parents=True, exist_ok=True)
            Path(args.out + ".stages").write_text(json.dumps({"mode": mode, "ctx": n, "stages": stages}))
            if time.perf_counter() - _T0 > args.time_budget:
                break
        secs = time.perf_counter() - t0
    done = stages[-1]["tokens"]
    st = sess.stats()
    flops = prefill_flops(llm.model_config, done)
    row = {"bench": "prefill", "mode": label, "ctx": n, "tokens_done": done, "prefill_s": secs, "tok_s": done / secs,
           "tflops": flops / secs / 1e12, "peak_gib": peak_gib(), "backend": type(sess.attn).__name__,
           "finite": bool(torch.isfinite(logits).all()), "kernel": ops.kernel_report(), "stages": stages,
           "kv_dtype": args.kv_dtype, "prefill_chunk": args.prefill_chunk, "stream_chunk": args.stream_chunk,
           "stream": args.stream or "default",
           "streamed_tokens": getattr(getattr(sess.attn, "staging", None), "streamed_tokens", 0)}
    if mode == "sparse":
        row["density"] = st.get("sparse_prefill_density")
    if args.decode_steps and done == n:      # the end-to-end check: decode right after the long prefill
        tok = int(logits.argmax())
        times = []
        for _ in range(args.decode_steps):
            sync()
            t = time.perf_counter()
            tok = int(sess.step(tok).argmax())
            sync()
            times.append(1000 * (time.perf_counter() - t))
        row["decode_ms"] = times
        row["decode_median_ms"] = median(times)
    sess.close()
    del sess
    return row


def run_hf(args, n: int) -> dict:
    import transformers
    from transformers import DynamicCache

    from offload.model.loaders.build import arch_config
    from offload.progress import prefill_flops
    arch = arch_config(args.model)
    hc = transformers.AutoConfig.for_model(**arch)
    hc._attn_implementation = "sdpa"
    reset_peak()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(hc).eval()
    torch.set_default_dtype(torch.float32)
    kv_gib = 2 * hc.num_hidden_layers * hc.num_key_value_heads * (hc.hidden_size // hc.num_attention_heads) * n * 2 / 2**30
    offload = kv_gib + 16 > args.gpu_cap - 2
    cache = DynamicCache(config=hc, offloading=offload)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch["vocab_size"], (1, n), generator=g).cuda()
    sync()
    t0 = time.perf_counter()
    done = 0
    with torch.inference_mode():
        for s in range(0, n, args.hf_chunk):
            out = model(input_ids=ids[:, s:s + args.hf_chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
            done = min(n, s + args.hf_chunk)
            if time.perf_counter() - t0 > args.hf_max_s and done < n:
                break   # too slow to finish in this run: report the part done
    sync()
    secs = time.perf_counter() - t0
    from types import SimpleNamespace
    mc = SimpleNamespace(hidden_size=hc.hidden_size, num_heads=hc.num_attention_heads, num_kv_heads=hc.num_key_value_heads,
                         head_dim=hc.hidden_size // hc.num_attention_heads, intermediate_size=hc.intermediate_size,
                         num_layers=hc.num_hidden_layers, vocab_size=hc.vocab_size,
                         tie_word_embeddings=hc.tie_word_embeddings)
    flops = prefill_flops(mc, done)
    row = {"bench": "prefill", "mode": "hf-offloaded-cache" if offload else "hf", "ctx": n, "prefill_s": secs,
           "tokens_done": done, "tok_s": done / secs, "tflops": flops / secs / 1e12, "peak_gib": peak_gib(),
           "finite": bool(torch.isfinite(out.logits).all())}
    del model, cache, out
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--ctx", default="32K,128K")
    ap.add_argument("--modes", default="exact,exact-old,sparse,hf")
    ap.add_argument("--micro", default="32K,128K,512K", help="S values of the attention micro-benchmark ('' = skip)")
    ap.add_argument("--micro-reps", type=int, default=10)
    ap.add_argument("--micro-sparse", default="128K,512K", help="S values of the sparse-prefill micro-benchmark")
    ap.add_argument("--gpu-cap", type=float, default=24.0)
    ap.add_argument("--host-mem", default=None)
    ap.add_argument("--disk-dir", default=None)
    ap.add_argument("--cap-only", action="store_true", help="plan GPU memory against --gpu-cap alone, not cudaMemGetInfo")
    ap.add_argument("--warmup", type=int, default=6144, help="tokens prefilled untimed first (0 = none)")
    ap.add_argument("--hf-chunk", type=int, default=4096)
    ap.add_argument("--hf-max-s", type=float, default=90, help="HF stops after this many seconds (partial figure)")
    ap.add_argument("--skip", default="", help="mode@ctx pairs to skip, e.g. exact-old@512K,hf@512K")
    ap.add_argument("--time-budget", type=float, default=1e9, help="seconds: later stages are skipped past it")
    ap.add_argument("--kv-dtype", default="bf16", help="KV dtype of the host/disk tiers (int4 fits 1M in 48 GiB)")
    ap.add_argument("--attention", default="full", help="decode attention of the session (full or sparse)")
    ap.add_argument("--stage", default="", help="prefill in calls of this many tokens (e.g. 128K); '' = one call")
    ap.add_argument("--decode-steps", type=int, default=0, help="greedy decode steps timed after the prefill")
    ap.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per forward chunk of a prefill")
    ap.add_argument("--stream-chunk", type=int, default=8192, help="tokens per forward chunk of a long tiered prefill")
    ap.add_argument("--plan-ctx", default="", help="plan the session for this context (e.g. 1M: its memory layout) "
                    "while prefilling only --ctx tokens")
    ap.add_argument("--stream", choices=["", "uva", "copy"], default="",
                    help="how streamed host history reaches the GPU ('' = the runtime's default)")
    ap.add_argument("--out", default="bench/out/prefill.json")
    args = ap.parse_args()
    rows = []
    ceiling = gemm_tflops()
    gc.collect()
    torch.cuda.empty_cache()
    print(f"dense bf16 GEMM 8192^3: {ceiling:.0f} TFLOPS", flush=True)
    for S in [parse_tokens(x) for x in args.micro.split(",") if x]:
        r = micro(S, args.micro_reps)
        r["of_gemm_new"], r["of_gemm_old"] = r["new_tflops"] / ceiling, r["old_tflops"] / ceiling
        print(r, flush=True)
        rows.append(r)
        torch.cuda.empty_cache()
    for S in [parse_tokens(x) for x in args.micro_sparse.split(",") if x]:
        for density in (0.05, 0.1, 0.2):
            r = micro_sparse(S, density, args.micro_reps)
            print(r, flush=True)
            rows.append(r)
        torch.cuda.empty_cache()
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    print(f"before the prefill stages: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated, "
          f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB reserved; device {free / 2**30:.1f} of "
          f"{total / 2**30:.1f} GiB free", flush=True)
    cap_gpu(args.gpu_cap)
    if args.cap_only:
        # the 2026-11-29 runs saw cudaMemGetInfo report 8.5 GiB free on a fresh H200 while this process held
        # 0.03 GiB and HF then allocated 20 GiB: plan against the cap alone (a real shortage still OOMs)
        import offload.planner as planner
        planner._detect_gpu = lambda device: max(0, int(args.gpu_cap * 2**30) - torch.cuda.memory_reserved())
    skip = {tuple(x.split("@")) for x in args.skip.split(",") if x}
    for ctx in args.ctx.split(","):
        n = parse_tokens(ctx)
        llm = None
        for mode in args.modes.split(","):
            if (mode, ctx) in skip:
                continue
            if time.perf_counter() - _T0 > args.time_budget:
                rows.append({"bench": "prefill", "mode": mode, "ctx": n, "error": "skipped: --time-budget spent"})
                continue
            try:
                if mode == "hf":
                    if llm is not None:   # the GPU holds one 8B model at a time
                        llm.close()
                        llm = None
                        gc.collect()
                        torch.cuda.empty_cache()
                    row = run_hf(args, n)
                else:
                    t_load = time.perf_counter()
                    if llm is None:
                        llm = load_offload(args, n)
                        print(f"  model loaded in {time.perf_counter() - t_load:.1f} s "
                              f"({time.perf_counter() - _T0:.1f} s since start)", flush=True)
                    row = run_offload(args, llm, n, mode)
                row["of_gemm"] = row["tflops"] / ceiling
            except torch.OutOfMemoryError as e:
                row = {"bench": "prefill", "mode": mode, "ctx": n, "error": "OOM: " + " ".join(str(e).split())[:600],
                       "allocated_gib": torch.cuda.memory_allocated() / 2**30,
                       "reserved_gib": torch.cuda.memory_reserved() / 2**30}
            except Exception as e:  # a failed mode must not hide the others' figures
                row = {"bench": "prefill", "mode": mode, "ctx": n, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            print({k: v for k, v in row.items() if k != "kernel"}, f"[{time.perf_counter() - _T0:.0f}s]", flush=True)
            rows.append(row)
            Path(args.out + ".partial").parent.mkdir(parents=True, exist_ok=True)
            Path(args.out + ".partial").write_text(json.dumps(rows, default=str))   # survives a timeout
            gc.collect()
            torch.cuda.empty_cache()
        if llm is not None:
            llm.close()
            llm = None
            gc.collect()
            torch.cuda.empty_cache()
    write_results("prefill", rows, args.out, {"gemm_tflops": ceiling, "gpu_cap_gib": args.gpu_cap,
                                              "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
