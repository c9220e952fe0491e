"""Load a GGUF file (llama.cpp's format) into the same LoadedCheckpoint an HF folder gives.

Matrices of the types in `keep` stay quantized (QuantWeight: Q8_0, Q4_0, Q4_1, Q4_K, Q6_K); every other
tensor is dequantized to float (gguf.quants.dequantize handles K-quants, IQ*, F16, BF16), renamed to HF names, and Llama's q/k rows are put back in HF order: llama.cpp's converter
interleaves the two rotary halves of each head (HF rotates dims i and i + D/2; llama.cpp rotates
adjacent pairs 2i, 2i+1), so q_proj/k_proj rows are stored permuted per head.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from offload.errors import ModelLoadError
from offload.model import qformats
from offload.model.qlinear import QuantWeight
from offload.model.loaders.checkpoint import LoadedCheckpoint, check_shapes, check_state_dict, dtype_name

# GGUF architecture -> HF model_type. Mistral files say "llama" (same layout, same permutation).
_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# Architectures whose converter permutes q/k rows for llama.cpp's rotary layout (Qwen2's does not).
_PERMUTED_ARCHITECTURES = {"llama"}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


# The last file parsed: describing a model and loading it read the header once, not twice (GGUFReader
# builds a numpy view per vocabulary entry: 2-4 s for SmolLM2's 49K tokens). Keyed by what stat says,
# so a file replaced in between is parsed again.
_last_reader: tuple[tuple, object] | None = None


def open_gguf(path: str | Path):
    """A GGUFReader over `path` (the one already parsed when the file is unchanged); a truncated or foreign
    file raises ModelLoadError."""
    global _last_reader
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist; pass an existing .gguf file")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if _last_reader is not None and _last_reader[0] == key:
        return _last_reader[1]
    reader = _parse(path)
    _last_reader = (key, reader)
    return reader


def forget_reader() -> None:
    """Drop the kept reader (after the weights are loaded: its per-field arrays hold memory)."""
    global _last_reader
    _last_reader = None


def _parse(path: Path):
    from gguf import GGUFReader

    from offload.model.loaders.gguf_header import GGUFHeader

    try:
        reader = GGUFHeader.read(path) or GGUFReader(str(path))   # ours: one pass, ~20x faster on a vocabulary
        size = path.stat().st_size
        for tensor in reader.tensors:  # the reader maps lazily: check every tensor lies inside the file
            if int(tensor.data_offset) + int(tensor.n_bytes) > size:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
    except ModelLoadError:
        raise
    except Exception as exc:  # the reader fails with ValueError/IndexError/struct errors on bad input
        raise ModelLoadError(
            f"{path} is not a readable GGUF file (truncated or corrupt: {exc}); re-download it"
        ) from None
    return reader


def metadata_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def hf_name(gguf_name: str) -> str | None:
    """HF parameter name of a GGUF tensor, None for tensors that carry no parameter (rope_freqs)."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES and kind == "weight":
        return f"{_GLOBAL_NAMES[stem]}.weight"
    match = _LAYER_TENSOR.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    return None


def header_shapes(reader) -> dict[str, tuple[int, ...]]:
    """Every tensor of the file by HF name and HF shape, read from the header alone (no dequantizing).
    Tensors with no HF counterpart keep their GGUF name, so a foreign one shows up as left over."""
    out = {}
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":   # Llama 3.1 scaling factors: read into the config, not a parameter
            continue
        out[hf_name(tensor.name) or tensor.name] = tuple(int(n) for n in reversed(tensor.shape))  # GGUF: fastest-first
    return out


