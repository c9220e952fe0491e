"""Sampling: vLLM-like `SamplingParams` (validated), the logits processors, a seedable `Sampler`, and
`StopStrings`, which cuts streamed text at a stop string.

Order per step (vLLM's): penalties on the raw logits -> temperature -> top-k -> top-p -> min-p -> draw.
Greedy (temperature 0) still applies the penalties, then takes the argmax.
- repetition_penalty (HF/CTRL, llama.cpp's --repeat-penalty): every token seen in the context or the
  output has its logit divided by the penalty when positive, multiplied when negative.
- presence_penalty / frequency_penalty (OpenAI): subtracted once / per occurrence, over the output only.
"""
from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from offload.errors import ConfigError

if TYPE_CHECKING:
    import torch
# torch is imported inside the functions: SamplingParams validates options (the CLI's, before any load) in
# milliseconds, without the 1-4 s torch import

SEED_MAX = 2**64 - 1     # torch.Generator.manual_seed takes 64 bits
MAX_STOPS = 16           # stop strings per request (OpenAI allows 4; vLLM does not bound them)
MAX_STOP_CHARS = 256     # per stop string: StopStrings holds back this much text at most
_EXAMPLES = {"temperature": 0.8, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.1, "presence_penalty": 0.5,
             "frequency_penalty": 0.5}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. Validated on construction (ConfigError naming the key and the fix)."""

    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0                # nucleus mass; 1 = off
    top_k: int = 0                    # keep the k most likely; 0 (or -1, vLLM's spelling) = off
    min_p: float = 0.0                # keep tokens with prob >= min_p x the top prob; 0 = off
    repetition_penalty: float = 1.0   # 1 = off; > 1 discourages tokens already in context or output
    presence_penalty: float = 0.0     # -2..2, once per token present in the output
    frequency_penalty: float = 0.0    # -2..2, per occurrence in the output
    stop: tuple[str, ...] = ()        # the text stops before the first of these (not included)
    max_tokens: int = 256             # most new tokens
    seed: int | None = None           # None = a fresh random seed

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalisation)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}; pass e.g. {_EXAMPLES[name]}")
            set_(name, float(value))
        for name in ("top_k", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be a whole number, got {value!r}; pass e.g. 40")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}; use 0 for greedy or e.g. 0.8")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}; use e.g. 0.9, or 1 to turn it off")
        if self.top_k < -1:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}; use e.g. 40, or 0 to turn it off")
        set_("top_k", max(self.top_k, 0))
        if not 0.0 <= self.min_p <= 1.0:
            raise ConfigError(f"min_p must be in [0, 1], got {self.min_p}; use e.g. 0.05, or 0 to turn it off")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}; use e.g. 1.1, "
                              "or 1 to turn it off")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ConfigError(f"{name} must be in [-2, 2], got {getattr(self, name)}; use e.g. 0.5, or 0 to "
                                  "turn it off")
        if self.max_tokens < 0:
            raise ConfigError(f"max_tokens must be >= 0, got {self.max_tokens}; pass e.g. 256")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed <= SEED_MAX):
            raise ConfigError(f"seed {self.seed!r} is not a whole number in 0..2**64-1; pass a seed in that range")
        set_("stop", _stop_tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def override(self, **values) -> "SamplingParams":
        """A copy with the given values; None keeps the current one (so optional keyword arguments pass through).
        `max_new_tokens` is accepted as another name for max_tokens."""
        if "max_new_tokens" in values:
            alias = values.pop("max_new_tokens")
            values["max_tokens"] = alias if values.get("max_tokens") is None else values["max_tokens"]
        unknown = set(values) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown sampling option(s) {', '.join(sorted(unknown))}; valid: "
                              f"{', '.join(f.name for f in dataclasses.fields(self))}")
        given = {k: v for k, v in values.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self

    @classmethod
    def from_config(cls, cfg) -> "SamplingParams":
        """From an OffloadConfig (or anything with its sampling attributes; missing ones keep the defaults)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"max_tokens"}
        values = {n: getattr(cfg, n) for n in names if hasattr(cfg, n)}
        if hasattr(cfg, "max_new_tokens"):
            values["max_tokens"] = cfg.max_new_tokens
        return cls(**values)


