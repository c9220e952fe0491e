"""Policy: which attention backend a runtime uses and how its KV is budgeted across tiers."""
from __future__ import annotations

from offload.engine.dense import DenseAttention


def mode(llm) -> str:
    """'full' (exact) or 'sparse'; 'auto' is sparse on the GPU and full on the CPU."""
    m = llm.config.attention
    if m == "auto":
        return "sparse" if llm.device.type == "cuda" and _sparse_available() else "full"
    return m


def _sparse_available() -> bool:
    try:
        import offload.engine.sparse  # noqa: F401
        return True
    except ImportError:
        return False


def plan(llm, source):
    """Budget plan for the KV (None while everything fits on the compute device)."""
    return None


def make(llm):
    mc = llm.model_config
    return DenseAttention(mc.num_layers, mc.num_kv_heads, mc.head_dim, llm.ctx, llm.device, llm.dtype,
                          static=llm.device.type == "cuda")
