"""Weight loaders against transformers: bit-identical HF folders, GGUF equal to transformers' own reading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fixtures_models import write_tiny_checkpoint
from offload.errors import ModelLoadError
from offload.model.loaders.gguf_file import llama3_rope_factors, load_gguf, unpermute_rotary_rows
from offload.model.loaders import KNOWN_MODELS, describe_model, load_checkpoint, parameter_shapes

CONFIG_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings")


def _reference_state(model, tied: bool) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if tied:
        state.pop("lm_head.weight")
    return state


def _assert_config_matches(cfg: dict, hf_config) -> None:
    for name in CONFIG_FIELDS:
        assert cfg[name] == getattr(hf_config, name), name
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    assert cfg["head_dim"] == head_dim
    assert cfg["rms_norm_eps"] == pytest.approx(hf_config.rms_norm_eps)
    assert cfg["rope_theta"] == pytest.approx(hf_config.rope_parameters["rope_theta"])


@pytest.mark.parametrize(
    "arch, overrides, shard",
    [
        ("llama", {}, None),
        ("llama", {"tie_word_embeddings": True}, "40KB"),
        ("mistral", {}, "60KB"),
        ("qwen2", {}, None),
    ],
)
def test_hf_folder_is_bit_identical(tmp_path, arch, overrides, shard):
    tiny = write_tiny_checkpoint(tmp_path, arch, max_shard_size=shard, **overrides)
    if shard:
        assert (tiny.path / "model.safetensors.index.json").is_file()
    ckpt = load_checkpoint(str(tiny.path))
    reference = _reference_state(tiny.model, tiny.model.config.tie_word_embeddings)
    assert sorted(ckpt.state_dict) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(ckpt.state_dict[name], tensor), name
    _assert_config_matches(ckpt.hf_config, tiny.model.config)
    assert ckpt.hf_config["model_type"] == arch
    assert ckpt.hf_config["attention_bias"] is (arch == "qwen2")
    assert ckpt.tokenizer is None  # no tokenizer.json was saved


def test_hf_folder_dtype_and_llama3_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
    tiny = write_tiny_checkpoint(tmp_path, "llama", rope_scaling=dict(scaling))  # transformers edits it
    ckpt = load_checkpoint(tiny.path, dtype=torch.bfloat16)
    assert ckpt.hf_config["rope_scaling"] == scaling
    assert ckpt.hf_config["torch_dtype"] == "bfloat16"
    for name, tensor in tiny.model.state_dict().items():
        assert ckpt.state_dict[name].dtype == torch.bfloat16
        assert torch.equal(ckpt.state_dict[name], tensor.to(torch.bfloat16)), name


def test_smollm2_gguf_matches_transformers(smollm2_gguf, smollm2_transformers):
    model, _ = smollm2_transformers
    ckpt = load_gguf(smollm2_gguf, torch.float32, "cpu")
    reference = _reference_state(model, tied=True)
    assert sorted(ckpt.state_dict) == sorted(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(ckpt.state_dict[name], tensor, rtol=0, atol=1e-6, msg=name)
    _assert_config_matches(ckpt.hf_config, model.config)
    # The alias table's published architecture agrees with the file.
    alias = describe_model("smollm2-135m", load_format="dummy").hf_config
    for name in CONFIG_FIELDS + ("rope_theta", "bos_token_id", "eos_token_id"):
        assert alias[name] == ckpt.hf_config[name], name


def _llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf's q/k row order: per head, interleave the two rotary halves."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def test_unpermute_inverts_llama_cpp_permutation():
    weight = np.random.default_rng(0).standard_normal((3 * 64, 40)).astype(np.float32)
    bias = np.arange(3 * 64, dtype=np.float32)
    restored = unpermute_rotary_rows(torch.from_numpy(_llama_cpp_permute(weight, 3)), 3)
    assert torch.equal(restored, torch.from_numpy(weight))
    assert torch.equal(unpermute_rotary_rows(torch.from_numpy(_llama_cpp_permute(bias, 3)), 3), torch.from_numpy(bias))


def _write_tiny_gguf(path, model, rope_freqs=None, arch="llama", block_count=None, extra=None):
    """A GGUF the way llama.cpp's converter writes one: HF tensors renamed, Llama's q/k rows permuted."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers if block_count is None else block_count)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([chr(0x100 + i) for i in range(cfg.vocab_size)])
    writer.add_token_types([1] * cfg.vocab_size)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for name, tensor in model.state_dict().items():
        array = tensor.numpy().copy()
        if name.startswith("model.layers."):
            layer, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
            out_name = f"blk.{layer}.{parts[rest]}.{name.split('.')[-1]}"
            if rest.endswith("q_proj") and arch == "llama":
                array = _llama_cpp_permute(array, cfg.num_attention_heads)
            elif rest.endswith("k_proj") and arch == "llama":
                array = _llama_cpp_permute(array, cfg.num_key_value_heads)
        else:
            out_name = names[name]
        if out_name == "token_embd.weight":
            array = array.astype(np.float16)  # exercise the F16 path
        writer.add_tensor(out_name, array)
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # Qwen2's converter does not permute; it has q/k/v biases
def test_gguf_round_trip_restores_hf_rows(tmp_path, arch):
    tiny = write_tiny_checkpoint(tmp_path, arch)
    _write_tiny_gguf(tmp_path / "tiny.gguf", tiny.model, arch=arch)
    ckpt = load_checkpoint(str(tmp_path / "tiny.gguf"))
    assert ckpt.hf_config["model_type"] == arch and ckpt.hf_config["attention_bias"] is (arch == "qwen2")
    for name, tensor in tiny.model.state_dict().items():
        expected = tensor.half().float() if name == "model.embed_tokens.weight" else tensor
        assert torch.equal(ckpt.state_dict[name], expected), name
    _assert_config_matches(ckpt.hf_config, tiny.model.config)


