"""Which packed int8 / int4 KV layout (offload/kernels/quant.py): attention-output error of candidate formats on
SmolLM2-135M's real KV, CPU.

    python bench/kv_format_error.py [--tokens 4096] [--queries 48] [--out bench/out/kv_format_error.json]

The model prefills --tokens of pydoc text exactly; the queries of its last --queries positions and the K / V of
every layer are kept. Each candidate round-trips every whole 32-token chunk of K and V (quantize -> dequantize)
and the late queries attend causally over it; the figure is ||o_q - o|| / ||o|| (over queries, heads and
channels) per layer, mean and max over the layers. Candidates name how K (per channel over 32 tokens) and V (per token over Gv
channels) keep their step and min (x = code * step + min):
    f16     fp16 step + fp16 min                                                    4 bytes per group
    e5m3    fp16 min + the step rounded up to 8 bits (the top byte of its fp16: 5 exponent, 3 mantissa)  3 bytes
    log16   fp16 min + the step rounded up to 2^(-u/16) of the largest step of the chunk's channels     3 bytes
            (+ that fp16 base per part, not counted)
    zp8     fp16 step + an integer zero point 0..255 (x = (code - z) * step; the range must hold 0)        3 bytes
    sym     fp16 step only, codes centred on 0                                                          2 bytes
    ...c    the slack of a rounded-up step split between both ends instead of left at the top
"quant.py" rows are the runtime's own format (quantize_chunks -> dequantize_chunks): int8 layout 2 is
"K e5m3 / V f16 Gv=D", int4 is "K f16 / V f16 Gv32", and the rows must agree.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from datetime import date  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, print_table  # noqa: E402
from fidelity_data import haystack_ids, teacher_text_ids  # noqa: E402

from offload import LLM  # noqa: E402
from offload.kernels.quant import PackedFormat, dequantize_chunks, quantize_chunks  # noqa: E402

C = 32


def _groups(x: torch.Tensor, which: str, gv: int) -> torch.Tensor:
    """x [Hkv, n*C, D] -> groups along the last dim: K [Hkv, n, D, C], V [Hkv, n*C, D/gv, gv]."""
    h, t, d = x.shape
    if which == "k":
        return x.reshape(h, t // C, C, d).transpose(2, 3)
    return x.reshape(h, t, d // gv, gv)


def _ungroup(g: torch.Tensor, which: str, shape) -> torch.Tensor:
    h, t, d = shape
    if which == "k":
        return g.transpose(2, 3).reshape(h, t, d)
    return g.reshape(h, t, d)


def _round_trip(x: torch.Tensor, bits: int, meta: str) -> torch.Tensor:
    """x [..., G] float32 -> quantize -> dequantize over the last dim with the (step, min) kept as `meta`."""
    levels = (1 << bits) - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if meta == "sym":
        half = (1 << (bits - 1)) - 1
        s = (x.abs().amax(-1, keepdim=True) / half).half().float()
        return torch.round(x / torch.where(s > 0, s, 1.0)).clamp(-half - 1, half) * s
    if meta == "zp8":
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)                    # the grid holds 0 exactly
        s = ((hi - lo) / levels).half().float()
        s = torch.where(s > 0, s, 1.0)
        z = torch.round(-lo / s).clamp(0, levels)
        return (torch.round(x / s + z).clamp(0, levels) - z) * s
    lo = lo.half().float()
    s = ((hi - lo) / levels).half()
    if meta.startswith("e5m3"):                                               # round the fp16 step up to its top byte
        b = s.view(torch.int16).int()
        b = torch.where(b & 0x7F != 0, (b | 0x7F) + 1, b)
        s = (b.short()).view(torch.float16)
    s = s.float()
    if meta.startswith("log16"):                                     # 2^(-u/16) of the largest step of the channels
        base = s.amax(-3, keepdim=True).half().float()               # over D (K groups are [Hkv, n, D, C])
        u = torch.floor(-16 * torch.log2(torch.where(s > 0, s, base * 2 ** -16) / base)).clamp(0, 255)
        s = base * torch.exp2(-u / 16)
        s = torch.where(s * levels + lo < hi, base * torch.exp2(-(u - 1).clamp(min=0) / 16), s)
    if meta.endswith("c"):                                           # centre the slack of a rounded-up step
        lo = (lo - (s * levels - (hi - lo)).clamp(min=0) / 2).half().float()
    codes = torch.round((x - lo) / torch.where(s > 0, s, 1.0)).clamp(0, levels)
    return codes * s + lo


def candidate(kv_k: torch.Tensor, kv_v: torch.Tensor, bits: int, kmeta: str, vmeta: str, gv: int):
    out = []
    for x, which, meta in ((kv_k, "k", kmeta), (kv_v, "v", vmeta)):
        g = _groups(x.float(), which, gv)
        out.append(_ungroup(_round_trip(g, bits, meta), which, x.shape))
    return out


def runtime_format(k: torch.Tensor, v: torch.Tensor, kv_dtype: str):
    h, t, d = k.shape
    fmt = PackedFormat(kv_dtype, h, C, d, torch.float32)
    kv = torch.stack([k.reshape(h, t // C, C, d), v.reshape(h, t // C, C, d)], 0).permute(2, 0, 1, 3, 4)
    back = dequantize_chunks(quantize_chunks(kv.contiguous(), fmt), fmt)                   # back: [n, 2, Hkv, C, D]
    back = back.permute(1, 2, 0, 3, 4).reshape(2, h, t, d)
    return [back[0], back[1]], fmt.chunk_bytes / (2 * h * C * d * 2)                                  # vs bf16


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, scale: float) -> torch.Tensor:
    """q [Hq, Tq, D] at positions first.. over k, v [Hkv, T, D] causally -> o [Hq, Tq, D]."""
    hq, tq, d = q.shape
    g = hq // k.shape[0]
    kk, vv = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)   # [Hq, T, D]
    s = (q @ kk.transpose(1, 2)) * scale                              # s: [Hq, Tq, T]
    pos = torch.arange(first, first + tq)[:, None]
    s = s.masked_fill(torch.arange(k.shape[1])[None, :] > pos, float("-inf"))
    return torch.softmax(s, -1) @ vv


def capture(llm, ids: list[int], n_q: int):
    """Prefill ids exactly; (queries of the last n_q positions per layer [Hq, n_q, D], K, V [L, Hkv, T, D])."""
    sess = llm.session(attention="full")
    qs = {}
    inner = sess.attn.attend

    def hook(layer, q, k, v):
        qs[layer] = q[:, -n_q:].detach().float().clone()              # q: [Hq, T, D]
        return inner(layer, q, k, v)

    sess.attn.attend = hook
    sess.prefill(ids)
    t = len(ids)
    k, v = sess.attn.k[:, :, :t].float().clone(), sess.attn.v[:, :, :t].float().clone()
    sess.close()
    return [qs[i] for i in range(len(qs))], k, v


CANDIDATES = [  # (name, bits, K meta, V meta, Gv or 0 = head_dim, bytes ratio is computed)
    ("int8 K f16 / V f16 Gv32 (layout 1)", 8, "f16", "f16", 32),
    ("int8 K f16 / V f16 Gv=D", 8, "f16", "f16", 0),
    ("int8 K e5m3 / V f16 Gv=D (layout 2)", 8, "e5m3", "f16", 0),
    ("int8 K zp8 / V f16 Gv=D", 8, "zp8", "f16", 0),
    ("int8 K log16 / V f16 Gv=D", 8, "log16", "f16", 0),
    ("int8 K e5m3c / V f16 Gv=D", 8, "e5m3c", "f16", 0),
    ("int8 K log16c / V f16 Gv=D", 8, "log16c", "f16", 0),
    ("int8 K sym / V sym Gv32", 8, "sym", "sym", 32),
    ("int4 K f16 / V f16 Gv32 (layout 1)", 4, "f16", "f16", 32),
    ("int4 K e5m3 / V f16 Gv32", 4, "e5m3", "f16", 32),
]
_META_BYTES = {"log16": 3, "log16c": 3, "e5m3c": 3, "f16": 4, "e5m3": 3, "zp8": 3, "sym": 2}


def ratio(bits: int, kmeta: str, vmeta: str, gv: int, d: int) -> float:
    """Packed chunk bytes / bf16 bytes (C = 32, scales padded to 16 bytes per part as quant.py does)."""
    pad = lambda n: -(-n // 16) * 16  # noqa: E731
    code = C * d * bits // 8
    k = code + pad(d * _META_BYTES[kmeta])
    v = code + pad(C * (d // gv) * _META_BYTES[vmeta])
    return (k + v) / (2 * C * d * 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--queries", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/out/kv_format_error.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM("smollm2-135m", device="cpu", ctx="8K", show_progress=False)
    tok = llm.tokenizer
    ids = teacher_text_ids(tok, haystack_ids(tok), args.tokens, 0)
    qs, k, v = capture(llm, ids, args.queries)                       # k, v: [L, Hkv, T, D]
    L, hkv, t, d = k.shape
    t = t // C * C
    scale, first = d ** -0.5, len(ids) - args.queries
    exact = [attend(qs[i], k[i], v[i], first, scale) for i in range(L)]
    rows = []
    runs = [(n, b, km, vm, gv or d, ratio(b, km, vm, gv or d, d)) for n, b, km, vm, gv in CANDIDATES]
    runs += [(f"{kd} quant.py", kd, None, None, 0, None) for kd in ("int8", "int4")]
    for name, bits, km, vm, gv, r in runs:
        errs = []
        for i in range(L):
            kk, vv = k[i].clone(), v[i].clone()
            if km is None:
                (kq, vq), r = runtime_format(kk[:, :t], vv[:, :t], bits)
            else:
                kq, vq = candidate(kk[:, :t], vv[:, :t], bits, km, vm, gv)
            kk[:, :t], vv[:, :t] = kq, vq
            o = attend(qs[i], kk, vv, first, scale)
            errs.append(float((o - exact[i]).norm() / exact[i].norm()))
        rows.append({"format": name, "bytes vs bf16 (D=%d)" % d: round(r, 4),
                     "bytes vs bf16 (D=128)": round(ratio(bits, km, vm, gv if gv != d else 128, 128), 4) if km else "-",
                     "err mean": round(sum(errs) / L, 5), "err max": round(max(errs), 5)})
        print(rows[-1], file=sys.stderr, flush=True)
    doc = {"bench": "kv_format_error", "date": date.today().isoformat(), "device": device_name(), "model": llm.name,
           "command": "python " + " ".join(sys.argv), "tokens": len(ids), "queries": args.queries,
           "layers": L, "kv_heads": hkv, "head_dim": d, "rows": rows}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    print_table(rows)


if __name__ == "__main__":
    main()
