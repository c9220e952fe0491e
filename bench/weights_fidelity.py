"""Accuracy cost of quantized weights (issue 16) on the real SmolLM2-135M-Instruct GGUF (Q4_1 + a Q8_0
embedding), teacher-forced over plain text, CPU float32.

    python bench/weights_fidelity.py [--tokens 2048] [--out bench/out/weights_fidelity.json]

Rows, each against the file dequantized at load (--weights bf16; float32 on the CPU):
  auto   the file's blocks kept (what a GPU runs with --weights auto); on the CPU the matmul dequantizes
         them, so this row checks that keeping the blocks changes nothing (the GPU's GEMV kernel accumulates
         in float32 from the same blocks: its difference is the kernel's rounding, tested in test_qweights)
  q8_0   every matrix requantized to Q8_0 (from the dequantized 4-bit weights)
  q4     --weights q4 on this file: its 4-bit blocks kept, the Q8_0 head (tied embedding) kept
  q4-requant  every layer matrix requantized from the dequantized weights to Q4_K (Q4_1 where 576-wide rows
         are not whole Q4_K super-blocks), the head to Q6_K (Q8_0 here, same reason): what --weights q4 does
         to a dense checkpoint, applied on top of the file's own 4-bit rounding (an upper bound)
  q4-head4  as q4-requant with the head in 4 bits too (why --weights q4 keeps the head in Q6_K)
Top-1 agreement over every position and KL(reference || row) per position, mean.

    python bench/weights_fidelity.py --device cuda [--tokens 2048]

On a GPU: the file's blocks kept (--weights auto: every step one GEMV kernel per matrix, in the step's CUDA
graph) against the same file dequantized to bf16 at load (--weights bf16), both decoding the text token by
token (teacher-forced): the issue-16 goal is >= 99.5% top-1 agreement. Needs the SmolLM2 GGUF in OFFLOAD_CACHE.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, write_results  # noqa: E402
from fidelity_data import haystack_ids, teacher_text_ids  # noqa: E402


def forward_all(model, ids: list[int]) -> torch.Tensor:
    """Logits of every position: [T, V] (one prefill pass, all positions kept)."""
    from offload.engine.dense import DenseAttention
    cfg = model.cfg
    attn = DenseAttention(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, len(ids), "cpu", model.dtype)
    cos, sin = model.rope(torch.arange(len(ids)))
    x = model.embed[torch.tensor(ids)].to(model.dtype)  # x: [T, H]
    attn.begin(len(ids))
    with torch.inference_mode():
        for i in range(cfg.num_layers):
            x = model.layer_forward(i, x, cos, sin, attn)
        out = model.logits(x)
    attn.end()
    return out


def gpu_rows(args) -> None:
    """Teacher-forced decode on the GPU: blocks kept (GEMV kernels) against the file dequantized to bf16."""
    from offload import LLM
    logits = {}
    for weights in ("bf16", "auto", "q8_0", "q4"):
        llm = LLM("smollm2-135m", device=args.device, ctx=args.tokens + 16, attention="full", weights=weights,
                  show_progress=False)
        if weights == "bf16":
            ids = teacher_text_ids(llm.tokenizer, haystack_ids(llm.tokenizer), args.tokens, 0)
        sess = llm.session()
        out = [sess.prefill(ids[:1])] + [sess.step(t) for t in ids[1:]]   # position i predicts token i + 1
        logits[weights] = (torch.stack(out).float().cpu(), llm.model.weight_format, llm.stats.get("decode_mode"))
        sess.close()
        llm.close()
        del llm, sess
        torch.cuda.empty_cache()
    ref = logits["bf16"][0]
    ref_logp = ref.log_softmax(-1)
    rows = []
    for weights, (got, fmt, mode) in logits.items():
        kl = (ref_logp.exp() * (ref_logp - got.log_softmax(-1))).sum(-1)
        rows.append({"weights": weights, "formats": fmt, "decode_mode": mode, "tokens": len(ids),
                     "top1_agree_vs_bf16_twin": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
                     "kl_mean": float(kl.mean()), "max_abs_logit_diff": float((got - ref).abs().max())})
        print(rows[-1], flush=True)
    write_results("weights_fidelity_gpu", rows, args.out, {"args": vars(args), "reference": "file dequantized, bf16"})


def main() -> None:
    from offload.model.config import ModelConfig
    from offload.model.llama import LlamaModel
    from offload.model.loaders import load_checkpoint
    from offload.model.loaders.build import WeightPlan, weight_plan
    from offload.model.loaders.resolve import smollm2_gguf_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default="bench/out/weights_fidelity.json")
    args = ap.parse_args()
    if args.device == "cuda":
        return gpu_rows(args)
    path = smollm2_gguf_path()

    def model(plan):
        ckpt = load_checkpoint(str(path), torch.float32, "cpu", keep=plan.keep, keep_head=plan.head_keep)
        mc = ModelConfig.from_hf(ckpt.hf_config)
        return LlamaModel.from_state_dict(mc, dict(ckpt.state_dict), torch.device("cpu"), torch.float32,
                                          quantize=plan.quantize, head_quantize=plan.head_quantize), ckpt.tokenizer

    none = frozenset()
    ref_model, tok = model(weight_plan("bf16", "cpu"))
    ids = teacher_text_ids(tok, haystack_ids(tok), args.tokens, 0)
    ref = forward_all(ref_model, ids)
    ref_logp = ref.log_softmax(-1)
    variants = {"auto": weight_plan("auto", "cuda"), "q8_0": weight_plan("q8_0", "cpu"), "q4": weight_plan("q4", "cpu"),
                "q4-requant": WeightPlan(none, "Q4_K", none, "Q6_K"), "q4-head4": WeightPlan(none, "Q4_K", none, "Q4_K")}
    rows = []
    for name, plan in variants.items():
        t0 = time.perf_counter()
        m, _ = model(plan)
        got = forward_all(m, ids)
        kl = (ref_logp.exp() * (ref_logp - got.log_softmax(-1))).sum(-1)
        row = {"weights": name, "formats": m.weight_format, "head": "+".join(m.lm_head.formats)
               if hasattr(m.lm_head, "formats") else str(m.lm_head.dtype), "weight_mib": m.weight_bytes / 2**20, "tokens": len(ids),
               "top1_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
               "kl_mean": float(kl.mean()), "max_abs_logit_diff": float((got - ref).abs().max()),
               "bit_equal": bool(torch.equal(got, ref)), "s": time.perf_counter() - t0}
        rows.append(row)
        print(row, flush=True)
    write_results("weights_fidelity", rows, args.out, {"args": vars(args), "reference": "file dequantized, fp32",
                                                        "device": device_name()})


if __name__ == "__main__":
    main()
