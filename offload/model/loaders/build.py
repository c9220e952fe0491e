"""From a model argument to a ready `LlamaModel`: describe first (config, tokenizer), load weights later.

Weights (`--weights`): auto keeps a GGUF file's quantized blocks on a GPU (dequantized on the CPU, which has
no quantized kernels here) and leaves other checkpoints in the compute dtype; bf16 dequantizes everything
at load (the compute dtype: bf16 on a GPU, fp32 on the CPU); q8_0 / q4 quantize every matrix at load to
Q8_0 / Q4_K, keeping a GGUF's blocks already in that class. q4 holds the output head (and an embedding tied
to it) in Q6_K, as llama.cpp's Q4_K_M does: on SmolLM2 a 4-bit tied head alone costs 12% of teacher-forced
top-1 agreement (bench/RESULTS.md, quantized weights).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from offload.model import qformats
from offload.model.config import ModelConfig
from offload.model.llama import LlamaModel
from offload.model.loaders import describe_model, load_checkpoint
from offload.model.loaders.checkpoint import normalize_hf_config, parameter_shapes
from offload.model.loaders.known_archs import known_model
from offload.errors import ModelLoadError
from offload.progress import progress_bar

WEIGHTS = ("auto", "bf16", "q8_0", "q4")
_FOUR_BIT = frozenset({"Q4_0", "Q4_1", "Q4_K"})


@dataclass(frozen=True)
class WeightPlan:
    """keep: GGUF types whose blocks stay as they are; quantize: the block format other matrices get;
    head_keep / head_quantize: the same for the output head (and the embedding when it is tied)."""
    keep: frozenset[str]
    quantize: str | None
    head_keep: frozenset[str]
    head_quantize: str | None

    def for_tensor(self, name: str, tied: bool) -> tuple[frozenset[str], str | None]:
        head = name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight")
        return (self.head_keep, self.head_quantize) if head else (self.keep, self.quantize)


def weight_plan(weights: str, device: torch.device) -> WeightPlan:
    if weights == "auto" and torch.device(device).type == "cuda":
        every = frozenset(qformats.SUPPORTED)
        return WeightPlan(every, None, every, None)
    if weights == "q8_0":
        return WeightPlan(frozenset({"Q8_0"}), "Q8_0", frozenset({"Q8_0"}), "Q8_0")
    if weights == "q4":
        return WeightPlan(_FOUR_BIT, "Q4_K", frozenset({"Q6_K", "Q8_0"}), "Q6_K")
    return WeightPlan(frozenset(), None, frozenset(), None)


def resolve(model: str, load_format: str = "auto"):
    """Config and tokenizer without weights (so the planner can refuse before anything big is loaded)."""
    return describe_model(model, torch.float32, load_format)


def _gguf_types(info) -> dict[str, str]:
    from offload.model.loaders.gguf_file import open_gguf, tensor_types
    src = getattr(info, "source", None)
    return tensor_types(open_gguf(src.path)) if src is not None and src.kind == "gguf" else {}


def planned_weight_bytes(info, mc: ModelConfig, dtype: torch.dtype, weights: str, device) -> int:
    """The device bytes the weights will take, from the headers alone (before loading): each matrix at its
    kept or target block size, the rest in dtype, plus one layer's dense scratch when any matrix is quantized
    (prefill dequantizes a layer's matrices into it). A GGUF type auto cannot keep is refused here."""
    plan = weight_plan(weights, device)
    types = _gguf_types(info)
    if types and plan.keep == frozenset(qformats.SUPPORTED):
        from offload.model.loaders.gguf_file import check_kept_types, open_gguf
        check_kept_types(open_gguf(info.source.path), info.source.path)
    size = torch.empty((), dtype=dtype).element_size()
    total, quantized = 0, False
    tied = info.hf_config["tie_word_embeddings"]
    for name, shape in parameter_shapes(info.hf_config).items():
        n = int(torch.Size(shape).numel())
        kind = types.get(name)
        keep, target = plan.for_tensor(name, tied)
        fmt = kind if kind in keep else qformats.fit(target, shape[-1])
        if len(shape) == 2 and fmt is not None:
            total += int(n * qformats.bits_per_weight(fmt) / 8)
            quantized = True
        else:
            total += n * size
    if quantized:
        H, I, D = mc.hidden_size, mc.intermediate_size, mc.head_dim
        total += size * H * ((mc.num_heads + 2 * mc.num_kv_heads) * D + mc.num_heads * D + 3 * I)
    return total


def build_model(info, mc: ModelConfig, device: torch.device, dtype: torch.dtype, load_format: str = "auto",
                show_progress: bool | None = None, weights: str = "auto") -> LlamaModel:
    """Weights onto the device, with a progress bar on stderr (reading the files, then one tick per layer)."""
    plan = weight_plan(weights, device)
    with progress_bar(f"loading {info.name}", mc.num_layers + 1, show_progress) as update:
        if load_format == "dummy":
            model = LlamaModel.random(mc, device, dtype, quantize=plan.quantize, head_quantize=plan.head_quantize)
        else:
            # quantizing a dense checkpoint: read it on the host, so the device never holds it whole
            where = "cpu" if plan.quantize and torch.device(device).type == "cuda" else device
            ckpt = load_checkpoint(info.source if info.source is not None else info.name, dtype, where,
                                   keep=plan.keep, keep_head=plan.head_keep)
            update(1)
            model = LlamaModel.from_state_dict(mc, dict(ckpt.state_dict), device, dtype,
                                               progress=lambda i: update(i + 2), quantize=plan.quantize,
                                               head_quantize=plan.head_quantize)
        update(mc.num_layers + 1)
    return model


def arch_config(alias: str) -> dict:
    """The published architecture of an alias as an HF config dict (for benchmarks' reference models)."""
    known = known_model(alias)
    if known is None:
        raise ModelLoadError(f"unknown alias {alias!r}; see offload.model.loaders.KNOWN_MODELS")
    return normalize_hf_config(known.config, torch.bfloat16, "the alias table")
