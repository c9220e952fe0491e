"""Synthetic KV fill (issue 12): a session at 256K-1M tokens without the prefill, for decode benchmarks.

    python bench/synthetic_fill.py --ctx 256K,512K,1M --attention sparse --budget 2K --host-mem 48GiB \
        [--kv-dtype int4] [--disk-dir /nvme/kv] [--steps 64] [--gpu-cap 24] [--out bench/out/synthetic_decode.json]
        [--prefetch adaptive]   # drive read-ahead: adaptive | always | off (offload/tiers/prefetch.py)
        [--progress-s 10]       # a progress line on stderr (load, fill per layer, decode steps) at most every 10 s

fill(sess, n_tokens) makes a session hold n_tokens of KV with the statistics of the model's own:
  1. prefill `sample` random token ids (default 4K): the model's real post-RoPE K and V at a small context;
  2. positions sample..n copy runs of sample tokens (run lengths ~ exponential, mean `segment`), so a topic
     recurs in places as in real text and chunk selection is not degenerate; a copied key is rotated to its
     new position (RoPE by the position difference: R(p) k0 = R(p - j) R(j) k0), and keys and values get
     noise at `noise` x the per-channel standard deviation, so no two chunks are equal;
  3. the chunks go in through the public store and index API (TieredKVStore.put, the selector's
     index_chunks, i.e. index build/extend), a batch of chunks per layer at a time, then the backend's
     length is set; decode continues from there.
Decode figures from a filled session are synthetic: label them so (rows carry "fill": "synthetic").
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cap_gpu, device_name, print_table, sync  # noqa: E402

_BATCH_TOKENS = 16384      # tokens generated and put per layer at a time (~64 MiB of bf16 KV for 8 KV heads)


def _source_map(n_sample: int, start: int, n_tokens: int, segment: int, gen: torch.Generator) -> torch.Tensor:
    """For positions start..n_tokens-1: the sample token each copies (runs of consecutive sample tokens)."""
    out = torch.empty(n_tokens - start, dtype=torch.long)
    pos = 0
    while pos < out.numel():
        length = max(8, int(-segment * math.log(1 - torch.rand(1, generator=gen).item())))
        j0 = int(torch.randint(n_sample, (1,), generator=gen))
        run = min(length, out.numel() - pos)
        out[pos:pos + run] = (j0 + torch.arange(run)) % n_sample
        pos += run
    return out                                                                 # [n_tokens - start]


def _rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half) of x [Hkv, T, D] by delta [T] positions; angles in float64."""
    ang = delta.to(torch.float64)[:, None] * inv_freq[None].to(delta.device)   # ang: [T, D/2]
    ang = torch.cat([ang, ang], dim=-1)                                        # ang: [T, D]
    cos, sin = ang.cos().float(), ang.sin().float()                            # [T, D] each
    half = x.shape[-1] // 2
    xf = x.float()
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)                 # rot: [Hkv, T, D]
    return (xf * cos + rot * sin).to(x.dtype)


