"""From a model argument to a ready `LlamaModel`: describe first (config, tokenizer), load weights later."""
from __future__ import annotations

import torch

from offload.model.config import ModelConfig
from offload.model.llama import LlamaModel
from offload.model.loaders import describe_model, load_checkpoint
from offload.model.loaders.checkpoint import normalize_hf_config
from offload.model.loaders.known_archs import known_model
from offload.errors import ModelLoadError
from offload.progress import progress_bar


def resolve(model: str, load_format: str = "auto"):
    """Config and tokenizer without weights (so the planner can refuse before anything big is loaded)."""
    return describe_model(model, torch.float32, load_format)


def build_model(info, mc: ModelConfig, device: torch.device, dtype: torch.dtype, load_format: str = "auto",
                show_progress: bool | None = None) -> LlamaModel:
    """Weights onto the device, with a progress bar on stderr (reading the files, then one tick per layer)."""
    with progress_bar(f"loading {info.name}", mc.num_layers + 1, show_progress) as update:
        if load_format == "dummy":
            model = LlamaModel.random(mc, device, dtype)
        else:
            ckpt = load_checkpoint(info.source if info.source is not None else info.name, dtype, device)
            update(1)
            model = LlamaModel.from_state_dict(mc, dict(ckpt.state_dict), device, dtype,
                                               progress=lambda i: update(i + 2))
        update(mc.num_layers + 1)
    return model


def arch_config(alias: str) -> dict:
    """The published architecture of an alias as an HF config dict (for benchmarks' reference models)."""
    known = known_model(alias)
    if known is None:
        raise ModelLoadError(f"unknown alias {alias!r}; see offload.model.loaders.KNOWN_MODELS")
    return normalize_hf_config(known.config, torch.bfloat16, "the alias table")
