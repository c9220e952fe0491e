"""From a model argument to a ready `LlamaModel`: describe first (config, tokenizer), load weights later."""
from __future__ import annotations

import torch

from offload.model.config import ModelConfig
from offload.model.llama import LlamaModel
from offload.model.loaders import describe_model, load_checkpoint
from offload.model.loaders.checkpoint import normalize_hf_config
from offload.model.loaders.known_archs import known_model
from offload.errors import ModelLoadError


def resolve(model: str, load_format: str = "auto"):
    """Config and tokenizer without weights (so the planner can refuse before anything big is loaded)."""
    return describe_model(model, torch.float32, load_format)


def build_model(info, mc: ModelConfig, device: torch.device, dtype: torch.dtype, load_format: str = "auto") -> LlamaModel:
    if load_format == "dummy":
        return LlamaModel.random(mc, device, dtype)
    ckpt = load_checkpoint(info.source if info.source is not None else info.name, dtype, device)
    return LlamaModel.from_state_dict(mc, dict(ckpt.state_dict), device, dtype)


def arch_config(alias: str) -> dict:
    """The published architecture of an alias as an HF config dict (for benchmarks' reference models)."""
    known = known_model(alias)
    if known is None:
        raise ModelLoadError(f"unknown alias {alias!r}; see offload.model.loaders.KNOWN_MODELS")
    return normalize_hf_config(known.config, torch.bfloat16, "the alias table")
