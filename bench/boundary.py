"""Chunk-boundary stalls (issue 12): per-step decode time across many chunk boundaries, and what a boundary costs.

    python bench/boundary.py --model tiny --ctx 16K --boundaries 6                    # CPU, a tiny 32-layer model
    python bench/boundary.py --model llama3-8b --load-format dummy --ctx 128K,256K --boundaries 8 --host-mem 48GiB
    python bench/boundary.py --store-only                  # the store's boundary work alone, no model

Every C-th decode step crosses a chunk boundary: the tail's first C tokens become a chunk in every layer
(TieredAttention.end). The session is filled without a prefill (bench/synthetic_fill.py, figures labelled
synthetic), then decoded for `boundaries` x C steps. Per step: wall time including the host sync of the
sampled token (what a user waits for). Per boundary component (store.put, index extend, policy feedback,
mirror of the chunk table in begin_decode, the whole end()): host wall time, and on CUDA the GPU time of
the work it queued (CUDA events, read once at the end: no synchronize inside the timed region).
Writes JSON (bench/out/boundary.json) and prints a table.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cap_gpu, print_table, sync, write_results  # noqa: E402
from synthetic_fill import fill  # noqa: E402

# a small model with the 8B's layer count, so a boundary does as many puts, extends and mirror rows
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=32, num_attention_heads=8,
            num_key_value_heads=4, head_dim=32, vocab_size=512, max_position_embeddings=1 << 20,
            rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1, eos_token_id=2)


def _tiny_checkpoint(folder: Path) -> str:
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    model.save_pretrained(folder / "tiny", safe_serialization=True)
    return str(folder / "tiny")


class Probe:
    """Times calls of one bound method: host wall ms per call, and GPU ms of what it queued (CUDA events)."""

    def __init__(self, name: str, cuda: bool):
        self.name, self.cuda, self.wall, self.events, self.step = name, cuda, [], [], []
        self.current_step = -1

    def wrap(self, obj, attr: str) -> None:
        fn = getattr(obj, attr)

        @functools.wraps(fn)
        def timed(*a, **k):
            ev = None
            if self.cuda:
                ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                ev[0].record()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.wall.append(1000 * (time.perf_counter() - t0))
                self.step.append(self.current_step)
                if ev is not None:
                    ev[1].record()
                    self.events.append(ev)
        setattr(obj, attr, timed)

    def per_step(self, wanted: set[int]) -> tuple[float, float | None]:
        """Sum over the calls made during the steps in `wanted`, averaged per such step: (host ms, GPU ms)."""
        idx = [i for i, s in enumerate(self.step) if s in wanted]
        n = max(1, len(wanted))
        wall = sum(self.wall[i] for i in idx) / n
        gpu = sum(self.events[i][0].elapsed_time(self.events[i][1]) for i in idx) / n if self.events else None
        return round(wall, 3), None if gpu is None else round(gpu, 3)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def run(args, model: str, ctx: int) -> tuple[dict, list[dict]]:
    from offload import LLM
    C = args.chunk_tokens
    steps = args.boundaries * C
    opts = dict(model=model, ctx=ctx + steps + 2 * C, attention="sparse", budget=args.budget,
                chunk_tokens=C, show_progress=False)
    opts.update({k: v for k, v in (("gpu_mem", args.gpu_mem), ("host_mem", args.host_mem), ("disk_mem", args.disk_mem),
                                    ("disk_dir", args.disk_dir)) if v})
    if args.load_format:
        opts["load_format"] = args.load_format
    if not torch.cuda.is_available():
        opts["device"] = "cpu"
    llm = LLM(**opts)
    sess = llm.session()
    with torch.inference_mode():     # the prefill's chunk table is made of inference tensors
        t_fill = fill(sess, ctx, sample=args.sample)
    print(f"filled {ctx} tokens: {t_fill}", file=sys.stderr, flush=True)
    attn = sess.attn
    cuda = attn.device.type == "cuda"
    probes = {name: Probe(name, cuda) for name in ("end", "put", "index_extend", "feedback", "mirror")}
    probes["end"].wrap(attn, "end")
    probes["put"].wrap(attn.store, "put_column")     # a boundary's puts: one call for every layer's chunk
    probes["index_extend"].wrap(attn.selector, "index_chunks")
    probes["feedback"].wrap(attn.store, "feedback")
    probes["mirror"].wrap(attn.store, "begin_decode")
    tok, wall = 0, []
    boundary = set()
    for i in range(args.warmup + steps):
        for p in probes.values():
            p.current_step = i
        if attn.tail_len + 1 >= C:
            boundary.add(i)          # this step's end() cuts a chunk; the next step's begin mirrors it
        sync()
        t0 = time.perf_counter()
        tok = int(sess.step(tok).argmax())     # the host needs the sampled token: a real step syncs here
        wall.append(1000 * (time.perf_counter() - t0))
        if i % C == C - 1:
            print(f"step {i + 1}/{args.warmup + steps}: {wall[-1]:.1f} ms", file=sys.stderr, flush=True)
    sync()
    timed = list(range(args.warmup, args.warmup + steps))
    times = [wall[i] for i in timed]
    b_steps = {i for i in boundary if i in timed}
    after = {i + 1 for i in b_steps if i + 1 in timed}     # the step whose begin_decode mirrors the new chunks
    plain = [wall[i] for i in timed if i not in b_steps and i not in after]
    st = sess.stats()
    row = {"fill": "synthetic", "ctx": ctx, "chunk_tokens": C,
           "steps": steps, "boundaries": len(b_steps),
           "ms_median": round(_pct(times, 0.5), 3), "ms_mean": round(sum(times) / len(times), 3),
           "ms_p99": round(_pct(times, 0.99), 3), "ms_max": round(max(times), 3),
           "mean_over_median": round(sum(times) / len(times) / _pct(times, 0.5), 3),
           "ms_boundary_step_mean": round(sum(wall[i] for i in b_steps) / max(1, len(b_steps)), 3),
           "ms_plain_step_median": round(_pct(plain, 0.5), 3) if plain else None,
           **{k: st.get(k) for k in ("hit_rate_gpu", "hit_rate_host", "hit_rate_disk", "disk_read_bytes_per_token",
                                      "prefetch_hit_chunks", "prefetch_miss_chunks",
                                      "mirror_bytes", "decode_mode", "graph_captures")}, **t_fill}
    comps = []
    for name, p in probes.items():
        wanted = after if name == "mirror" else b_steps
        host, gpu = p.per_step(wanted)
        other_host, _ = p.per_step(set(timed) - wanted)
        comps.append({"ctx": ctx, "component": name, "host_ms_per_boundary": host, "gpu_ms_per_boundary": gpu,
                      "host_ms_other_steps": other_host, "calls": len(p.wall)})
    sess.close()
    llm.close()
    return row, comps


def store_only(args) -> list[dict]:
    """The store's share of a boundary alone (no model): 32 layers x `chunks` stored, a host tier of `host_slots`
    slots; per boundary: feedback, one put per layer (or one put_column, as the runtime now does: alternating
    boundaries), then the mirror (median of 8 boundaries each, host ms)."""
    from offload.tiers import ChunkShape, TieredKVStore
    L, N, rows = 32, args.store_chunks, []
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for case, gpu_cap in (("gpu tier has room", L * N + 1024), ("gpu tier full (demotions)", L * N // 4)):
        s = TieredKVStore(ChunkShape(1, 4, 8, torch.float32), L, (gpu_cap, args.host_slots, 0), dev,
                          sink_chunks=1, window_chunks=4)
        s.open_decode(N + 64)                     # room for 16 boundaries
        for layer in range(L):
            s.put(layer, 0, torch.zeros(N, 2, 1, 4, 8, device=dev))
        s.begin_decode(N)
        m0 = s.stats().get("mirror_bytes")
        t = {"feedback": [], "put": [], "put_column": [], "mirror": []}
        for b in range(0, 16, 2):                  # boundaries alternate: L puts, then one put_column
            s._chunk_hits[:, :N:5] = 1.0           # a fifth of the chunks were selected since the last boundary
            for name, fn in (("feedback", s.feedback),
                             ("put", lambda: [s.put(layer, N + b, torch.zeros(1, 2, 1, 4, 8, device=dev))
                                              for layer in range(L)]),
                             ("put_column", lambda: s.put_column(N + b + 1, torch.zeros(L, 2, 1, 4, 8, device=dev))),
                             ("mirror", lambda: s.begin_decode(N + b + 2))):
                sync()
                t0 = time.perf_counter()
                fn()
                t[name].append(1000 * (time.perf_counter() - t0))
        rows.append({"case": case, "chunks_per_layer": N, "host_slots": args.host_slots,
                     **{f"{k}_ms": round(sorted(v)[len(v) // 2], 2) for k, v in t.items()},
                     "mirror_bytes_per_boundary": None if m0 is None else (s.stats()["mirror_bytes"] - m0) // 16})
        s.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny (a 32-layer random model written here) or an alias/path")
    ap.add_argument("--load-format", default=None, help="dummy: random weights of an alias (GPU runs)")
    ap.add_argument("--ctx", default="16K")
    ap.add_argument("--chunk-tokens", type=int, default=64)
    ap.add_argument("--boundaries", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--budget", default="2K")
    ap.add_argument("--sample", type=int, default=4096, help="tokens really prefilled before the synthetic fill")
    ap.add_argument("--gpu-mem", default=None)
    ap.add_argument("--host-mem", default=None)
    ap.add_argument("--disk-mem", default=None)
    ap.add_argument("--disk-dir", default=None)
    ap.add_argument("--gpu-cap", type=float, default=24.0)
    ap.add_argument("--out", default="bench/out/boundary.json")
    ap.add_argument("--store-only", action="store_true", help="time the store's boundary work alone (no model)")
    ap.add_argument("--store-chunks", type=int, default=2048, help="--store-only: chunks per layer (2048 = 128K)")
    ap.add_argument("--host-slots", type=int, default=1 << 18, help="--store-only: host tier slots (48 GiB of 8B KV ~ 196K)")
    args = ap.parse_args()
    if args.store_only:
        write_results("boundary_store", store_only(args), args.out, {"args": vars(args)})
        return
    from offload.config import parse_tokens
    cap_gpu(args.gpu_cap)
    with tempfile.TemporaryDirectory() as tmp:
        model = _tiny_checkpoint(Path(tmp)) if args.model == "tiny" else args.model
        rows, comps = [], []
        for ctx in [parse_tokens(c) for c in args.ctx.split(",")]:
            row, comp = run(args, model, ctx)
            row["model"] = args.model
            rows.append(row)
            comps += comp
            print(json.dumps(row), file=sys.stderr, flush=True)
    print_table(comps)
    print()
    write_results("boundary", rows, args.out, {"args": vars(args), "components": comps,
                                               "command": "python " + " ".join(sys.argv)})


if __name__ == "__main__":
    main()