def unpermute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert llama.cpp's per-head row interleave of q/k projections (weights [out, in] or biases [out])."""
    rows = weight.shape[0]
    head_dim = rows // n_heads
    stored = weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])  # stored: [H, D/2, 2, ...]
    return stored.transpose(1, 2).reshape(weight.shape)  # back to [H, 2, D/2, ...] = [out, ...]


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low: float, high: float, original: int):
    """Llama 3.1's per-frequency wavelength multipliers, the quantity llama.cpp stores in rope_freqs."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors)


def _rope_scaling(reader, arch: str, theta: float, head_dim: int, rope_freqs: np.ndarray | None, path: Path):
    kind = metadata_value(reader, f"{arch}.rope.scaling.type")
    factor = metadata_value(reader, f"{arch}.rope.scaling.factor")
    original = metadata_value(reader, f"{arch}.rope.scaling.original_context_length")
    if rope_freqs is not None:
        # llama.cpp keeps Llama 3.1's scaling as a tensor of factors; recover the HF parameters from it.
        # float32 storage blurs the factor (8.000001); published factors are short decimals.
        params = {"factor": float(f"{rope_freqs.max():.6g}"), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": int(original or 8192)}
        expected = llama3_rope_factors(theta, head_dim, params["factor"], 1.0, 4.0,
                                       params["original_max_position_embeddings"])
        if rope_freqs.shape != expected.shape or not np.allclose(rope_freqs, expected, rtol=1e-3):
            raise ModelLoadError(
                f"{path}: rope_freqs do not follow Llama-3.1 scaling; convert the model to an HF folder")
        return {"rope_type": "llama3", **params}
    if kind in (None, "none") or not factor:
        return None
    if kind not in ("linear", "yarn"):
        raise ModelLoadError(f"{path}: rope scaling {kind!r} is not supported (linear, yarn, llama3); use another file")
    scaling = {"rope_type": kind, "factor": float(factor)}
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def gguf_hf_config(reader, dtype: torch.dtype, path: Path) -> dict:
    """The contract's config dict from GGUF metadata and tensor shapes."""
    arch = metadata_value(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported ({', '.join(_ARCHITECTURES)}); "
            "pick a Llama-family model"
        )
    tensors = {t.name: t for t in reader.tensors}

    def key(name, default=None):
        value = metadata_value(reader, f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.{name}; the file is incomplete: re-download it")
        return value

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(metadata_value(reader, f"{arch}.attention.key_length") or hidden // heads)
    theta = float(key("rope.freq_base", 10000.0))
    rope_freqs = None
    if "rope_freqs.weight" in tensors:
        rope_freqs = np.asarray(tensors["rope_freqs.weight"].data, dtype=np.float64).reshape(-1)
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise ModelLoadError(f"{path} has no token_embd.weight tensor; the file is incomplete: re-download it")
    eos = metadata_value(reader, "tokenizer.ggml.eos_token_id")
    return {
        "model_type": _ARCHITECTURES[arch],
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(reader, arch, theta, head_dim, rope_freqs, path),
        "max_position_embeddings": int(key("context_length")),
        "vocab_size": int(embedding.shape[-1]),  # GGUF shapes are [in, out]: token_embd is [hidden, vocab]
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in tensors,
        "sliding_window": None,
        "bos_token_id": metadata_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": int(eos) if eos is not None else None,
        "torch_dtype": dtype_name(dtype),
    }


def _dequantized(tensor, path: Path) -> torch.Tensor:
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)  # float32 numpy, rows of the HF layout
    except NotImplementedError:
        raise ModelLoadError(
            f"{path}: tensor {tensor.name} uses quant type {tensor.tensor_type.name}, which gguf cannot "
            "dequantize; use a file in Q8_0, Q4_K, Q6_K or F16"
        ) from None
    values = np.asarray(values, dtype=np.float32)
    if not values.flags.writeable:  # F32/F16 come back as views of the read-only file mapping
        values = values.copy()
    hf_shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest-first
    return torch.from_numpy(values).reshape(hf_shape)  # [out, in] for matrices, [n] for norms/biases


_DENSE_TYPES = ("F32", "F16", "BF16")


def tensor_types(reader) -> dict[str, str]:
    """GGUF type name (Q4_K, F32...) of every parameter tensor, by HF name."""
    return {name: t.tensor_type.name for t in reader.tensors if (name := hf_name(t.name)) is not None}


def check_kept_types(reader, path: Path) -> None:
    """With the file's own formats kept (weights auto on a GPU), every quantized type must be one we run."""
    for name, kind in tensor_types(reader).items():
        if kind not in _DENSE_TYPES and kind not in qformats.SUPPORTED:
            raise ModelLoadError(
                f"{path}: tensor {name} is {kind}, a quantization offload does not run on the GPU (supported: "
                f"{', '.join(qformats.SUPPORTED)}, F16, BF16, F32); pass --weights bf16 to dequantize it at load "
                "(or --weights q8_0 / q4 to requantize)")


def _check_scales(tensor, path: Path, name: str) -> None:
    """Refuse NaN or infinite block scales, read from the file's block bytes (no dequantizing)."""
    kind = tensor.tensor_type.name
    fmt = qformats.FORMATS[kind]
    blocks = np.asarray(tensor.data).reshape(-1, fmt.block_bytes)  # blocks: [nblocks, block_bytes]
    width = 4 if kind in ("Q4_1", "Q4_K") else 2                  # d (+ m / dmin) float16 fields
    offset = fmt.block_bytes - 2 if kind == "Q6_K" else 0          # Q6_K keeps d last
    scales = np.ascontiguousarray(blocks[:, offset:offset + width]).view(np.float16)
    if not np.isfinite(scales).all():
        raise ModelLoadError(f"{path}: tensor {name} ({kind}) has NaN or infinite block scales; the file is "
                             "corrupt: re-download or re-convert it")


def _kept(tensor, path: Path, name: str, device: torch.device) -> QuantWeight:
    """A quantized matrix as it is in the file, its blocks split into planes on `device` (one contiguous
    copy over; the split of 18-34-byte blocks is a strided copy the GPU does in a blink)."""
    kind = tensor.tensor_type.name
    rows, cols = int(tensor.shape[1]), int(tensor.shape[0])      # GGUF shape: [in, out]
    raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8).reshape(rows, -1))  # raw: [out, nblocks * bytes]
    return QuantWeight.from_gguf(kind, raw.to(device), cols)


