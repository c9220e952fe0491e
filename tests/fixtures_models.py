"""Shared model fixtures: the real SmolLM2 GGUF (cached across runs) and tiny random HF checkpoints.

Fixtures are registered for every test by conftest.py (pytest_plugins); import write_tiny_checkpoint directly
(or list "fixtures_models" in conftest's pytest_plugins).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from offload.model.loaders.resolve import smollm2_gguf_path

TINY_COMMON = dict(
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)
TINY_ARCH_DEFAULTS = {
    "llama": dict(rope_theta=500000.0),
    "mistral": dict(rope_theta=1000000.0, sliding_window=None),
    "qwen2": dict(rope_theta=1000000.0),
}


@dataclass(frozen=True)
class TinyCheckpoint:
    path: Path  # the saved HF folder (config.json + safetensors)
    model: torch.nn.Module  # the transformers model whose weights were saved (float32, eval mode)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF, fetched by the runtime's own path once into OFFLOAD_CACHE."""
    return smollm2_gguf_path()


def smollm2_cpu_llm(path, ctx: int):
    """Generator body of a module fixture: the SmolLM2 GGUF on the CPU at `ctx`, with torch held to 2 threads (the
    CI machine's cores) while it lives."""
    from offload import LLM
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    model = LLM(str(path), device="cpu", ctx=ctx, show_progress=False)
    try:
        yield model
    finally:
        model.close()
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf):
    """transformers' own reading of the same GGUF: (model float32, tokenizer), the reference."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF (pip install accelerate)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(smollm2_gguf):
    """transformers' tokenizer for the SmolLM2 GGUF (no accelerate needed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


def write_tiny_checkpoint(tmp_path: Path, arch: str = "llama", *, max_shard_size=None, seed: int = 0,
                          **overrides) -> TinyCheckpoint:
    """Save a tiny random `arch` ("llama" | "mistral" | "qwen2") model with transformers' save_pretrained.

    Every tensor (norms and biases too) is randomized, so a swapped or skipped tensor shows up.
    `max_shard_size` (e.g. "40KB") forces a sharded save with model.safetensors.index.json.
    """
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    config_class, model_class = classes[arch]
    config = config_class(**{**TINY_COMMON, **TINY_ARCH_DEFAULTS[arch], **overrides})
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    folder = Path(tmp_path) / f"tiny-{arch}"
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return TinyCheckpoint(path=folder, model=model)


def run_session(llm, ids: list[int], n_prefill: int):
    """Prefill ids[:n_prefill], then step through the rest: (logits of every position [n, V], the session)."""
    sess = llm.session()
    out = [sess.prefill(ids[:n_prefill])]
    for t in ids[n_prefill:]:
        out.append(sess.step(t))
    return torch.stack(out), sess


# A tiny GQA checkpoint (2 KV heads), a 330-token prompt and its exact-attention run (logits, session):
# the shared baseline of the tiered / sparse / token-stage tests. A module that defines its own fixture of
# one of these names overrides it (pytest's nearest definition wins).
TIERED_OPTS = dict(device="cpu", ctx=512, chunk_tokens=8, sink_tokens=16, window_tokens=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiered"), "llama", num_key_value_heads=2)


@pytest.fixture(scope="module")
def ids(tiny):
    return torch.randint(0, tiny.model.config.vocab_size, (330,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def dense(tiny, ids):
    from offload import LLM
    return run_session(LLM(str(tiny.path), attention="full", **TIERED_OPTS), ids, 250)
