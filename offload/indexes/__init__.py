"""Chunk selection for the sparse decode step: which KV chunks each KV head attends to.

    index = make_index("summary", num_kv_heads=8, num_q_heads=32, head_dim=128, chunk_tokens=64,
                       device="cuda", dtype=torch.bfloat16, bounds="int8")
    index.build(layer_keys)                      # [Hkv, N, D] post-RoPE
    ids = index.select(q, budget=Budget.parse("2K").chunks(ctx, 64))   # [Hkv, k] best first

Methods: "summary" (Quest min/max bounds, `ChunkSummaryIndex`), "shadow" (low-rank key shadows,
`ShadowKeyIndex`), "ann" (faiss-cpu IVF over keys, `FaissANNIndex`; with option search="gpu" the lists are scored on
the device instead, `DeviceANNIndex`, no faiss). bench/index_recall.py compares
them (recall of attention mass, latency, bytes per token). For 1M tokens on a 24 GB card the GPU
metadata must stay <= 1 GiB: summary with bounds="int8", coarse_group=4 (and host_bounds="int8")
keeps 0.25 GiB on the GPU and 1-2 GiB on the host for Llama-3-8B at 64-token chunks.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from offload.errors import ConfigError
from offload.indexes.budget import Budget   # no torch: config checks (--budget) stay instant

if TYPE_CHECKING:
    from offload.indexes.base import ChunkIndex

# the indexes and their metrics import torch (seconds); they load on first use, so a bad --budget or index
# option is refused without it
_LAZY = {"ChunkIndex": "base", "ChunkSummaryIndex": "summary", "ShadowKeyIndex": "shadow", "FaissANNIndex": "ann",
         "DeviceANNIndex": "ann_gpu", "chunk_attention_mass": "metrics", "mass_recall": "metrics"}

__all__ = ["ChunkIndex", "ChunkSummaryIndex", "ShadowKeyIndex", "FaissANNIndex", "DeviceANNIndex", "Budget", "make_index",
           "check_index_options",
           "METHODS", "chunk_attention_mass", "mass_recall"]

METHODS = ("summary", "shadow", "ann")


ANN_SEARCH = ("host", "gpu")    # option search of "ann": faiss scan on the host, or list ids scored on the device


def _index_class(method: str, options: dict | None = None):
    names = {"summary": "ChunkSummaryIndex", "shadow": "ShadowKeyIndex", "ann": "FaissANNIndex"}  # faiss: on ask
    if method not in names:
        raise ConfigError(f"unknown index method {method!r}; use one of {', '.join(map(repr, METHODS))} "
                          "(or 'auto', the default)")
    if method == "ann" and options and "search" in options:
        search = options["search"]
        if search not in ANN_SEARCH:
            raise ConfigError(f"index option search={search!r} is not valid; use one of "
                              f"{', '.join(map(repr, ANN_SEARCH))} in index_options")
        if search == "gpu":                          # no faiss: the device mode is its own class
            return __getattr__("DeviceANNIndex")
    return __getattr__(names[method])


_KINDS = {bool: ((bool,), "true or false"), int: ((int,), "a whole number"), float: ((int, float), "a number"),
          str: ((str,), "a string"), dict: ((dict,), "a mapping")}


# numeric options for which 0 is a meaningful setting although their default is positive
_ZERO_OK = frozenset({"min_candidates", "mass_radius", "min_ivf_tokens"})


def check_index_options(method: str, options: dict) -> None:
    """Unknown names and values of the wrong type -> one-line ConfigError (before any weight loads).

    The type is the constructor default's (an option whose default is None is checked by the index itself).
    "auto" (offload/selection.py) takes no options: the config refuses them before this is reached."""
    if method == "auto" and not options:
        return
    if method not in METHODS or options:     # an unknown method fails here, with or without options
        params = inspect.signature(_index_class(method, options)).parameters
    else:
        return                               # nothing to check: the index classes (and torch) need not load
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ConfigError(f"index method {method!r} has no option(s) {', '.join(map(str, unknown))}; "
                          f"valid: {', '.join(sorted(params))}")
    for name, value in options.items():
        default = params[name].default
        if default is inspect.Parameter.empty or default is None or type(default) not in _KINDS:
            continue
        want, words = _KINDS[type(default)]
        if (isinstance(value, bool) and bool not in want) or not isinstance(value, want):
            raise ConfigError(f"index option {name}={value!r} must be {words} (default {default!r}); "
                              f"fix index_options")
        if type(default) in (int, float) and (value < 0 or (value == 0 and default > 0 and name not in _ZERO_OK)):
            # counts, factors and fractions: 0 where the default is positive would select nothing
            raise ConfigError(f"index option {name}={value!r} must be {'positive' if default > 0 else '>= 0'} "
                              f"(default {default!r}); fix index_options")


_GEOMETRY = frozenset({"num_kv_heads", "num_q_heads", "head_dim", "chunk_tokens", "device", "dtype", "max_chunks"})


def make_index(method: str, **kw) -> ChunkIndex:
    """make_index(method, num_kv_heads=, num_q_heads=, head_dim=, chunk_tokens=, device=, dtype=, **options)."""
    cls = _index_class(method, kw)
    # the runtime passes the geometry (device may be a torch.device); only user options are type-checked
    check_index_options(method, {k: v for k, v in kw.items() if k not in _GEOMETRY})
    return cls(**kw)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"offload.indexes.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'offload.indexes' has no attribute {name!r}")
