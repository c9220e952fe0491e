"""How many chunks a decode step may select, per layer and KV head.

A budget counts the *selected* chunks only; sinks and the local window are kept by the caller on
top of it. It is given in tokens (2048, "2048", "2K") or as a fraction of the context ("5%", 0.05),
and becomes a chunk count once the context length is known (rounded up: a budget never rounds to 0).

Options, after DuoAttention: a per-layer list of budgets, and "streaming heads" (per layer, KV heads
whose budget is 0: they attend to sinks + window only). `select` returns ids best-first, so a head
with a smaller budget than the layer's takes a prefix of its row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from offload.errors import ConfigError

_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
BudgetSpec = int | float | str


@dataclass(frozen=True)
class _Amount:
    tokens: int = 0          # > 0 when given in tokens
    fraction: float = 0.0    # > 0 when given as a fraction of the context

    def chunks(self, context_tokens: int, chunk_tokens: int) -> int:
        tokens = self.tokens if self.tokens else self.fraction * context_tokens
        return max(1, math.ceil(tokens / chunk_tokens))


def _parse_amount(spec: BudgetSpec) -> _Amount:
    fix = 'use a positive token count ("2048", "2K") or a fraction ("5%", 0.05)'
    if isinstance(spec, bool):
        raise ConfigError(f"budget {spec!r} is not a number; {fix}")
    if isinstance(spec, int):
        value: float = float(spec)
        is_fraction = False
    elif isinstance(spec, float):
        # a float below 1 reads as a fraction; 1.0 and above as a token count
        value, is_fraction = spec, spec < 1.0
    elif isinstance(spec, str):
        text = spec.strip().upper()
        try:
            if text.endswith("%"):
                value, is_fraction = float(text[:-1]) / 100.0, True
            elif text and text[-1] in _SUFFIX:
                value, is_fraction = float(text[:-1]) * _SUFFIX[text[-1]], False
            else:
                value = float(text)
                is_fraction = "." in text and value < 1.0
        except ValueError:
            raise ConfigError(f"budget {spec!r} cannot be parsed; {fix}") from None
    else:
        raise ConfigError(f"budget {spec!r} has type {type(spec).__name__}; {fix}")
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"budget {spec!r} must be > 0; {fix} (use streaming_heads for a budget of 0)")
    if is_fraction:
        if value > 1.0:
            raise ConfigError(f"budget {spec!r} is more than the whole context; {fix}")
        return _Amount(fraction=value)
    return _Amount(tokens=math.ceil(value))


@dataclass(frozen=True)
class Budget:
    """A parsed selection budget. Build with `Budget.parse`."""

    default: _Amount
    per_layer: tuple[_Amount, ...] = ()
    streaming_heads: Mapping[int, frozenset[int]] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: BudgetSpec | Sequence[BudgetSpec],
              streaming_heads: Mapping[int, Sequence[int]] | None = None) -> "Budget":
        """spec: one budget for every layer, or a list with one budget per layer.

        streaming_heads: {layer: [kv_head, ...]} heads that select nothing (sinks + window only).
        """
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise ConfigError("per-layer budget list is empty; give one budget per layer")
            per_layer = tuple(_parse_amount(s) for s in spec)
            default = per_layer[0]
        else:
            per_layer, default = (), _parse_amount(spec)
        streaming: dict[int, frozenset[int]] = {}
        for layer, heads in (streaming_heads or {}).items():
            if int(layer) < 0 or any(int(h) < 0 for h in heads):
                raise ConfigError(f"streaming_heads {{{layer}: {list(heads)}}} has a negative index; "
                                  "use 0-based layer and KV head numbers")
            streaming[int(layer)] = frozenset(int(h) for h in heads)
        return cls(default, per_layer, streaming)

    def chunks(self, context_tokens: int, chunk_tokens: int, layer: int | None = None) -> int:
        """Chunks a (non-streaming) head of `layer` selects at this context length (>= 1)."""
        if chunk_tokens <= 0:
            raise ConfigError(f"chunk_tokens={chunk_tokens} must be > 0; use e.g. 16 or 64")
        amount = self.default
        if self.per_layer and layer is not None:
            if not 0 <= layer < len(self.per_layer):
                raise ConfigError(f"layer {layer} has no budget: the per-layer list has "
                                  f"{len(self.per_layer)} entries; give one per model layer")
            amount = self.per_layer[layer]
        return amount.chunks(context_tokens, chunk_tokens)

    def head_chunks(self, layer: int, num_kv_heads: int, context_tokens: int,
                    chunk_tokens: int) -> list[int]:
        """Per KV head of `layer`: its budget in chunks (0 for a streaming head)."""
        n = self.chunks(context_tokens, chunk_tokens, layer)
        streaming = self.streaming_heads.get(layer, frozenset())
        bad = [h for h in streaming if h >= num_kv_heads]
        if bad:
            raise ConfigError(f"streaming heads {sorted(bad)} of layer {layer} do not exist "
                              f"(the model has {num_kv_heads} KV heads); fix streaming_heads")
        return [0 if h in streaming else n for h in range(num_kv_heads)]
