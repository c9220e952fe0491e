"""Teacher forcing of token-stage variants that are not runtime options (yet): where a token-mass budget loses.

    python bench/token_stage_variants.py --variants base,perhead,resid --method "summary-max@10%/16+tok8m0.97f64"
        [--continuation 512] [--out bench/results/token_stage_variants.json]

Each variant runs METHOD (bench/fidelity_sessions.py) with the token stage patched for the length of its run
(module attributes, as fidelity_sessions.TOKEN_PICKS patches select_tokens; the runtime is unchanged):
    base      the runtime's rule: tokens ranked by the query group's summed softmax share, kept until the group's
              MEAN estimated mass (sinks + window + tail + picks) reaches p, at least the floor
    perhead   the same ranking, kept until EVERY query head of the group reaches p
    maxp      ranked by the largest share any query head of the group gives a token; kept until every head reaches p
    resid     base's picks, plus the dropped candidates' exact softmax weights carried with their chunk's mean value
              (the candidates' keys are scored anyway; a per-chunk mean of V would be the only new metadata)
    gmean     as resid, with one mean value per KV head over all candidate chunks instead of each chunk's
Reports top-1 agreement with full attention, KL(full || variant) mean / p99, tokens per head per step.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fidelity_sessions import fork, parse_methods  # noqa: E402
from fidelity_teacher import run_teacher  # noqa: E402

import offload.kernels as kernels  # noqa: E402
import offload.kernels.tokens as tokens  # noqa: E402
from offload import LLM  # noqa: E402

MODE = {"v": "base"}
_INNER_SELECT = tokens.select_tokens
_INNER_ATTEND = kernels.token_attend


def _probs(q, keys, valid, scale, base_lse, logits):
    """Exact softmax shares of every candidate per query head, normalised with what is attended anyway:
    -> (s [Hkv, G, M] logits, p [Hkv, G, M], base [Hkv, G] share of sinks + window + tail)."""
    hkv, m = valid.shape
    g = q.shape[0] // hkv
    if logits is None:
        s = torch.einsum("hgd,hmd->hgm", q.float().reshape(hkv, g, -1), keys.float()) * scale  # s: [Hkv, G, M]
    else:
        s = logits.float()
    s = s.masked_fill(~valid[:, None], float("-inf"))
    norm = torch.logaddexp(torch.logsumexp(s, -1), base_lse.float().reshape(hkv, g))            # norm: [Hkv, G]
    p = torch.exp(s - norm[..., None])                                                           # p: [Hkv, G, M]
    return s, p, torch.exp(base_lse.float().reshape(hkv, g) - norm)


def select_variant(q, keys, valid, k, scale, group_reduce="sum", base_lse=None, mass=0.0, floor=0, logits=None):
    mode = MODE["v"]
    if mass == 0 or mode in ("base", "resid"):
        return _INNER_SELECT(q, keys, valid, k, scale, group_reduce, base_lse, mass, floor, logits)
    _, p, base = _probs(q, keys, valid, scale, base_lse, logits)                  # p: [Hkv, G, M], base: [Hkv, G]
    g = p.shape[1]
    r = p.sum(1) if mode == "perhead" else p.amax(1)                              # r: [Hkv, M]
    r = r.masked_fill(~valid, float("-inf"))
    top = torch.topk(r, min(k, r.shape[1]), dim=1, sorted=True)                   # best first
    idx = top.indices                                                             # idx: [Hkv, k']
    ok = valid.gather(1, idx)                                                     # ok: [Hkv, k']
    pk = p.gather(2, idx[:, None, :].expand(-1, g, -1)) * ok[:, None]             # pk: [Hkv, G, k']
    before = base[..., None] + torch.cumsum(pk, -1) - pk                          # before: [Hkv, G, k']
    rank = torch.arange(idx.shape[1])
    keep = (before < mass).any(1) | (rank < floor)[None]                          # keep: [Hkv, k']
    return idx, ok & keep


def attend_variant(q, parts, k, scale, group_reduce="sum", base_lse=None, packed=None, mass=0.0, floor=0,
                   logits=None):
    if MODE["v"] not in ("resid", "gmean") or not parts:
        return _INNER_ATTEND(q, parts, k, scale, group_reduce, base_lse, packed, mass, floor, logits)
    hq, d = q.shape
    hkv = parts[0][0].shape[2]
    C = parts[0][0].shape[3]
    keys, valid = tokens.gather_candidate_keys(parts, hkv, q.device, packed)       # keys: [Hkv, M, D]
    idx, ok = tokens.select_tokens(q, keys, valid, k, scale, group_reduce, base_lse, mass, floor)
    ksel = keys.gather(1, idx[..., None].expand(-1, -1, d))                       # ksel: [Hkv, k', D]
    vsel = tokens.gather_picked_rows(parts, idx, ok, 1, ksel.dtype, packed)       # vsel: [Hkv, k', D]
    o, lse = tokens._attend(q, ksel, vsel, ok, scale)                             # o: [Hq, D], lse: [Hq]
    # the dropped candidates: exact logits, their chunk's mean value
    vals = None
    for pool, slots, alt in parts:
        v = tokens._rows(pool, slots.to(q.device), 1, None, alt, packed)          # v: [Hkv, M, D]
        vals = v if vals is None else vals.add_(v)
    m = valid.shape[1]
    vmean = vals.float().view(hkv, m // C, C, d).mean(2)                          # vmean: [Hkv, K, D]
    if MODE["v"] == "gmean":   # one mean value per KV head over every candidate chunk (~ a running mean of all V)
        held = (valid.view(hkv, m // C, C).any(-1)).float()                       # held: [Hkv, K]
        mean = (vmean * held[..., None]).sum(1) / held.sum(1).clamp(min=1)[:, None]  # mean: [Hkv, D]
        vmean = mean[:, None].expand_as(vmean)
    chosen = torch.zeros_like(valid).scatter_(1, idx, ok)                         # chosen: [Hkv, M]
    dropped = valid & ~chosen                                                     # dropped: [Hkv, M]
    g = hq // hkv
    s = torch.einsum("hgd,hmd->hgm", q.float().reshape(hkv, g, d), keys.float()) * scale  # s: [Hkv, G, M]
    s = s.masked_fill(~dropped[:, None], float("-inf"))
    lse_r = torch.logsumexp(s, -1)                                                # lse_r: [Hkv, G]
    w = torch.exp(s - torch.where(torch.isinf(lse_r), 0.0, lse_r)[..., None])     # w: [Hkv, G, M]
    wc = w.view(hkv, g, m // C, C).sum(-1)                                        # wc: [Hkv, G, K]
    o_r = torch.einsum("hgk,hkd->hgd", wc, vmean).reshape(hq, d)                  # o_r: [Hq, D]
    return kernels.merge_attn(o, lse, o_r, lse_r.reshape(hq))


class Variant:
    """A method run with the token stage in one MODE (bench/fidelity_variants.fork_any calls .fork)."""

    def __init__(self, method, mode: str):
        self.method, self.mode = method, mode

    @property
    def label(self) -> str:
        return f"{self.method.label}:{self.mode}"

    def __getattr__(self, name):
        return getattr(self.method, name)

    def fork(self, base):
        MODE["v"] = self.mode
        return fork(base, self.method)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="summary-max@10%/16+tok8m0.97f64")
    ap.add_argument("--variants", default="base,perhead,maxp,resid")
    ap.add_argument("--model", default="/root/.cache/offload/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--teacher-context", type=int, default=8192 - 512)
    ap.add_argument("--continuation", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.build_query_stride = 16
    args.out = args.out or "/tmp/token_stage_variants.json"
    torch.set_num_threads(args.threads)
    tokens.select_tokens, kernels.token_attend = select_variant, attend_variant
    llm = LLM(args.model, device="cpu", dtype="float32", ctx="8K", show_progress=False, cuda_graph=False)
    if "::" in args.method:     # METHOD::VARIANT pairs, e.g. "summary-max@10%/16+tok8m0.95f64::perhead,...::base"
        pairs = [item.split("::") for item in args.method.split(",")]
        methods = [Variant(parse_methods(m)[0], v) for m, v in pairs]
    else:
        methods = [Variant(m, v) for m in parse_methods(args.method) for v in args.variants.split(",")]
    t0 = time.perf_counter()
    doc, _ = run_teacher(llm, args, methods, capture=False,
                         log=lambda s: print(f"[{time.perf_counter() - t0:6.0f}s] {s}", flush=True))
    for r in doc["rows"]:
        print({k: r.get(k) for k in ("method", "top1_agree", "kl_mean", "kl_p99", "tokens_per_head")}, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"bench": "token_stage_variants", "command": "python " + " ".join(sys.argv),
                                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                              "device": "CPU", "threads": args.threads, "teacher": doc}, indent=1))


if __name__ == "__main__":
    main()
