"""What every loader returns, and the one place that checks a config and a state dict against each other.

hf_config is a transformers-style dict whatever the source (HF folder, GGUF, alias table), normalized so
the model code reads one spelling: rope_theta + rope_scaling (never transformers 5's rope_parameters),
head_dim and num_key_value_heads always present, attention_bias explicit (Qwen2 has q/k/v biases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Defaults of transformers' config classes for keys a config.json may leave out.
_MAX_POSITIONS_DEFAULT = {"llama": 2048, "mistral": 131072, "qwen2": 32768}
_VOCAB_DEFAULT = {"llama": 32000, "mistral": 32000, "qwen2": 151936}


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A model ready to build: normalized config, HF-named tensors (dtype/device as asked), tokenizer."""

    hf_config: dict
    state_dict: dict[str, torch.Tensor]
    tokenizer: "object | None"  # offload.model.tokenizer.Tokenizer


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rope_fields(raw: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either transformers 4 or 5 spelling."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        # transformers 5 folds theta and scaling into one dict (per layer type for hybrid models).
        if "full_attention" in params and isinstance(params["full_attention"], dict):
            params = params["full_attention"]
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = dict(raw["rope_scaling"]) if isinstance(raw.get("rope_scaling"), dict) else {}
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def normalize_hf_config(raw: dict, dtype: torch.dtype, source: str = "config.json") -> dict:
    """The contract's config dict from a config.json-like dict; unsupported architectures raise."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"unsupported model_type {model_type!r} in {source}; offload runs Llama-family decoders "
            f"({', '.join(SUPPORTED_MODEL_TYPES)}): pick such a model"
        )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"hidden_act {act!r} in {source} is not supported (only silu); pick a Llama-family model")
    try:
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        layers, inter = int(raw["num_hidden_layers"]), int(raw["intermediate_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"{source} lacks a valid {exc}; re-download the model's config.json") from None
    theta, scaling = _rope_fields(raw)
    sliding = raw.get("sliding_window")
    if model_type == "qwen2" and not raw.get("use_sliding_window", False):
        sliding = None  # Qwen2 declares a window but only uses it when use_sliding_window is true
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(raw.get("num_key_value_heads") or heads),
        "head_dim": int(raw.get("head_dim") or hidden // heads),
        "rms_norm_eps": float(raw.get("rms_norm_eps", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": int(raw.get("max_position_embeddings") or _MAX_POSITIONS_DEFAULT[model_type]),
        "vocab_size": int(raw.get("vocab_size") or _VOCAB_DEFAULT[model_type]),
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "attention_bias": True if model_type == "qwen2" else bool(raw.get("attention_bias", False)),
        "mlp_bias": bool(raw.get("mlp_bias", False)),
        "sliding_window": sliding,
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_id": raw.get("eos_token_id"),
        "torch_dtype": dtype_name(dtype),
    }


def parameter_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter the Llama-family decoder needs, by HF name (lm_head absent when tied)."""
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_out = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_out = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(cfg["num_hidden_layers"]):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        shapes[f"{attn}.q_proj.weight"] = (q_out, hidden)
        shapes[f"{attn}.k_proj.weight"] = (kv_out, hidden)
        shapes[f"{attn}.v_proj.weight"] = (kv_out, hidden)
        shapes[f"{attn}.o_proj.weight"] = (hidden, q_out)
        if cfg["attention_bias"]:
            shapes[f"{attn}.q_proj.bias"] = (q_out,)
            shapes[f"{attn}.k_proj.bias"] = (kv_out,)
            shapes[f"{attn}.v_proj.bias"] = (kv_out,)
            if cfg["model_type"] == "llama":  # Llama's attention_bias also covers o_proj; Qwen2's does not
                shapes[f"{attn}.o_proj.bias"] = (hidden,)
        shapes[f"{mlp}.gate_proj.weight"] = (inter, hidden)
        shapes[f"{mlp}.up_proj.weight"] = (inter, hidden)
        shapes[f"{mlp}.down_proj.weight"] = (hidden, inter)
        if cfg["mlp_bias"]:
            shapes[f"{mlp}.gate_proj.bias"] = (inter,)
            shapes[f"{mlp}.up_proj.bias"] = (inter,)
            shapes[f"{mlp}.down_proj.bias"] = (hidden,)
        shapes[f"model.layers.{layer}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{layer}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


# Tensors a checkpoint may carry that hold no parameter: rotary inv_freq buffers (old transformers saves).
_NOT_PARAMETERS = ("rotary_emb.inv_freq",)


def check_shapes(cfg: dict, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Every parameter the config implies is there with its shape, and nothing else is: a config whose layer
    count or vocabulary disagrees with the weights would otherwise load and produce garbage."""
    expected = parameter_shapes(cfg)
    for name, shape in expected.items():
        if name not in shapes:
            raise ModelLoadError(f"{source} has no tensor {name!r} that its config implies "
                                 f"({cfg['num_hidden_layers']} layers); config and weights do not belong together: "
                                 "re-download the model")
        if tuple(shapes[name]) != shape:
            raise ModelLoadError(
                f"{source}: {name} has shape {tuple(shapes[name])}, the config says {shape}; "
                "config and weights do not belong together: re-download the model"
            )
    tied_copy = "lm_head.weight" if cfg["tie_word_embeddings"] else None   # a saved copy of a tied head
    extra = sorted(n for n in shapes if n not in expected and n != tied_copy and not n.endswith(_NOT_PARAMETERS))
    if extra:
        raise ModelLoadError(f"{source} holds {len(extra)} tensor(s) its config does not use (first: {extra[0]!r}; "
                             f"config: {cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}); config and "
                             "weights do not belong together: re-download the model")


def check_state_dict(cfg: dict, state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Exactly the decoder's parameters (see check_shapes); a missing, misshapen or left-over tensor raises."""
    check_shapes(cfg, {name: tuple(t.shape) for name, t in state_dict.items()}, source)
    return {name: state_dict[name] for name in parameter_shapes(cfg)}