def load_gguf(path: str | Path, dtype: torch.dtype, device: torch.device | str,
              keep: frozenset[str] = frozenset(), keep_head: frozenset[str] | None = None) -> LoadedCheckpoint:
    """keep: GGUF types whose matrices stay quantized (QuantWeight values in the state dict); keep_head: the
    same for the output head (the embedding when tied; None: keep). Every other tensor is dequantized to
    dtype. The file is parsed once (open_gguf keeps the describe step's reader)."""
    from offload.model.loaders.gguf_tokenizer import gguf_tokenizer

    path = Path(path).expanduser()
    reader = open_gguf(path)
    cfg = gguf_hf_config(reader, dtype, path)
    check_shapes(cfg, header_shapes(reader), str(path))   # refuse before dequantizing anything
    arch = metadata_value(reader, "general.architecture")
    permuted = arch in _PERMUTED_ARCHITECTURES
    device = torch.device(device)
    state_dict: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:  # one tensor at a time keeps peak memory at one float32 copy
        name = hf_name(tensor.name)
        if name is None:
            continue
        heads = (cfg["num_attention_heads"] if ".q_proj." in name else
                 cfg["num_key_value_heads"] if ".k_proj." in name else 0) if permuted else 0
        head = name == "lm_head.weight" or (name == "model.embed_tokens.weight" and cfg["tie_word_embeddings"])
        kept = keep_head if head and keep_head is not None else keep
        kind = tensor.tensor_type.name
        if kind in qformats.FORMATS:
            _check_scales(tensor, path, name)     # on the block bytes: a pass over floats cost seconds
        if kind in kept and kind in qformats.FORMATS and len(tensor.shape) == 2:
            weight = _kept(tensor, path, name, device)
            if heads:
                weight = weight.permute_rows(unpermute_rotary_rows(torch.arange(weight.shape[0]), heads))
            state_dict[name] = weight
            continue
        weight = _dequantized(tensor, path)       # gguf's numpy dequantization (7x less CPU than torch's here)
        if kind not in _DENSE_TYPES and kind not in qformats.FORMATS and not bool(torch.isfinite(weight).all()):
            raise ModelLoadError(f"{path}: tensor {tensor.name} ({kind}) dequantizes to NaN or "
                                 "infinite values (corrupt block scales); re-download or re-convert the file")
        if heads:
            weight = unpermute_rotary_rows(weight, heads)
        state_dict[name] = weight.to(device=device, dtype=dtype)  # same shape, target dtype/device
    state_dict = check_state_dict(cfg, state_dict, str(path))
    tokenizer = gguf_tokenizer(reader, path)
    forget_reader()
    return LoadedCheckpoint(hf_config=cfg, state_dict=state_dict, tokenizer=tokenizer)
