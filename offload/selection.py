"""Policy: what sparse selection a session gets when the user leaves `index` at "auto" (the default).

Two presets, chosen by measurement (bench/RESULTS.md, issue 13, "The default selection: `index: auto`"):
  * accurate: the shadow index proposes 8x the budget's chunks, the token stage ranks their tokens from the low-rank
    key shadows on the GPU and keeps, per KV head, the fewest best tokens whose estimated attention mass reaches
    0.97 (at least 64, at most the budget's tokens). SmolLM2 at 8K: 97.7% teacher-forced top-1 at 5.9% of the
    context and 99% of the needles full attention answers (chunks: 95.7%, 94%); 1.29-1.37x chunks' step at 128K.
  * chunks: the summary index's bounds pick whole chunks (Quest). Cheapest, and its compact layout fits any ctx.
The planner (backends.plan) takes `accurate` where it was measured: its shadows fit on the GPU in their default
layout beside the weights and a KV tier, the host tier holds bf16 KV and nothing goes to the drive (the drive's
prefetch reads whole chunks ahead; a prompt cache keeps the summary index's rows, while shadows would be rebuilt
from lossy keys). Else `chunks` (Llama-3-8B on a 24 GiB card: accurate to ~192K, chunks at 1M, where the shadows
would need 18 GiB). A user who sets any selection option (select_unit, token_*, index_options, a mass budget)
without naming an index gets the summary index with those options, as before "auto" existed.
"""
from __future__ import annotations

import dataclasses

ACCURATE = {"index": "shadow", "index_options": {"candidate_factor": 1.0, "rank": 32}, "select_unit": "token",
            "token_candidates": 8.0, "token_reduce": "sum", "token_scores": "shadow", "token_mass": 0.97,
            "token_floor": 64}
CHUNKS = {"index": "summary"}
# the fields a preset sets; a user value other than the default in any of them means "my own selection"
_SELECTION_FIELDS = ("index_options", "select_unit", "token_candidates", "token_reduce", "token_scores",
                     "token_mass", "token_floor")


def customised(cfg) -> bool:
    """Whether the user chose selection options of their own (then "auto" only names the index: summary)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    if any(getattr(cfg, name) != defaults[name] for name in _SELECTION_FIELDS):
        return True
    from offload.indexes import Budget          # a chunk mass budget ("p=0.75,floor=128,cap=2K") is a selection too
    return Budget.parse(cfg.budget, cfg.streaming_heads).adaptive


def choices(cfg, head_dim: int) -> list[tuple[str, object]]:
    """The configurations the planner tries, best first, as (preset name, concrete config). head_dim: the model's
    (a small test model's shadows take its full rank when that is below 32)."""
    if cfg.index != "auto":
        return [("", cfg)]
    if customised(cfg):
        return [("chunks", cfg.replace(**CHUNKS))]
    options = dict(ACCURATE["index_options"], rank=min(32, head_dim))
    accurate = dict(ACCURATE, index_options=options,
                    token_floor=min(ACCURATE["token_floor"], _cap_tokens(cfg.budget)))
    return [("accurate", cfg.replace(**accurate)), ("chunks", cfg.replace(**CHUNKS))]


def chosen_fields(cfg, concrete) -> tuple:
    """What the planner chose for an "auto" config, as (name, value) pairs (hashable, for BudgetPlan)."""
    if cfg.index != "auto":
        return ()
    names = ("index",) + _SELECTION_FIELDS
    return tuple((n, _freeze(getattr(concrete, n))) for n in names if getattr(concrete, n) != getattr(cfg, n))


def apply(cfg, plan):
    """cfg with the planner's selection filled in (unchanged when the user named an index)."""
    chosen = getattr(plan, "selection", ())
    if cfg.index != "auto" or not chosen:
        return cfg
    return cfg.replace(**{n: (dict(v) if n == "index_options" else v) for n, v in chosen})


def describe(selection: tuple) -> str:
    """A few words for the plan's summary line."""
    d = dict(selection)
    if d.get("select_unit") == "token":
        return f"{d.get('index')} index, tokens ranked from shadows, mass {d.get('token_mass')}"
    return f"{d.get('index', '?')} index, whole chunks"


def _cap_tokens(budget) -> int:
    """The budget's tokens when it is a count (the floor must stay within it), else a large number."""
    from offload.config import parse_tokens
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        return 1 << 62
    try:
        return parse_tokens(budget, "budget")
    except Exception:           # a fraction ("5%") or a list: its size is known only per ctx
        return 1 << 62


def _freeze(v):
    return tuple(sorted(v.items())) if isinstance(v, dict) else v