def _stop_tuple(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = (stop,) if isinstance(stop, str) else stop
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise ConfigError(f"stop must be a string or a list of strings, got {type(stop).__name__}; "
                          "pass e.g. ['\\n\\n', 'User:']")
    items = tuple(dict.fromkeys(items))        # duplicates dropped, order kept
    if len(items) > MAX_STOPS:
        raise ConfigError(f"{len(items)} stop strings given, at most {MAX_STOPS}; pass fewer")
    for s in items:
        if not s or len(s) > MAX_STOP_CHARS:
            raise ConfigError(f"a stop string must have 1..{MAX_STOP_CHARS} characters, got {len(s)}; "
                              "pass shorter, non-empty strings")
    return items


# ---- logits processors (pure functions: the Sampler composes them; tests compare each to a reference) -----

def apply_penalties(logits: torch.Tensor, seen: torch.Tensor | None, counts: torch.Tensor | None,
                    p: SamplingParams) -> torch.Tensor:
    """logits: [V] float32; seen: [V] bool (context + output); counts: [V] int64 (output) -> new logits [V]."""
    import torch
    out = logits.clone()
    if p.repetition_penalty != 1.0 and seen is not None:
        hit = out[seen]                                                        # hit: [n_seen]
        out[seen] = torch.where(hit > 0, hit / p.repetition_penalty, hit * p.repetition_penalty)
    if counts is not None and (p.presence_penalty or p.frequency_penalty):
        c = counts.to(out.dtype)                                               # c: [V]
        out -= p.frequency_penalty * c + p.presence_penalty * (c > 0).to(out.dtype)
    return out


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Tempered logits with the tokens top-k, top-p and min-p drop set to -inf. logits: [V] -> [V] float32."""
    import torch
    x = logits.float() / p.temperature                                         # x: [V]
    if p.top_k and p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, -math.inf)                                  # ties with the k-th stay
    if p.top_p < 1.0:
        probs = torch.softmax(x, -1)                                           # probs: [V]
        sp, si = torch.sort(probs, descending=True)                            # sp, si: [V]
        drop = torch.cumsum(sp, 0) - sp >= p.top_p                             # drop: [V]; the top token stays
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, si, drop), -math.inf)
    if p.min_p > 0.0:
        probs = torch.softmax(x, -1)                                           # probs: [V]
        x = x.masked_fill(probs < p.min_p * probs.max(), -math.inf)
    return x


class Sampler:
    """Picks one token id from a step's logits; remembers what it picked for the penalties.

    Sampler(SamplingParams(...), context_ids=prompt) or, as before, Sampler(temperature, top_p, seed)."""

    def __init__(self, params: SamplingParams | float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 context_ids: Iterable[int] = ()):
        if not isinstance(params, SamplingParams):
            params = SamplingParams(temperature=params, top_p=top_p, seed=seed)
        import torch
        self.params = p = params
        self.gen = torch.Generator()
        self.gen.manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
        # the penalties' state, sized on the first step (the vocabulary comes with the logits)
        self._pending: list[int] = list(context_ids) if p.repetition_penalty != 1.0 else []
        self._seen: torch.Tensor | None = None      # [V] bool: context + output
        self._counts: torch.Tensor | None = None    # [V] int64: output

    def observe(self, ids: Iterable[int]) -> None:
        """More context ids (e.g. a new user turn) that the repetition penalty should count as seen."""
        if self.params.repetition_penalty == 1.0:
            return
        if self._seen is None:
            self._pending.extend(int(i) for i in ids)
        else:
            import torch
            self._seen[torch.as_tensor(list(ids), dtype=torch.long)] = True

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [V] float -> one token id."""
        import torch
        p = self.params
        x = logits.detach().float().cpu()                                      # x: [V]
        if p.penalized:
            self._init_state(x.numel())
            x = apply_penalties(x, self._seen, self._counts, p)
        if p.greedy:
            tok = int(torch.argmax(x))
        else:
            probs = torch.softmax(filter_logits(x, p), -1)                     # probs: [V]
            tok = int(torch.multinomial(probs, 1, generator=self.gen))
        if p.penalized:
            self._seen[tok] = True
            self._counts[tok] += 1
        return tok

    def _init_state(self, vocab: int) -> None:
        if self._seen is not None:
            return
        import torch
        ids = torch.as_tensor(self._pending, dtype=torch.long)
        self._seen = torch.bincount(ids[(ids >= 0) & (ids < vocab)], minlength=vocab)[:vocab] > 0
        self._counts = torch.zeros(vocab, dtype=torch.long)
        self._pending = []


class StopStrings:
    """Cuts streamed text before the first stop string. push(piece) returns the text that is safe to show;
    a tail that could still begin a stop string is held back until the next piece settles it."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(stops)
        self._held = ""
        self.stopped = False        # a stop string was found: the caller should end the generation

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self._held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return text[:cut]
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """At the end of a generation that did not stop: the held-back tail."""
        tail, self._held = self._held, ""
        return "" if self.stopped else tail