@torch.inference_mode()   # as the engine puts: the store's chunk table is made of inference tensors
def fill(sess, n_tokens: int, sample: int = 4096, segment: int = 64, noise: float = 0.1, seed: int = 0,
         progress=None) -> dict:
    """Fill `sess` (a fresh tiered session) to n_tokens of synthetic KV; returns timings."""
    attn, llm = sess.attn, sess.llm
    C = attn.C
    if not hasattr(attn, "store"):
        raise SystemExit("synthetic fill needs a tiered session (attention sparse, or full with a small --gpu-mem)")
    sample, n_tokens = sample // C * C, n_tokens // C * C
    if sess.length or sample >= n_tokens:
        raise SystemExit(f"fill a fresh session to more than the sample ({sample} tokens)")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, llm.model_config.vocab_size, (sample,), generator=gen).tolist()
    t0 = time.perf_counter()
    sess.prefill(ids)                                   # the real K, V of `sample` tokens
    sync()
    t_prefill = time.perf_counter() - t0
    src = _source_map(sample, sample, n_tokens, segment, gen).to(llm.device)   # src: [N - sample]
    pos = torch.arange(sample, n_tokens, device=llm.device)                    # pos: [N - sample]
    inv_freq = llm.model.inv_freq
    store, selector = attn.store, attn.selector
    t1 = time.perf_counter()
    for layer in range(attn.L):
        k0, v0 = attn.read_kv(layer)                                           # [Hkv, sample, D] each
        k0, v0 = k0.to(llm.device), v0.to(llm.device)
        # noise scale per channel: of the content (un-rotated) keys, and of the values
        content = _rotate(k0, -torch.arange(sample, device=llm.device), inv_freq).float()   # [Hkv, sample, D]
        k_sd, v_sd = content.std(dim=1, keepdim=True), v0.float().std(dim=1, keepdim=True)  # [Hkv, 1, D] each
        g = torch.Generator(device=llm.device).manual_seed(seed * 1000 + layer)
        idx = getattr(selector, "indexes", None)
        if idx is not None and hasattr(idx[layer], "reserve"):
            idx[layer].reserve(n_tokens // C)            # no regrowth while appending
        for s in range(0, pos.numel(), _BATCH_TOKENS):
            j, p = src[s:s + _BATCH_TOKENS], pos[s:s + _BATCH_TOKENS]          # [T] each
            kc = content[:, j] + noise * k_sd * torch.randn(content[:, j].shape, device=llm.device, generator=g)
            k = _rotate(kc.to(k0.dtype), p, inv_freq)                          # k: [Hkv, T, D]
            v = (v0[:, j].float() + noise * v_sd * torch.randn(v0[:, j].shape, device=llm.device, generator=g)).to(v0.dtype)
            first = (sample + s) // C
            kv = torch.stack([k, v]).unflatten(2, (-1, C)).permute(2, 0, 1, 3, 4).contiguous()  # [n, 2, Hkv, C, D]
            store.put(layer, first, kv)
            selector.index_chunks(layer, first, k)
        if progress:
            progress(layer)
    # the backend now holds n_tokens (the same bookkeeping a prefill ends with: full chunks, empty tail)
    attn.n_chunks, attn.tail_len, attn._len = n_tokens // C, 0, n_tokens
    # the copied tokens: layer 0's K and V (context-free but for RoPE) are exactly theirs when noise = 0
    sess.tokens = ids + torch.tensor(ids)[src.cpu()].tolist()
    sync()
    return {"sample_prefill_s": round(t_prefill, 2), "fill_s": round(time.perf_counter() - t1, 2)}


# per tier: share of selections served, drive bytes per decode token, and how many drive chunks the reads started a
# layer ahead (from the previous step's selection) had ready; layers read ahead or skipped by the prefetch rule
_DECODE_STATS = ("hit_rate_gpu", "hit_rate_host", "hit_rate_disk", "disk_read_bytes_per_token", "prefetch_hit_chunks",
                 "prefetch_miss_chunks", "prefetch_unused_chunks", "prefetch_layers", "prefetch_skipped_layers",
                 "attended_bytes_disk", "h2disk_bytes", "promoted_chunks")


class _Progress:
    """A line on stderr at most every `every` s (and when forced), so a run cut by a time limit says how far it got."""

    def __init__(self, every: float, what: str):
        self.every, self.what, self.t0 = every, what, time.perf_counter()
        self.last = self.t0

    def __call__(self, msg: str, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last >= self.every:
            self.last = now
            print(f"[{now - self.t0:6.1f} s] {self.what}: {msg}", file=sys.stderr, flush=True)


def _tiers(store) -> str:
    """Chunks and GB per tier so far, and the drive's written GB."""
    st = store.stats()
    disk = store.tiers[2]
    drive = f", drive written {disk.bytes_written / 1e9:.1f} GB" if disk is not None else ""
    return " ".join(f"{t} {st[f'bytes_in_use_{t}'] / 2**30:.1f} GiB" for t in ("gpu", "host", "disk")) + drive


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--ctx", default="256K,512K,1M")
    ap.add_argument("--attention", default="sparse")
    ap.add_argument("--budget", default="2K")
    ap.add_argument("--kv-dtype", default=None, help="bf16 | int8 | int4 (needs the kv_dtype option)")
    ap.add_argument("--gpu-mem", default=None)
    ap.add_argument("--host-mem", default="48GiB")
    ap.add_argument("--disk-dir", default=None)
    ap.add_argument("--gpu-cap", type=float, default=24.0)
    ap.add_argument("--sample", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--progress-s", type=float, default=10.0, help="a progress line on stderr at most this often")
    ap.add_argument("--index", default=None, help="sparse index: summary | shadow | ann (issue 13: shadow at 1M)")
    ap.add_argument("--index-options", default=None, help='JSON, e.g. \'{"candidate_factor": 1}\'')
    ap.add_argument("--prefetch", default="adaptive", help="drive read-ahead: adaptive | always | off (tiers/prefetch.py)")
    ap.add_argument("--out", default="bench/out/synthetic_decode.json")
    args = ap.parse_args()
    from offload import LLM
    from offload.config import parse_tokens
    from offload.tiers.prefetch import PrefetchRule
    cap_gpu(args.gpu_cap)
    rows = []
    for ctx_s in args.ctx.split(","):
        ctx = parse_tokens(ctx_s)
        opts = dict(model=args.model, load_format="dummy", ctx=ctx + args.steps + args.warmup + 64,
                    attention=args.attention, budget=args.budget, host_mem=args.host_mem, show_progress=False)
        opts.update({k: v for k, v in (("gpu_mem", args.gpu_mem), ("disk_dir", args.disk_dir),
                                        ("kv_dtype", args.kv_dtype), ("index", args.index)) if v})
        if args.index_options:
            opts["index_options"] = json.loads(args.index_options)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t_load = time.perf_counter()
        llm = LLM(**opts)
        sess = llm.session()       # allocates the tiers: the pinned host slab, the drive file
        t_load = time.perf_counter() - t_load
        note = _Progress(args.progress_s, f"{ctx_s} {args.kv_dtype or 'bf16'}")
        note(f"model + tiers ready in {t_load:.1f} s: {llm.plan.summary()}", force=True)
        store, n_layers = sess.attn.store, sess.attn.L
        store.prefetch_rule = PrefetchRule(n_layers, args.prefetch)
        t = fill(sess, ctx, sample=args.sample, progress=lambda layer: note(
            f"fill: layer {layer + 1}/{n_layers}, {_tiers(store)}", force=layer + 1 == n_layers))
        disk = store.tiers[2]
        t["drive_written_GB"] = round(disk.bytes_written / 1e9, 2) if disk is not None else 0.0
        t["fill_GBps_stored"] = round(sum(store.stats()[f"bytes_in_use_{k}"] for k in ("gpu", "host", "disk"))
                                      / 1e9 / max(t["fill_s"], 1e-9), 3)
        note(f"filled: {json.dumps(t)}", force=True)
        tok, times = 0, []
        for i in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            tok = int(sess.step(tok).argmax())
            sync()
            times.append(1000 * (time.perf_counter() - t0))
            note(f"decode: step {i + 1}/{args.warmup + args.steps}, last {times[-1]:.1f} ms")
        times = times[args.warmup:]
        st = sess.stats()
        row = {"fill": "synthetic", "ctx": ctx, "attention": args.attention, "kv_dtype": args.kv_dtype or "bf16",
               "index": args.index or "auto", "selection": dict(llm.plan.selection), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
               if torch.cuda.is_available() else None,
               "prefetch": args.prefetch,
               "ms_median": round(_pct(times, 0.5), 2), "ms_mean": round(sum(times) / len(times), 2),
               "ms_p99": round(_pct(times, 0.99), 2), "ms_max": round(max(times), 2), **t,
               "load_s": round(t_load, 2), "plan": llm.plan.summary(),
               **{k: st[k] for k in _DECODE_STATS if k in st}}
        if st.get("attended_bytes_disk") and "disk_read_bytes_per_token" in st:
            # a drive selection uses one head's part of a chunk; the drive is read in whole chunks
            row["drive_bytes_per_attended_byte"] = round(
                st["disk_read_bytes_per_token"] * (args.warmup + args.steps) / st["attended_bytes_disk"], 2)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        sess.close()
        llm.close()              # sessions and the LLM refer to each other: free the weights before the next ctx
        del llm, sess
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    doc = {"bench": "synthetic_decode", "date": date.today().isoformat(), "device": device_name(),
           "command": "python " + " ".join(sys.argv), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
