"""load_format="dummy": a model's real architecture with random weights, for benchmarks at full scale."""

from __future__ import annotations

import torch

from offload.model.loaders.checkpoint import LoadedCheckpoint, dtype_name, parameter_shapes
from offload.model.loaders.describe import ModelInfo, describe_model
from offload.model.tokenizer import byte_level_tokenizer

INIT_STD = 0.02  # transformers' initializer_range: keeps activations finite through many layers


def dummy_checkpoint(
    model=None, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0
) -> LoadedCheckpoint:
    """Random weights (matrices ~ N(0, 0.02), norms 1, biases 0) in the architecture of `model`.

    `model`: an alias (no files needed), a path, a ModelSource or a ModelInfo. The tokenizer is the
    model's own when its files are local, else a byte-level stand-in (ids 0..255) so text still works.
    """
    info = model if isinstance(model, ModelInfo) else describe_model(model, dtype, load_format="dummy")
    cfg = {**info.hf_config, "torch_dtype": dtype_name(dtype)}
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    state_dict: dict[str, torch.Tensor] = {}
    for name, shape in parameter_shapes(cfg).items():
        tensor = torch.empty(shape, dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        elif name.endswith(".bias"):
            tensor.zero_()
        else:
            tensor.normal_(0.0, INIT_STD, generator=generator)
        state_dict[name] = tensor
    tokenizer = info.tokenizer
    if tokenizer is None:
        eos = cfg["eos_token_id"]
        tokenizer = byte_level_tokenizer(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return LoadedCheckpoint(hf_config=cfg, state_dict=state_dict, tokenizer=tokenizer)
