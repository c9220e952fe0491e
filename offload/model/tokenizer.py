"""Tokenizer: a `tokenizers.Tokenizer` plus the model's special tokens and Jinja chat template.

Built from an HF folder (`load_hf_tokenizer`), from GGUF metadata (`offload.model.loaders.gguf_tokenizer`)
or, for random-weight models, as a plain byte tokenizer (`byte_level_tokenizer`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from offload.errors import ConfigError, ModelLoadError


class Tokenizer:
    """Text <-> token ids, chat rendering and streaming detokenization for one model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        eos_token_ids: Iterable[int] = (),
        add_bos_token: bool = False,
        template_tokens: dict[str, str] | None = None,
    ):
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos_token = add_bos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        eos_ids = set(int(i) for i in eos_token_ids)
        if eos_token and backend.token_to_id(eos_token) is not None:
            eos_ids.add(backend.token_to_id(eos_token))
        self.eos_token_ids: set[int] = eos_ids
        # Extra names a template may use (unk_token, pad_token); bos/eos are always passed.
        self._template_tokens = dict(template_tokens or {})
        self._compiled_template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False, parse_special: bool = True) -> list[int]:
        """parse_special=False: text that spells a control token (`<|im_start|>`) stays text, as llama.cpp's
        parse_special does for user input; add_special_tokens (BOS) is independent of it."""
        if parse_special:
            ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        else:
            self.backend.encode_special_tokens = True   # split special tokens' text like any other text
            try:
                ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
            finally:
                self.backend.encode_special_tokens = False
        # GGUF/SentencePiece files ask for BOS by flag, not through a post-processor.
        needs_bos = add_special_tokens and self.add_bos_token and self.bos_token_id is not None
        if needs_bos and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]:
        """Render `messages` ([{"role", "content"}]) with the model's template, like HF does."""
        if self.chat_template is None:
            raise ModelLoadError(
                "this model has no chat template; use generate() with a raw prompt, or a model whose "
                "tokenizer_config.json / GGUF metadata carries chat_template"
            )
        if self._compiled_template is None:
            self._compiled_template = _compile_template(self.chat_template)
        try:
            text = self._compiled_template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **self._template_tokens,
            )
        except _TemplateRejection as exc:
            raise ConfigError(f"the chat template rejected the messages: {exc}; fix the message list") from None
        if tokenize:
            # The template writes BOS itself where the model wants it.
            return self.encode(text, add_special_tokens=False)
        return text

    def render_chat(self, messages: list[dict],
                    add_generation_prompt: bool = True) -> tuple[str, list[tuple[int, int]]]:
        """The rendered chat and the (start, end) of each message's content in it: the spans that are user text.

        Rendered once more with private-use sentinels as contents to learn where each content lands; when the
        template changes contents (strips them, say), each content is looked up in order instead."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        probe = self.apply_chat_template([{**m, "content": k} for m, k in zip(messages, marks)], add_generation_prompt)
        filled, spans, pos = "", [], 0
        for m, k in zip(messages, marks):
            i = probe.find(k, pos)
            if i < 0:
                break
            filled += probe[pos:i]
            spans.append((len(filled), len(filled) + len(m["content"])))
            filled += m["content"]
            pos = i + len(k)
        if filled + probe[pos:] != text:
            spans, pos = [], 0
            for m in messages:
                i = text.find(m["content"], pos) if m["content"] else -1
                if i >= 0:
                    spans.append((i, i + len(m["content"])))
                    pos = i + len(m["content"])
        return text, spans

    def encode_chat(self, text: str, spans: list[tuple[int, int]], start: int = 0) -> list[int]:
        """Token ids of text[start:]: the template's markers are special tokens, the user spans are plain text."""
        specials = self._special_texts()
        user = [(max(a, start), b) for a, b in spans if b > start]
        if not any(sp in text[a:b] for a, b in user for sp in specials):
            return self.encode(text[start:])   # nothing to protect: one piece, exactly as before
        ids, pos = [], start
        for a, b in user:
            ids += self.encode(text[pos:a]) + self.encode(text[a:b], parse_special=False)
            pos = b
        return ids + self.encode(text[pos:])

    def _special_texts(self) -> list[str]:
        return [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special and t.content]

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Turns generated ids into text pieces as they arrive, never splitting a UTF-8 character.

    tokenizers' own DecodeStream does the work (it holds back bytes of an unfinished character and keeps
    decoders that strip a leading space or merge bytes across tokens correct). Where it cannot be used (a
    tokenizers build without it, or a decoder it refuses: the tokenizer's first stream probes this once),
    pieces come from the difference between decodes of all ids so far. flush() returns what is still
    held back, so the pieces always add up to decode(ids) (an unfinished character ends as U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._emitted = 0       # characters of decode(ids) given out so far
        self._stream = _decode_stream(tokenizer, skip_special_tokens)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        if self._stream is not None:
            try:
                piece = self._stream.step(self._tokenizer.backend, int(token_id)) or ""
            except Exception:   # tokenizers raises its own error types; decode by difference from here on
                self._stream = None
            else:
                self._emitted += len(piece)
                return piece
        return self._by_difference(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character comes out as U+FFFD)."""
        return self._by_difference(final=True)

    def _by_difference(self, final: bool) -> str:
        current = self._tokenizer.decode(self._ids, self._skip)
        if len(current) <= self._emitted or (current.endswith("\ufffd") and not final):
            return ""
        piece = current[self._emitted:]
        self._emitted = len(current)
        return piece


_PROBE = "Streamed: café 東京 🎉 naïve  two spaces\nend"


def _decode_stream(tokenizer: Tokenizer, skip_special_tokens: bool):
    """A DecodeStream when this tokenizer streams exactly like it decodes (probed once per tokenizer)."""
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:     # tokenizers < 0.21
        return None
    ok = getattr(tokenizer, "_decode_stream_ok", None)
    if ok is None:
        try:
            ids = tokenizer.encode(_PROBE)
            probe = DecodeStream(skip_special_tokens=skip_special_tokens)
            ok = "".join(probe.step(tokenizer.backend, i) or "" for i in ids) == tokenizer.decode(ids)
        except Exception:
            ok = False
        tokenizer._decode_stream_ok = ok
    return DecodeStream(skip_special_tokens=skip_special_tokens) if ok else None


class _TemplateRejection(Exception):
    """raise_exception(...) called by a chat template."""


def _compile_template(source: str):
    """Compile a chat template in the sandbox, with the helpers HF templates expect."""
    from jinja2 import ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise _TemplateRejection(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return time.strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except Exception as exc:  # jinja2.TemplateSyntaxError and friends
        raise ModelLoadError(
            f"the model's chat template does not compile ({exc}); fix or remove chat_template") from None


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON ({exc}); re-download or fix the file") from None


def _pick_chat_template(folder: Path, tokenizer_config: dict) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_hf_tokenizer(folder: str | Path, config_eos_ids: Iterable[int] = ()) -> Tokenizer | None:
    """The tokenizer of an HF model folder, or None when it has no tokenizer.json."""
    folder = Path(folder)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        return None
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:
        raise ModelLoadError(f"{tokenizer_file} cannot be read ({exc}); re-download tokenizer.json") from None
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    generation_config = _read_json(folder / "generation_config.json")
    extra = {
        name: _token_text(tokenizer_config.get(name))
        for name in ("unk_token", "pad_token")
        if _token_text(tokenizer_config.get(name)) is not None
    }
    return Tokenizer(
        backend,
        chat_template=_pick_chat_template(folder, tokenizer_config),
        bos_token=_token_text(tokenizer_config.get("bos_token")),
        eos_token=_token_text(tokenizer_config.get("eos_token")),
        eos_token_ids=set(_ids(generation_config.get("eos_token_id"))) | set(config_eos_ids),
        add_bos_token=bool(tokenizer_config.get("add_bos_token", False)),
        template_tokens=extra,
    )


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of every byte, the alphabet of byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    spelling = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + shifted)
            shifted += 1
    return spelling


def byte_level_tokenizer(eos_token_ids: Iterable[int] = ()) -> Tokenizer:
    """One token per byte (ids 0..255): a stand-in for random-weight models with no tokenizer files.

    Ids >= 256 decode to nothing; `eos_token_ids` are the model's configured ids so generation still
    stops where the architecture says.
    """
    spelling = byte_to_unicode()
    vocab = {spelling[b]: b for b in range(256)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    return Tokenizer(backend, chat_template=template, eos_token_ids=eos_token_ids)
