"""Rotary position embeddings, including Llama 3.1's `llama3` frequency scaling."""
from __future__ import annotations

import math

import torch

from offload.errors import ModelLoadError


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies in float64 for precision: [D/2]."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # inv: [D/2]
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv  # wavelen: [D/2]
        low_wl, high_wl = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)  # smooth: [D/2]
        mid = (1 - smooth) * inv / factor + smooth * inv  # mid: [D/2]
        out = torch.where(wavelen > low_wl, inv / factor, inv)  # out: [D/2]
        is_mid = (wavelen >= high_wl) & (wavelen <= low_wl)
        return torch.where(is_mid, mid, out)
    if kind == "linear":
        return inv / float(scaling["factor"])
    raise ModelLoadError(f"rope_scaling type {kind!r} is not supported; supported: llama3, linear")
