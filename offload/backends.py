"""Policy: which attention backend a session uses and how its KV is budgeted across tiers."""
from __future__ import annotations

import math

import torch

from offload.engine.dense import DenseAttention
from offload.tiers.base import ChunkShape



def mode(llm, cfg=None) -> str:
    """'full' (exact) or 'sparse'. 'auto': on the GPU, exact while the whole KV fits there (faster and exact:
    9.4 vs ~30 ms/token for the 8B model), sparse once it must be offloaded; on the CPU always exact."""
    m = (cfg or llm.config).attention
    if m == "auto":
        fits = getattr(llm, "plan", None) is not None and fits_on_device(llm.plan, llm.model_config)
        return "sparse" if llm.device.type == "cuda" and not fits else "full"
    return m


def weight_bytes(mc, dtype: torch.dtype) -> int:
    """Parameter bytes from the architecture alone (the planner runs before weights load)."""
    H, D, I = mc.hidden_size, mc.head_dim, mc.intermediate_size
    per_layer = H * (mc.num_heads + 2 * mc.num_kv_heads) * D + mc.num_heads * D * H + 3 * H * I + 2 * H
    n = mc.vocab_size * H * (1 if mc.tie_word_embeddings else 2) + mc.num_layers * per_layer + H
    return n * torch.empty((), dtype=dtype).element_size()


def plan(llm, cfg=None):
    """Split the KV of llm.ctx tokens over GPU / host / disk, or raise CapacityError with the fix.

    A sparse session on the GPU also holds its index's metadata there (bounds, shadows: up to GiBs at 1M
    tokens); that is reserved first, so the KV tier never takes memory the index will need later.
    """
    from offload.planner import plan_budget
    cfg = cfg or llm.config
    mc, C = llm.model_config, cfg.chunk_tokens

    def budget(index_bytes: int):
        return plan_budget(mc.num_layers, mc.num_kv_heads, mc.head_dim, torch.empty((), dtype=llm.dtype).element_size(),
                           llm.ctx, weight_bytes(mc, llm.dtype), llm.device, gpu_mem=cfg.gpu_mem, host_mem=cfg.host_mem,
                           disk_mem=cfg.disk_mem, disk_dir=cfg.disk_dir, chunk_tokens=C,
                           sink_chunks=math.ceil(cfg.sink_tokens / C), window_chunks=math.ceil(cfg.window_tokens / C),
                           index_bytes=index_bytes)
    p = budget(0)
    sparse = cfg.attention == "sparse" or (cfg.attention == "auto" and not fits_on_device(p, mc))
    if sparse and llm.device.type == "cuda":
        index = mc.num_layers * new_index(llm, cfg, device="cpu").gpu_bytes(math.ceil(llm.ctx / C))
        p = budget(index + token_stage_bytes(mc, cfg, llm.ctx, llm.dtype))
    return p


def token_stage_bytes(mc, cfg, ctx: int, dtype) -> int:
    """GPU scratch of the token stage at full ctx (one layer at a time; 0 for select_unit=chunk): the candidate
    keys, their fp32 copy, the picked rows and the per-query-head scores. At 1M tokens and a 5% budget this is
    over 1 GiB, so the planner takes it from the KV tier up front instead of failing mid-session."""
    if cfg.select_unit != "token":
        return 0
    from offload.indexes import Budget
    C = cfg.chunk_tokens
    n = math.ceil(ctx / C)
    fixed = math.ceil(cfg.sink_tokens / C) + math.ceil(cfg.window_tokens / C)
    b = Budget.parse(cfg.budget, cfg.streaming_heads)
    most = max(b.chunks(ctx, C, layer) for layer in range(mc.num_layers))
    # candidate columns per KV head: the index is asked for want + fixed ids (sinks and window among them
    # come back as padding), and every column is gathered
    m = (max(0, min(n - fixed, math.ceil(most * float(cfg.token_candidates)))) + fixed) * C
    picked = min(m, most * C)
    el = torch.empty((), dtype=dtype).element_size()
    keys = mc.num_kv_heads * m * mc.head_dim * (2 * el + 4)          # gathered keys (+ a part's, added in) + fp32 copy
    scores = 3 * mc.num_heads * m * 4                                # q.k, softmax shares, masked copies
    rows = 2 * mc.num_kv_heads * picked * mc.head_dim * (el + 4)     # picked K and V, fp32 for attention
    return keys + scores + rows


def new_index(llm, cfg, device=None):
    """A fresh (empty) index of the configured method for one layer; buffers stop growing at ctx."""
    from offload.indexes import make_index
    mc, C = llm.model_config, cfg.chunk_tokens
    return make_index(cfg.index, num_kv_heads=mc.num_kv_heads, num_q_heads=mc.num_heads, head_dim=mc.head_dim,
                      chunk_tokens=C, device=device or llm.device, dtype=llm.dtype,
                      max_chunks=math.ceil(llm.ctx / C), **(cfg.index_options or {}))


def fits_on_device(p, mc) -> bool:
    return p.gpu_chunks >= mc.num_layers * math.ceil(p.ctx / p.chunk_tokens)


def make(llm, cfg=None):
    """The attention backend for a new session."""
    cfg = cfg or llm.config
    mc = llm.model_config
    p = llm.plan if cfg is llm.config else plan(llm, cfg)
    m = mode(llm, cfg)
    if m == "full" and fits_on_device(p, mc):
        from offload.engine.sparse_prefill import SparsePrefill
        return DenseAttention(mc.num_layers, mc.num_kv_heads, mc.head_dim, llm.ctx, llm.device, llm.dtype,
                              static=llm.device.type == "cuda",
                              sparse_prefill=SparsePrefill() if cfg.prefill == "sparse" else None)
    from offload.engine.tiered import TieredAttention
    from offload.indexes import Budget
    from offload.tiers.store import TieredKVStore

    C = cfg.chunk_tokens
    store = TieredKVStore(ChunkShape(mc.num_kv_heads, C, mc.head_dim, llm.dtype), mc.num_layers, p.capacities,
                          llm.device, disk_dir=cfg.disk_dir, policy=cfg.policy,
                          sink_chunks=math.ceil(cfg.sink_tokens / C), window_chunks=math.ceil(cfg.window_tokens / C))
    make_idx, budget = None, None
    if m == "sparse":
        budget = Budget.parse(cfg.budget, cfg.streaming_heads)
        for layer in range(mc.num_layers):   # refuse heads or per-layer lists that do not fit the model now
            budget.head_chunks(layer, mc.num_kv_heads, llm.ctx, C)
        new_index(llm, cfg)   # build one now so a bad method or option fails before any KV is stored
        make_idx = lambda: new_index(llm, cfg)  # noqa: E731
    return TieredAttention(num_layers=mc.num_layers, num_q_heads=mc.num_heads, num_kv_heads=mc.num_kv_heads,
                           head_dim=mc.head_dim, ctx=llm.ctx, device=llm.device, dtype=llm.dtype, store=store,
                           chunk_tokens=C, mode=m, make_index=make_idx, budget=budget,
                           sink_tokens=cfg.sink_tokens, window_tokens=cfg.window_tokens, select_unit=cfg.select_unit,
                           token_candidates=float(cfg.token_candidates), token_reduce=cfg.token_reduce)
