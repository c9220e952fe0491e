"""Accuracy cost of compressed KV (int8 / int4, issue 12) on the real SmolLM2-135M-Instruct, CPU.

    python bench/kv_quant_fidelity.py [--parts teacher,needle] [--teacher-context 6144] [--continuation 2048]
        [--kv-dtypes int8,int4] [--attention full,sparse] [--haystacks 4] [--segments 0,1]
        [--out bench/out/kv_quant_fidelity.json]
    python bench/kv_quant_fidelity.py --merge a.json b.json    # combine split runs, print and write the table

What the host tier will hold is simulated by hooking the session's TieredKVStore.put: every chunk outside
the sinks and the local window goes through quantize_chunks -> dequantize_chunks when it is stored, and a
chunk that leaves the window is stored again the same way (sinks, window and the < C-token tail stay exact,
as they stay in bf16 on the GPU). Indexes are built from the unquantized keys, as in the runtime.
On the CPU the model runs in float32, so "unquantized" there is float32 KV (the row kv=bf16, KV rounded to
bf16 outside sinks + window, shows the floor every GPU run has anyway); with --device cuda it is bf16.

teacher  --teacher-context tokens of text, then --continuation tokens teacher-forced: top-1 agreement and
         KL(reference || quantized) per step, against exact attention on unquantized KV ("vs exact") and,
         for sparse, against the same sparse method on unquantized KV ("vs same").
needle   passkeys at 8K (bench/fidelity_data.py), 10 cases per haystack segment: answers equal to exact
         attention's on unquantized KV, and correct.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, print_table  # noqa: E402
from fidelity_data import extract_digits, haystack_ids, needle_cases, teacher_text_ids  # noqa: E402
from fidelity_sessions import greedy_answer  # noqa: E402

from offload import LLM  # noqa: E402
from offload.kernels.quant import PackedFormat, dequantize_chunks, quantize_chunks  # noqa: E402

_T0 = time.perf_counter()
# a GPU tier too small for the whole KV, so exact attention runs through the tiered store (and its hook)
_SMALL_GPU = "24MiB"


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.0f}s] {msg}", file=sys.stderr, flush=True)


class RoundTripPuts:
    """Wraps store.put (and put_column): chunks outside sinks + window are stored as quantize -> dequantize of
    themselves."""

    def __init__(self, attn, kv_dtype: str):
        self.store, self.kv_dtype = attn.store, kv_dtype
        where = getattr(attn, "selector", attn)      # sinks and window in chunks (the selector's since issue 10)
        self.n_sink, self.n_window = where.n_sink, where.n_window
        s = self.store.shape
        self.fmt = PackedFormat(kv_dtype if kv_dtype != "bf16" else "int8", s.num_kv_heads, s.chunk_tokens,
                                s.head_dim, s.dtype)
        self.count = [0] * attn.L
        self._put = self.store.put
        self.store.put = self.put
        self.store.put_column = self.put_column   # a decode boundary's chunks: through put, layer by layer
        self.lossy_chunks = 0

    def _lossy(self, kv: torch.Tensor) -> torch.Tensor:
        self.lossy_chunks += kv.shape[0]
        if self.kv_dtype == "bf16":
            return kv.to(torch.bfloat16).to(kv.dtype)
        return dequantize_chunks(quantize_chunks(kv, self.fmt), self.fmt, kv.dtype)   # [n, 2, Hkv, C, D]

    def put(self, layer: int, first: int, kv: torch.Tensor, *args, **kwargs) -> None:
        end = first + kv.shape[0]
        before = self.count[layer]
        total = max(before, end)
        cut = total - self.n_window                 # chunks below cut are outside the window from now on
        ids = torch.arange(first, end)
        lossy = (ids >= self.n_sink) & (ids < cut)  # lossy: [n]
        if bool(lossy.any()):
            kv = kv.clone()
            kv[lossy] = self._lossy(kv[lossy])
        self._put(layer, first, kv, *args, **kwargs)
        lo, hi = max(before - self.n_window, self.n_sink, 0), min(cut, first)
        if hi > lo:                                 # stored exact earlier, left the window now
            self._put(layer, lo, self._lossy(self.store.read(layer, range(lo, hi)).to(kv.device)))
        self.count[layer] = total


    def put_column(self, chunk_idx: int, kv: torch.Tensor, *args, **kwargs) -> None:
        for layer in range(kv.shape[0]):                                        # kv: [L, 2, Hkv, C, D]
            self.put(layer, chunk_idx, kv[layer:layer + 1], *args, **kwargs)


class DenseRoundTrip:
    """Exact attention, cheaper than through the tiered store: a dense session whose whole chunks outside sinks
    + window are quantize -> dequantize round-tripped in place once they leave the window (after every
    forward), the same chunks RoundTripPuts makes lossy (the < C-token tail and the window stay exact)."""

    def __init__(self, sess, kv_dtype: str):
        cfg, mc = sess.llm.config, sess.llm.model_config
        self.attn, self.kv_dtype, self.C = sess.attn, kv_dtype, cfg.chunk_tokens
        self.n_sink, self.n_window = -(-cfg.sink_tokens // self.C), -(-cfg.window_tokens // self.C)
        self.fmt = PackedFormat(kv_dtype if kv_dtype != "bf16" else "int8", mc.num_kv_heads, self.C, mc.head_dim,
                                sess.llm.dtype)
        self.done, self.lossy_chunks = self.n_sink, 0     # chunks below `done` are round-tripped already
        self._end = self.attn.end
        self.attn.end = self.end

    def end(self) -> None:
        self._end()
        self.sync()

    def sync(self) -> None:
        cut = self.attn.length // self.C - self.n_window
        if cut <= self.done:
            return
        a, b, C = self.done * self.C, cut * self.C, self.C
        k, v = self.attn.k[:, :, a:b], self.attn.v[:, :, a:b]              # k, v: [L, Hkv, n*C, D]
        L, H, _, D = k.shape
        kv = torch.stack([k.reshape(L, H, -1, C, D), v.reshape(L, H, -1, C, D)], 0)   # [2, L, Hkv, n, C, D]
        kv = kv.permute(1, 3, 0, 2, 4, 5).reshape(-1, 2, H, C, D)              # chunks: [L*n, 2, Hkv, C, D]
        if self.kv_dtype == "bf16":
            kv = kv.to(torch.bfloat16).to(k.dtype)
        else:
            kv = dequantize_chunks(quantize_chunks(kv, self.fmt), self.fmt, k.dtype)
        kv = kv.reshape(L, -1, 2, H, C, D).permute(2, 0, 3, 1, 4, 5).reshape(2, L, H, -1, D)
        self.attn.k[:, :, a:b], self.attn.v[:, :, a:b] = kv[0], kv[1]
        self.lossy_chunks += kv.shape[3] // C * L
        self.done = cut


def quant_session(base, attention: str, kv_dtype: str | None):
    """A copy of the prefilled dense session `base` with KV simulated at kv_dtype: exact attention on a dense
    session (DenseRoundTrip), sparse attention through the tiered store (RoundTripPuts)."""
    if attention == "full" and kv_dtype:
        sess = base.fork(attention="full")
        if kv_dtype.startswith("rank"):
            from key_rebuild import DenseKeyRebuild
            hook = DenseKeyRebuild(sess, kv_dtype)
        else:
            hook = DenseRoundTrip(sess, kv_dtype)
        hook.sync()
        return sess, hook
    kw = {"attention": attention}
    if attention == "full":
        kw["gpu_mem"] = _SMALL_GPU
    sess = base.llm.session(**kw)
    hook = RoundTripPuts(sess.attn, kv_dtype) if kv_dtype else None
    sess.attn.load_kv(base.attn.read_kv(layer) for layer in range(base.llm.model_config.num_layers))
    sess.tokens = list(base.tokens)
    return sess, hook


_BASE = "fp32"        # the unquantized KV's dtype in labels (bf16 on CUDA)


def label(attention: str, kv_dtype: str | None) -> str:
    return f"{'exact' if attention == 'full' else 'sparse'} kv={kv_dtype or _BASE}"


def run_teacher(llm, args) -> dict:
    """All sessions advance together token by token, so a run cut short still compares them over the same
    prefix; the JSON (--out + ".partial") is rewritten every 64 tokens."""
    tok = llm.tokenizer
    ids = teacher_text_ids(tok, haystack_ids(tok), args.teacher_context, args.continuation)
    cont = ids[args.teacher_context:]
    log(f"teacher: prefill {args.teacher_context} tokens, {len(cont)} teacher-forced")
    base = llm.session(attention="full")
    base.prefill(ids[:args.teacher_context])
    modes = args.attention.split(",")
    plan = [("full", None)] + [(a, None) for a in modes if a != "full"]    # references first
    plan += [(a, d) for a in modes for d in args.kv_dtypes.split(",")]
    runs = []
    for attention, kd in plan:
        if attention == "full" and kd is None:
            sess, hook = base.fork(attention="full"), None       # the reference: dense, exact, unquantized
        else:
            sess, hook = quant_session(base, attention, kd)
        runs.append({"name": label(attention, kd), "attention": attention, "kd": kd, "sess": sess, "hook": hook,
                     "top": [], "kl": {"exact": [], "same": []}, "s": 0.0})
    base.close()
    refs = {"full": runs[0]}
    refs.update({r["attention"]: r for r in runs if r["kd"] is None})
    out = {"context": args.teacher_context, "continuation": 0, "rows": []}
    for i, t in enumerate(cont):
        logps = []
        for r in runs:
            t0 = time.perf_counter()
            lp = torch.log_softmax(r["sess"].step(t).float(), -1)  # lp: [V]
            r["s"] += time.perf_counter() - t0
            r["top"].append(int(lp.argmax()))
            logps.append(lp)
        by_name = {r["name"]: lp for r, lp in zip(runs, logps)}
        for r, lp in zip(runs, logps):
            for ref_name, ref in (("exact", refs["full"]), ("same", refs.get(r["attention"]))):
                if ref is not None and ref is not r:
                    rl = by_name[ref["name"]]
                    r["kl"][ref_name].append(float((rl.exp() * (rl - lp)).sum()))
        if (i + 1) % 64 == 0 or i + 1 == len(cont):
            out = {"context": args.teacher_context, "continuation": i + 1, "rows": _teacher_rows(runs, refs)}
            Path(args.out + ".partial").write_text(json.dumps({"teacher": out}, indent=1))
            log(f"  {i + 1} tokens: " + "  ".join(f"{r['method']} {r.get('top1_vs_exact', 1):.4f}" for r in out["rows"]))
    for r in runs:
        r["sess"].close()
    return out


def _teacher_rows(runs: list[dict], refs: dict) -> list[dict]:
    rows = []
    for r in runs:
        n = len(r["top"])
        row = {"method": r["name"], "tokens": n, "ms_token": round(1000 * r["s"] / n, 1),
               "lossy_chunks": r["hook"].lossy_chunks if r["hook"] else 0}
        for ref_name in ("exact", "same"):
            ref = refs["full"] if ref_name == "exact" else refs.get(r["attention"])
            kls = sorted(r["kl"][ref_name])
            if ref is None or ref is r or not kls or (ref_name == "same" and r["attention"] == "full"):
                continue
            row[f"top1_vs_{ref_name}"] = sum(a == b for a, b in zip(ref["top"], r["top"])) / n
            row[f"kl_mean_vs_{ref_name}"] = sum(kls) / len(kls)
            row[f"kl_p99_vs_{ref_name}"] = kls[int(0.99 * (len(kls) - 1))]
        rows.append(row)
    return rows


def run_needle(llm, args) -> dict:
    tok = llm.tokenizer
    cases = needle_cases(tok, haystack_ids(tok), [8192], [0.1, 0.3, 0.5, 0.7, 0.9], ["single", "multi"],
                         haystacks=args.haystacks, seed=0, reserve=args.max_new + 6)
    if args.segments:
        cases = [c for c in cases if c.haystack in {int(x) for x in args.segments.split(",")}]
    methods = [(a, d) for a in args.attention.split(",") for d in [None] + args.needle_kv_dtypes.split(",")]
    log(f"needle: {len(cases)} cases x {len(methods)} methods")
    out = []
    for h in sorted({c.haystack for c in cases}):
        group = sorted((c for c in cases if c.haystack == h), key=lambda c: c.first)
        base = llm.session(attention="full")    # the shared prefix: chat head + haystack before the first needle
        for case in group:
            prompt = case.head + case.doc
            cut = len(case.head) + case.first
            if cut > base.length:
                base.prefill(prompt[base.length:cut])
            doc = base.fork(attention="full")
            doc.prefill(prompt[cut:])
            row = {"case": case.name, "kind": case.kind, "answer": case.answer, "methods": {}}
            for attention, kd in methods:
                if attention == "full" and kd is None:
                    sess = doc.fork(attention="full")
                else:
                    sess, _ = quant_session(doc, attention, kd)
                text, _, _ = greedy_answer(sess, case.tail, tok, args.max_new)
                sess.close()
                row["methods"][label(attention, kd)] = extract_digits(text)
            doc.close()
            out.append(row)
            log(f"  {case.name:20s} key {case.answer} " + " ".join(f"{k}={v or '-'}" for k, v in row["methods"].items()))
            Path(args.out + ".partial").write_text(json.dumps({"cases": out}, indent=1))
        base.close()
    return {"cases": out}


def needle_table(cases: list[dict]) -> list[dict]:
    ref = label("full", None)
    names = list(dict.fromkeys(m for c in cases for m in c["methods"]))
    rows = []
    for name in names:
        got = [c for c in cases if name in c["methods"]]
        same = [c for c in got if c["methods"][name] == c["methods"][ref]]
        # the same attention on unquantized KV: what quantization alone changes
        base = label("full" if name.startswith("exact") else "sparse", None)
        same_attn = [c for c in got if c["methods"][name] == c["methods"].get(base)]
        rows.append({"method": name, "cases": len(got),
                     "correct": sum(c["methods"][name] == c["answer"] for c in got) / len(got),
                     "eq_exact_unquantized": len(same) / len(got),
                     "eq_same_attention_unquantized": len(same_attn) / len(got)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="teacher,needle")
    ap.add_argument("--teacher-context", type=int, default=6144)
    ap.add_argument("--continuation", type=int, default=2048)
    ap.add_argument("--kv-dtypes", default="int8,int4", help="teacher; bf16 = the KV rounded to bf16 (the floor)")
    ap.add_argument("--needle-kv-dtypes", default="int8,int4")
    ap.add_argument("--attention", default="full,sparse", help="full = exact attention; sparse = the default "
                    "sparse config (summary index, 5%% budget, 32-token chunks)")
    ap.add_argument("--haystacks", type=int, default=4, help="needle: 10 cases per haystack segment")
    ap.add_argument("--segments", default=None, help="needle: only these segments (split a run over processes)")
    ap.add_argument("--max-new", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu (float32 model and KV) or cuda (bf16: the baseline is bf16 KV)")
    ap.add_argument("--out", default="bench/out/kv_quant_fidelity.json")
    ap.add_argument("--merge", nargs="+", default=None)
    args = ap.parse_args()
    if args.merge:
        doc = {"commands": []}
        cases = []
        for p in args.merge:
            part = json.loads(Path(p).read_text())
            doc["commands"] += part.get("commands", [])
            cases += part.get("needle", part).get("cases", [])
            doc.update({k: v for k, v in part.items() if k not in ("commands", "needle")})
        if cases:
            doc["needle"] = {"cases": cases, "rows": needle_table(cases)}
    else:
        torch.set_num_threads(args.threads)
        global _BASE
        _BASE = "bf16" if args.device == "cuda" else "fp32"
        llm = LLM("smollm2-135m", device=args.device, ctx="8K", show_progress=False)
        doc = {"bench": "kv_quant_fidelity", "date": date.today().isoformat(), "device": device_name(),
               "model": llm.name, "commands": ["python " + " ".join(sys.argv)],
               "sink_tokens": llm.config.sink_tokens, "window_tokens": llm.config.window_tokens,
               "chunk_tokens": llm.config.chunk_tokens}
        if "teacher" in args.parts:
            doc["teacher"] = run_teacher(llm, args)
        if "needle" in args.parts:
            n = run_needle(llm, args)
            doc["needle"] = {"cases": n["cases"], "rows": needle_table(n["cases"])}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    for part in ("teacher", "needle"):
        if part in doc:
            print_table(doc[part]["rows"])
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
