"""Checks of the options that need the model's shape but not its weights, run before any weight loads.

A bad --budget, --index, index option or --disk-dir used to surface only after a 15-35 s weight load, when
the first session built its backend. Everything here is cheap: the budget is parsed, one index of the
configured method is built on the CPU for a handful of chunks, and the disk folder is checked and swept.
"""
from __future__ import annotations

from offload.config import check_disk_dir
from offload.errors import ConfigError


def check_options(cfg, mc, ctx: int, dtype) -> None:
    """Raise ConfigError (one line, with the fix) for options the backend would refuse later."""
    check_disk_dir(cfg.disk_dir)
    if cfg.disk_dir:
        # a crash's leftovers go at every start that names the folder, not only at one that spills
        from offload.tiers.diskdir import sweep_stale
        sweep_stale(cfg.disk_dir)
    if cfg.attention == "full":
        return                      # budget and index are unused by exact attention
    from offload.indexes import Budget
    try:
        budget = Budget.parse(cfg.budget, cfg.streaming_heads)
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"--budget {cfg.budget!r} cannot be read ({e}); use e.g. 2K or 5%") from None
    if isinstance(cfg.budget, list) and len(cfg.budget) != mc.num_layers:
        raise ConfigError(f"--budget: the per-layer list has {len(cfg.budget)} entries but the model has "
                          f"{mc.num_layers} layers; give one budget per layer")
    beyond = sorted(int(k) for k in (cfg.streaming_heads or {}) if int(k) >= mc.num_layers)
    if beyond:
        raise ConfigError(f"streaming_heads names layer {beyond[0]} but the model has {mc.num_layers} layers; "
                          f"use layers 0..{mc.num_layers - 1}")
    for layer in range(mc.num_layers):      # per-layer lists and streaming heads must fit this model
        budget.head_chunks(layer, mc.num_kv_heads, ctx, cfg.chunk_tokens)
    from offload.selection import choices
    for _, concrete in choices(cfg, mc.head_dim):        # index "auto": every preset the planner may choose
        _check_index(concrete, mc, dtype)


def _check_index(cfg, mc, dtype) -> None:
    from offload.indexes import make_index
    try:
        make_index(cfg.index, num_kv_heads=mc.num_kv_heads, num_q_heads=mc.num_heads, head_dim=mc.head_dim,
                   chunk_tokens=cfg.chunk_tokens, device="cpu", dtype=dtype, max_chunks=4,
                   **(cfg.index_options or {}))
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--index {cfg.index} with options {cfg.index_options} is refused ({e}); "
                          "fix index_options") from None
    except ImportError as e:
        raise ConfigError(f"--index {cfg.index} needs {e.name or 'a missing package'}; install it "
                          "or pick --index summary") from None
