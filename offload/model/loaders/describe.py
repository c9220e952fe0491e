"""A model's architecture and tokenizer without its weights: what planning needs before loading."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from offload.errors import ModelLoadError
from offload.model.loaders.checkpoint import check_shapes, normalize_hf_config
from offload.model.loaders.known_archs import DEFAULT_ALIAS, known_model


@dataclass(frozen=True)
class ModelInfo:
    """name: what the user asked for; source: the local files (None for a dummy alias, which needs none)."""

    name: str
    source: "object | None"  # offload.model.loaders.resolve.ModelSource
    hf_config: dict = field(hash=False)
    tokenizer: "object | None" = field(default=None, hash=False)  # offload.model.tokenizer.Tokenizer


def _local_tokenizer(name: str):
    """The alias's real tokenizer when its files are already local (never fetches), else None."""
    from offload.model.loaders.gguf_file import open_gguf
    from offload.model.loaders.gguf_tokenizer import gguf_tokenizer
    from offload.model.loaders.resolve import SMOLLM2_MEMBER, find_in_hf_cache, offload_cache_dir
    from offload.model.tokenizer import load_hf_tokenizer

    known = known_model(name)
    if known.alias == DEFAULT_ALIAS:
        cached = offload_cache_dir() / Path(SMOLLM2_MEMBER).name
        return gguf_tokenizer(open_gguf(cached), cached) if cached.is_file() else None
    snapshot = find_in_hf_cache(known.repo_id)
    return load_hf_tokenizer(snapshot) if snapshot is not None and snapshot.is_dir() else None


def describe_model(model=None, dtype: torch.dtype = torch.float32, load_format: str = "auto") -> ModelInfo:
    """Config dict + tokenizer of `model` (path, alias, repo id, ModelSource; None = smollm2-135m).

    With load_format="dummy" an alias is described from the alias table alone: no file is read or
    fetched, and the tokenizer is the real one only if it is already local.
    """
    from offload.model.loaders.gguf_file import gguf_hf_config, header_shapes, open_gguf
    from offload.model.loaders.gguf_tokenizer import gguf_tokenizer
    from offload.model.loaders.hf_dir import header_shapes as hf_header_shapes
    from offload.model.loaders.hf_dir import read_hf_config
    from offload.model.loaders.resolve import ModelSource, resolve_model
    from offload.model.tokenizer import load_hf_tokenizer

    model = DEFAULT_ALIAS if model is None else model
    if load_format == "dummy" and isinstance(model, str) and known_model(model) is not None:
        cfg = normalize_hf_config(known_model(model).config, dtype, "the alias table")
        return ModelInfo(known_model(model).alias, None, cfg, _local_tokenizer(model))
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    if source.kind == "gguf":
        reader = open_gguf(source.path)
        cfg = gguf_hf_config(reader, dtype, source.path)
        check_shapes(cfg, header_shapes(reader), str(source.path))   # weights agree with the config, before planning
        return ModelInfo(source.name, source, cfg, gguf_tokenizer(reader, source.path))
    if source.kind == "hf_dir":
        cfg = normalize_hf_config(read_hf_config(source.path), dtype, str(source.path / "config.json"))
        check_shapes(cfg, hf_header_shapes(source.path), str(source.path))
        eos = cfg["eos_token_id"]
        return ModelInfo(source.name, source, cfg,
                         load_hf_tokenizer(source.path, eos if isinstance(eos, list) else [eos] if eos else []))
    raise ModelLoadError(f"unknown model source kind {source.kind!r}; pass a folder, a .gguf file or an alias")
