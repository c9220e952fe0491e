"""Architecture of a Llama-family checkpoint (Llama 2/3/3.1, Mistral, Qwen2), read from an HF-style config dict."""
from __future__ import annotations

from dataclasses import dataclass, field

from offload.errors import ModelLoadError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"model_type {self.model_type!r} is not supported; offload runs {', '.join(SUPPORTED_TYPES)} checkpoints")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}; fix config.json")

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        try:
            model_type = cfg.get("model_type", "llama")
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
            scaling = cfg.get("rope_scaling")
            theta = cfg.get("rope_theta")
            if theta is None and isinstance(cfg.get("rope_parameters"), dict):
                # transformers >= 5 nests rope settings under rope_parameters
                params = cfg["rope_parameters"]
                theta = params.get("rope_theta")
                if params.get("rope_type", "default") != "default":
                    scaling = params
            if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
                scaling = None
            return cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta if theta is not None else 10000.0),
                rope_scaling=dict(scaling) if scaling else None,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"config.json is missing or has a bad field ({e}); use a complete HF config") from None
