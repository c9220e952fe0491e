"""Weight loaders: every source becomes one LoadedCheckpoint (HF config dict, HF-named tensors, tokenizer).

    ckpt = load_checkpoint("smollm2-135m")                       # resolve + load, float32 on CPU
    ckpt = load_checkpoint("llama3-8b", torch.bfloat16, "cuda", load_format="dummy")
    info = describe_model("llama3-8b")                           # config + tokenizer, no weights
"""

from __future__ import annotations

import torch

from offload.errors import ConfigError, ModelLoadError
from offload.model.loaders.checkpoint import (
    SUPPORTED_MODEL_TYPES,
    LoadedCheckpoint,
    normalize_hf_config,
    parameter_shapes,
)
from offload.model.loaders.describe import ModelInfo, describe_model
from offload.model.loaders.dummy import dummy_checkpoint
from offload.model.loaders.known_archs import DEFAULT_ALIAS, KNOWN_MODELS

LOAD_FORMATS = ("auto", "dummy")


def load_checkpoint(
    model=None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    load_format: str = "auto",
    keep: frozenset[str] = frozenset(),
    keep_head: frozenset[str] | None = None,
) -> LoadedCheckpoint:
    """Load `model` as `dtype` on `device`.

    model: a path, alias, cached repo id, ModelSource or ModelInfo; None means smollm2-135m.
    keep: GGUF block types whose matrices stay quantized (QuantWeight values; see model/loaders/build.py);
    keep_head: the same for the output head (and a tied embedding), None: as keep.
    """
    from offload.model.loaders.gguf_file import load_gguf
    from offload.model.loaders.hf_dir import load_hf_dir
    from offload.model.loaders.resolve import ModelSource, resolve_model

    if load_format not in LOAD_FORMATS:
        raise ConfigError(f"load_format {load_format!r} is not one of {', '.join(LOAD_FORMATS)}; pick one of them")
    if load_format == "dummy":
        return dummy_checkpoint(model, dtype, device)
    if isinstance(model, ModelInfo):
        model = model.source if model.source is not None else model.name
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    if source.kind == "gguf":
        return load_gguf(source.path, dtype, device, keep, keep_head)
    if source.kind == "hf_dir":
        return load_hf_dir(source.path, dtype, device)
    raise ModelLoadError(f"unknown model source kind {source.kind!r}; pass a folder, a .gguf file or an alias")


__all__ = [
    "DEFAULT_ALIAS",
    "KNOWN_MODELS",
    "LOAD_FORMATS",
    "SUPPORTED_MODEL_TYPES",
    "LoadedCheckpoint",
    "ModelInfo",
    "describe_model",
    "dummy_checkpoint",
    "load_checkpoint",
    "normalize_hf_config",
    "parameter_shapes",
]