def test_gguf_rope_freqs_become_llama3_scaling(tmp_path):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    tiny = write_tiny_checkpoint(tmp_path, "llama", rope_scaling=dict(scaling), max_position_embeddings=65536,
                                 hidden_size=512, num_attention_heads=4, intermediate_size=64)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](tiny.model.config)
    plain = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    factors = (plain / scaled.double()).numpy()  # transformers' Llama 3.1 wavelength multipliers
    np.testing.assert_allclose(llama3_rope_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192), factors, rtol=1e-5)
    _write_tiny_gguf(tmp_path / "scaled.gguf", tiny.model, rope_freqs=factors)
    assert load_checkpoint(str(tmp_path / "scaled.gguf")).hf_config["rope_scaling"] == scaling


# Published parameter counts of the aliased models (model cards / safetensors metadata).
PUBLISHED_PARAMS = {"llama3-8b": 8_030_261_248, "llama3.1-8b": 8_030_261_248, "llama3-8b-1m": 8_030_261_248,
                    "qwen2.5-7b-1m": 7_615_616_512, "mistral-7b": 7_248_023_552, "smollm2-135m": 134_515_008}


@pytest.mark.parametrize("alias", sorted(KNOWN_MODELS))
def test_alias_architectures_have_published_sizes(alias):
    from offload.model.loaders import normalize_hf_config

    cfg = normalize_hf_config(KNOWN_MODELS[alias].config, torch.bfloat16)
    count = sum(int(np.prod(shape)) for shape in parameter_shapes(cfg).values())
    assert count == PUBLISHED_PARAMS[alias]


def test_dummy_weights_are_random_normal_and_shaped(tmp_path):
    tiny = write_tiny_checkpoint(tmp_path, "qwen2", hidden_size=256, intermediate_size=512)
    ckpt = load_checkpoint(str(tiny.path), torch.bfloat16, load_format="dummy")
    reference = tiny.model.state_dict()
    assert {k: tuple(v.shape) for k, v in ckpt.state_dict.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert all(t.dtype == torch.bfloat16 for t in ckpt.state_dict.values())
    q = ckpt.state_dict["model.layers.1.self_attn.q_proj.weight"].float()
    assert abs(q.std().item() - 0.02) < 1e-3 and abs(q.mean().item()) < 1e-3
    assert torch.equal(ckpt.state_dict["model.norm.weight"], torch.ones(256, dtype=torch.bfloat16))
    assert not ckpt.state_dict["model.layers.0.self_attn.q_proj.bias"].any()
    assert ckpt.tokenizer.decode(ckpt.tokenizer.encode("byte fallback ü")) == "byte fallback ü"


def test_describe_model_reads_no_weights(tmp_path, monkeypatch, smollm2_gguf):
    tiny = write_tiny_checkpoint(tmp_path, "mistral")
    info = describe_model(str(tiny.path))
    assert info.hf_config == load_checkpoint(info).hf_config
    assert describe_model(str(smollm2_gguf)).tokenizer.encode("Hello") == [19556]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # empty: llama3-8b is not local
    dummy = describe_model("llama3-8b", torch.bfloat16, load_format="dummy")
    assert (dummy.source, dummy.hf_config["num_hidden_layers"], dummy.tokenizer) == (None, 32, None)
    with pytest.raises(ModelLoadError, match="not in the local HF cache"):
        describe_model("llama3-8b")


def test_bad_inputs_raise_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_checkpoint(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_checkpoint(str(tmp_path / "empty"))
    tiny = write_tiny_checkpoint(tmp_path, "llama")
    (tiny.path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_checkpoint(str(tiny.path))


def test_corrupt_and_incomplete_checkpoints_raise(tmp_path):
    tiny = write_tiny_checkpoint(tmp_path / "a", "llama")
    weights = tiny.path / "model.safetensors"
    weights.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{not a header}" + weights.read_bytes()[40:])
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_checkpoint(str(tiny.path))
    sharded = write_tiny_checkpoint(tmp_path / "b", "llama", max_shard_size="40KB")
    shard = json.loads((sharded.path / "model.safetensors.index.json").read_text())["weight_map"]["model.norm.weight"]
    (sharded.path / shard).unlink()
    with pytest.raises(ModelLoadError, match=f"shard {shard}.*missing"):
        load_checkpoint(str(sharded.path))
    config = json.loads((tiny.path / "config.json").read_text())
    (tiny.path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'gpt2'"):
        load_checkpoint(str(tiny.path))


def test_truncated_gguf_raises(tmp_path, smollm2_gguf):
    data = smollm2_gguf.read_bytes()
    for cut in (2, 4096, len(data) - 100):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
            load_checkpoint(str(truncated))


@pytest.mark.parametrize("case", ["fewer-layers", "foreign-tensor", "more-layers"])
def test_gguf_metadata_that_disagrees_with_its_tensors_is_refused(tmp_path, case):
    """Checked from the header (describe, before planning) and again by the loader: missing, left over."""
    from offload.model.loaders import describe_model

    tiny = write_tiny_checkpoint(tmp_path, "llama")
    path = tmp_path / f"{case}.gguf"
    kwargs, match = {"fewer-layers": ({"block_count": 1}, "does not use .*model.layers.1"),
                     "foreign-tensor": ({"extra": {"blk.0.mystery.weight": np.zeros(4, np.float32)}},
                                        "blk.0.mystery.weight"),
                     "more-layers": ({"block_count": 3}, "no tensor 'model.layers.2")}[case]
    _write_tiny_gguf(path, tiny.model, **kwargs)
    for read in (describe_model, load_checkpoint):
        with pytest.raises(ModelLoadError, match=match):
            read(str(path))
