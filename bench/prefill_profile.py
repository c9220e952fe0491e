"""Where a tiered prefill's time goes: torch.profiler over one streamed prefill (8B architecture, dummy weights).

    python bench/prefill_profile.py --ctx 128K --tokens 48K --window-mib 64 --out bench/out/prefill_profile.txt

--window-mib shrinks the prefill window so that history streams at a short, cheap length. Prints the top CUDA
kernels and the top CPU ops by self time (what the GPU waits on), and writes both tables to --out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cap_gpu, sync  # noqa: E402

from offload.config import parse_tokens  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ctx", default="128K")
    ap.add_argument("--tokens", default="48K")
    ap.add_argument("--window-mib", type=int, default=64, help="0 = the runtime's window")
    ap.add_argument("--stored", default="", help="tokens prefilled before the profiled call (default: half of --tokens)")
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--cprofile", action="store_true", help="profile Python functions (cProfile) instead")
    ap.add_argument("--trace", default="", help="write the chrome trace here and print its GPU busy/idle summary")
    ap.add_argument("--kv-dtype", default="int4")
    ap.add_argument("--gpu-cap", type=float, default=24.0)
    ap.add_argument("--out", default="bench/out/prefill_profile.txt")
    args = ap.parse_args()
    cap_gpu(args.gpu_cap)
    import offload.backends as backends
    import offload.planner as planner
    from offload import LLM
    planner._detect_gpu = lambda device: max(0, int(args.gpu_cap * 2**30) - torch.cuda.memory_reserved())
    if args.window_mib:
        backends.prefill_stage_bytes = lambda p: args.window_mib << 20
    n = parse_tokens(args.tokens)
    stored = parse_tokens(args.stored) if args.stored else n // 2
    llm = LLM(model="llama3-8b", load_format="dummy", ctx=parse_tokens(args.ctx), attention="sparse",
              kv_dtype=args.kv_dtype, host_mem="48GiB", show_progress=False, prefill_chunk=args.prefill_chunk)
    ids = torch.randint(0, llm.model_config.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
    warm = llm.session()
    warm.prefill(ids[:4096])
    warm.close()
    sess = llm.session()
    if stored:
        sess.prefill(ids[:stored])        # stored history for the profiled call to stream
    sync()
    if args.cprofile:      # where the host's time goes, by Python function (the GPU waits on it when idle)
        import cProfile
        import io
        import pstats
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        sess.prefill(ids[stored:])
        sync()
        pr.disable()
        out = io.StringIO()
        ps = pstats.Stats(pr, stream=out)
        ps.sort_stats("tottime").print_stats(30)
        ps.sort_stats("cumtime").print_stats(40)
        text = f"prefill of {n - stored} tokens over {stored} stored: {time.perf_counter() - t0:.2f} s\n{out.getvalue()}"
        print(text)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        open(args.out, "w").write(text)
        return
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        sess.prefill(ids[stored:])
        sync()
        secs = time.perf_counter() - t0
    st = sess.stats()
    head = (f"prefill of {n - stored} tokens over {stored} stored, window {args.window_mib} MiB: {secs:.2f} s; "
            f"streamed {sess.attn.staging.streamed_tokens} token-reads")
    cuda = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60)
    cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    text = "\n".join([head, "== by CUDA self time", cuda, "== by CPU self time", cpu, str({k: st[k] for k in sorted(st)
                                                                                          if "bytes" in k})])
    if args.trace:
        from trace_summary import summarize
        prof.export_chrome_trace(args.trace)
        text += "\n== trace\n" + summarize(args.trace, 60)
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
