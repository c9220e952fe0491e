"""Rebuild a model's tokenizer from GGUF metadata (a GGUF carries no tokenizer.json).

tokenizer.ggml.model "gpt2": byte-level BPE from tokens + merges, split the way tokenizer.ggml.pre names.
tokenizer.ggml.model "llama": SentencePiece BPE from tokens + scores (merge order = score of the merged
piece, as SentencePiece picks the best-scoring merge), with byte fallback for <0xNN> tokens.
"""

from __future__ import annotations

from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from offload.errors import ModelLoadError
from offload.model.loaders.gguf_file import metadata_value
from offload.model.tokenizer import Tokenizer, byte_to_unicode

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2 splits numbers into single digits
_SPLIT_BY_PRE = {
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# Pre-tokenizers that split digits one by one before the GPT-2 regex (SmolLM, StarCoder).
_DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact", "codeshell"}


def _byte_level_pre_tokenizer(pre: str | None):
    if pre in _SPLIT_BY_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    gpt2_split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2_split])
    return gpt2_split  # "gpt2", "default" and unknown names: GPT-2's own split


def _byte_level_backend(tokens: list[str], types: list[int], merges: list[str], pre: str | None):
    alphabet = byte_to_unicode()
    letters = set(alphabet.values())
    vocab = {}
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if kind == _NORMAL and not set(token) <= letters:
            # A plain-text spelling in a byte-level vocabulary: respell it in the byte alphabet.
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    # Llama 3's own tokenizer.json looks whole words up before merging; keep that for its files.
    ignore_merges = _SPLIT_BY_PRE.get(pre) is _LLAMA3_SPLIT
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
    if pre in ("qwen2", "deepseek-r1-qwen"):
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(tokens: list[str], types: list[int], scores: list[float], add_space_prefix: bool):
    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    score_of = {token: scores[index] for token, index in vocab.items()}
    ranked = []
    for merged, merged_score in score_of.items():
        if types[vocab[merged]] != _NORMAL or len(merged) < 2:
            continue
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in vocab and right in vocab:
                ranked.append((-merged_score, vocab[left], vocab[right], left, right))
    ranked.sort()
    unk = next((t for t, k in zip(tokens, types) if k == 2), None)  # type 2: UNKNOWN
    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=[(left, right) for *_, left, right in ranked],
        unk_token=unk, byte_fallback=True, fuse_unk=True,
    ))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False
    )
    strip_prefix = [decoders.Strip(content=" ", left=1, right=0)] if add_space_prefix else []
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()] + strip_prefix
    )
    return backend


def _add_marked_tokens(backend: tokenizers.Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special (matched whole, skipped on decode); user-defined ones stay text."""
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def gguf_tokenizer(reader, path: Path) -> Tokenizer:
    """The Tokenizer a GGUF file describes; an unknown tokenizer model raises ModelLoadError."""

    def meta(key, default=None):
        return metadata_value(reader, f"tokenizer.{key}", default)

    kind = meta("ggml.model")
    tokens = meta("ggml.tokens")
    if kind is None or tokens is None:
        raise ModelLoadError(
            f"{path} carries no tokenizer (tokenizer.ggml.*); use a GGUF converted with its vocabulary")
    types = list(meta("ggml.token_type") or [_NORMAL] * len(tokens))
    embedded = meta("huggingface.json")
    if embedded:
        backend = tokenizers.Tokenizer.from_str(embedded)
    elif kind == "gpt2":
        backend = _byte_level_backend(tokens, types, meta("ggml.merges") or [], meta("ggml.pre"))
    elif kind == "llama":
        scores = meta("ggml.scores") or [0.0] * len(tokens)
        backend = _sentencepiece_backend(tokens, types, scores, bool(meta("ggml.add_space_prefix", True)))
    else:
        raise ModelLoadError(
            f"{path}: tokenizer model {kind!r} is not supported (gpt2, llama); use an HF folder with tokenizer.json"
        )
    if not embedded:
        _add_marked_tokens(backend, tokens, types)

    def token_at(key):
        index = meta(key)
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    # llama.cpp stops at end-of-turn / end-of-message tokens as well as EOS.
    end_keys = ("ggml.eos_token_id", "ggml.eot_token_id", "ggml.eom_token_id")
    eos_ids = {int(meta(k)) for k in end_keys if meta(k) is not None}
    extra_keys = (("unk_token", "ggml.unknown_token_id"), ("pad_token", "ggml.padding_token_id"))
    extra = {name: token_at(key) for name, key in extra_keys}
    return Tokenizer(
        backend,
        chat_template=meta("chat_template"),
        bos_token=token_at("ggml.bos_token_id"),
        eos_token=token_at("ggml.eos_token_id"),
        eos_token_ids=eos_ids,
        # llama.cpp adds BOS for SentencePiece vocabularies unless the file says otherwise.
        add_bos_token=bool(meta("ggml.add_bos_token", kind == "llama")),
        template_tokens={k: v for k, v in extra.items() if v is not None},
    )
