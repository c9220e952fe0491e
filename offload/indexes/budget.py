"""How many chunks a decode step may select, per layer and KV head.

A budget counts the *selected* chunks only; sinks and the local window are kept by the caller on
top of it. It is given
  * in tokens (2048, "2048", "2K"): a fixed count per head;
  * as an attention-mass threshold ("p=0.95,floor=256,cap=4K", or {"p": 0.95, "floor": 256, "cap": "4K"}):
    each head takes the fewest best chunks whose estimated mass, with the sinks, window and tail, reaches
    p, between floor and cap tokens (offload.indexes.adaptive; the estimate comes from the index);
  * as a fraction of the context ("5%", 0.05): still accepted, never the default (at 1M, 5% is 52K
    tokens per step).
Token amounts become chunk counts once the context length is known (rounded up: never to 0). For a mass
budget, `chunks()` is the cap: the fixed width of the selection, of which each head uses its count.

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


MASS_FLOOR, MASS_CAP = 128, 4096     # tokens, when a mass budget leaves them out


@dataclass(frozen=True)
class _Amount:
    tokens: int = 0          # > 0 when given in tokens (for a mass budget: the cap)
    fraction: float = 0.0    # > 0 when given as a fraction of the context
    mass: float = 0.0        # > 0: attention-mass threshold p; tokens is then the cap
    floor: int = 0           # mass budget: fewest tokens a head selects

    def chunks(self, context_tokens: int, chunk_tokens: int) -> int:
        tokens = self.tokens if self.tokens else self.fraction * context_tokens
        return max(1, math.ceil(tokens / chunk_tokens))


def _parse_mass(spec: str | Mapping) -> _Amount:
    """"p=0.95,floor=256,cap=4K" or {"p": 0.95, "floor": 256, "cap": "4K"} -> a mass amount."""
    fix = 'write it as "p=0.95,floor=256,cap=4K" (p in (0, 1], floor <= cap in tokens)'
    if isinstance(spec, str):
        fields = {}
        for part in spec.split(","):
            key, eq, value = part.partition("=")
            if not eq:
                raise ConfigError(f"budget {spec!r}: {part.strip()!r} is not key=value; {fix}")
            fields[key.strip().lower()] = value.strip()
    else:
        fields = {str(k).lower(): v for k, v in spec.items()}
    unknown = sorted(set(fields) - {"p", "floor", "cap"})
    if unknown:
        raise ConfigError(f"budget {spec!r} has unknown key(s) {', '.join(unknown)}; {fix}")
    if "p" not in fields:
        raise ConfigError(f"budget {spec!r} has no mass threshold p; {fix}")
    p = fields["p"]
    try:
        if isinstance(p, bool) or not isinstance(p, (int, float, str)):
            raise ValueError
        p = float(p)
    except ValueError:
        raise ConfigError(f"budget {spec!r}: p={fields['p']!r} is not a number; {fix}") from None
    if not 0.0 < p <= 1.0:
        raise ConfigError(f"budget {spec!r}: mass threshold p={p:g} is outside (0, 1]; {fix}")
    bounds = {}
    for key, default in (("floor", MASS_FLOOR), ("cap", MASS_CAP)):
        value = fields.get(key, default)
        if key == "floor" and str(value).strip() == "0":
            bounds[key] = 0
            continue
        if isinstance(value, str) and value.strip().endswith("%"):
            raise ConfigError(f"budget {spec!r}: {key}={value} is a fraction; floor and cap are token counts "
                              f"(\"256\", \"4K\"), so that a budget does not grow with the context; {fix}")
        amount = _parse_amount(value, what=f"budget {key}")
        if not amount.tokens:
            raise ConfigError(f"budget {spec!r}: {key}={value!r} must be a token count; {fix}")
        bounds[key] = amount.tokens
    if bounds["floor"] > bounds["cap"]:
        raise ConfigError(f"budget {spec!r}: floor={bounds['floor']} is above cap={bounds['cap']}; {fix}")
    return _Amount(tokens=bounds["cap"], mass=p, floor=bounds["floor"])


def _parse_amount(spec: BudgetSpec, what: str = "budget") -> _Amount:
    fix = ('use a positive token count ("2048", "2K"), a mass threshold ("p=0.95,floor=256,cap=4K") '
           'or a fraction ("5%", 0.05)')
    if isinstance(spec, Mapping) or (isinstance(spec, str) and "=" in spec):
        return _parse_mass(spec)
    if isinstance(spec, bool):
        raise ConfigError(f"{what} {spec!r} is not a number; {fix}")
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
            raise ConfigError(f"{what} {spec!r} cannot be parsed; {fix}") from None
    else:
        raise ConfigError(f"{what} {spec!r} has type {type(spec).__name__}; {fix}")
    if not value > 0 or math.isinf(value):
        raise ConfigError(f"{what} {spec!r} must be > 0; {fix} (use streaming_heads for a budget of 0)")
    if is_fraction:
        if value > 1.0:
            raise ConfigError(f"{what} {spec!r} is more than the whole context; {fix}")
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

    def _amount(self, layer: int | None) -> _Amount:
        if self.per_layer and layer is not None and 0 <= layer < len(self.per_layer):
            return self.per_layer[layer]
        return self.default

    def mass(self, layer: int | None = None) -> float:
        """The mass threshold p of `layer` (0.0 for a fixed count: then chunks() is what every head takes)."""
        return self._amount(layer).mass

    def floor_chunks(self, chunk_tokens: int, layer: int | None = None) -> int:
        """A mass budget's floor in chunks (0 for a fixed count); chunks() is its cap."""
        amount = self._amount(layer)
        return math.ceil(amount.floor / chunk_tokens) if amount.mass else 0

    @property
    def adaptive(self) -> bool:
        """Whether any layer selects by attention mass."""
        return any(a.mass for a in (self.default, *self.per_layer))

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
