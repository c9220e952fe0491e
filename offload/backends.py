"""Policy: which attention backend a session uses and how its KV is budgeted across tiers."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from offload.engine.dense import DenseAttention
from offload.tiers.base import ChunkShape


@dataclass(frozen=True)
class RuntimeSpec:
    """What a backend is planned and built from: the model's shape, the session's ctx, device, dtype, options."""
    model_config: object          # offload.model.config.ModelConfig
    ctx: int
    device: torch.device
    dtype: torch.dtype
    config: object                # offload.config.OffloadConfig
    weight_bytes: int | None = None   # device bytes of the weights as they will load (quantized ones at block size)


def _geometry(cfg) -> tuple[int, int, int]:
    """(chunk tokens, sink chunks, window chunks) of a config: sinks and window round up to whole chunks."""
    C = cfg.chunk_tokens
    return C, math.ceil(cfg.sink_tokens / C), math.ceil(cfg.window_tokens / C)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def mode(spec: RuntimeSpec, plan_=None, cfg=None) -> str:
    """'full' (exact) or 'sparse'. 'auto': on the GPU, exact while the whole KV fits there (faster and exact:
    9.4 vs ~30 ms/token for the 8B model), sparse once it must be offloaded; on the CPU always exact."""
    m = (cfg or spec.config).attention
    if m == "auto":
        fits = plan_ is not None and fits_on_device(plan_, spec.model_config)
        return "sparse" if spec.device.type == "cuda" and not fits else "full"
    return m


def weight_bytes(mc, dtype: torch.dtype) -> int:
    """Parameter bytes from the architecture alone (the planner runs before weights load)."""
    H, D, I = mc.hidden_size, mc.head_dim, mc.intermediate_size
    per_layer = H * (mc.num_heads + 2 * mc.num_kv_heads) * D + mc.num_heads * D * H + 3 * H * I + 2 * H
    n = mc.vocab_size * H * (1 if mc.tie_word_embeddings else 2) + mc.num_layers * per_layer + H
    return n * _itemsize(dtype)


def _weight_bytes(spec) -> int:
    """What the loader counted from the headers (quantized matrices at block size), else the architecture's."""
    counted = getattr(spec, "weight_bytes", None)
    return counted if counted is not None else weight_bytes(spec.model_config, spec.dtype)


def plan(spec: RuntimeSpec, cfg=None, weights_loaded: bool = False):
    """The BudgetPlan of cfg (default spec.config). index "auto": the first of offload.selection's presets that
    fits in its index's default layout (the accurate one, else whole chunks), recorded in BudgetPlan.selection;
    selection.apply(cfg, plan) gives the concrete config a session runs."""
    from offload import selection
    from offload.errors import CapacityError
    cfg = cfg or spec.config
    tries = selection.choices(cfg, spec.model_config.head_dim)
    for i, (_, concrete) in enumerate(tries):
        last = i == len(tries) - 1
        try:
            p = _plan(spec, concrete, weights_loaded, compact=last)
        except CapacityError:
            if last:
                raise
            continue
        if not last and (p.disk_chunks or p.kv_dtype != "bf16"):
            # where the accurate preset was not measured: KV on the drive (its prefetch reads whole chunks ahead,
            # tiers/prefetch.py) or packed host KV (a resumed prompt cache rebuilds shadows from lossy keys)
            continue
        return dataclasses.replace(p, selection=selection.chosen_fields(cfg, concrete))
    raise AssertionError("unreachable")


def _plan(spec: RuntimeSpec, cfg, weights_loaded: bool, compact: bool = True):
    """Split the KV of spec.ctx tokens over GPU / host / disk, or raise CapacityError with the fix.

    weights_loaded: the weights already sit in the memory the planner measures (a session planned after
    load, e.g. with overrides), so they are not subtracted a second time.

    A sparse session on the GPU also holds its index's metadata there (bounds, shadows: up to GiBs at 1M
    tokens); that is reserved first, so the KV tier never takes memory the index will need later.
    """
    from offload.errors import CapacityError
    from offload.kernels.quant import packed_format
    from offload.planner import plan_budget
    mc = spec.model_config
    C, n_sink, n_window = _geometry(cfg)

    kd = "bf16" if cfg.kv_dtype == "auto" else cfg.kv_dtype

    def budget(index_bytes: int, stage: int = 0):
        cold = None if kd == "bf16" else packed_format(kd, ChunkShape(mc.num_kv_heads, C, mc.head_dim, spec.dtype)).chunk_bytes
        return plan_budget(mc.num_layers, mc.num_kv_heads, mc.head_dim, _itemsize(spec.dtype), spec.ctx,
                           0 if weights_loaded else _weight_bytes(spec), spec.device, gpu_mem=cfg.gpu_mem,
                           host_mem=cfg.host_mem,
                           disk_mem=cfg.disk_mem, disk_dir=cfg.disk_dir, chunk_tokens=C, sink_chunks=n_sink,
                           window_chunks=n_window, index_bytes=index_bytes, kv_dtype=kd, cold_chunk_bytes=cold,
                           stage_bytes=stage)
    try:
        p = budget(0)
    except CapacityError:
        if cfg.kv_dtype != "auto":
            raise
        kd, p = "int8", None
    if cfg.kv_dtype == "auto" and kd == "bf16" and p.host_chunks + p.disk_chunks:
        kd = "int8"        # auto: KV that leaves the GPU is held in int8 (bench/RESULTS.md, issue 12)
    if p is None or p.kv_dtype != kd:
        p = budget(0)
    sparse = cfg.attention == "sparse" or (cfg.attention == "auto" and not fits_on_device(p, mc))
    if spec.device.type == "cuda" and (sparse or not fits_on_device(p, mc)):     # a tiered session
        # its prefill window and streamed blocks (engine/staging.py): a window, three quarter-window blocks
        # in flight, and a put's chunk copies
        stage = 2 * prefill_stage_bytes(p) + (128 << 20) + long_chunk_bytes(mc, cfg)
        if not sparse:
            return budget(0, stage)
        chosen = ()
        try:
            p = budget(index_gpu_bytes(spec, cfg), stage)
        except CapacityError:
            # an index the GPU cannot hold at this ctx takes its compact layout, unless the user set those options
            layout = COMPACT_INDEX.get(cfg.index, {}) if compact else {}
            if not layout or set(layout) & set(cfg.index_options or {}):
                raise
            chosen = tuple(layout.items())
            p = budget(index_gpu_bytes(spec, cfg, layout), stage)
        return dataclasses.replace(p, index_options=chosen)
    return p


# Policy: the layout an index takes when its default does not fit the GPU beside the weights (Llama-3-8B at 1M
# under a 24 GiB cap: device shadows 18 GiB, native summary bounds 4 GiB). Shadows on the host: only the candidates'
# shadows cross PCIe per step (exact same selection; the step is not captured). Summary: int8 bounds (rounded
# outward, still bounds) of 4-chunk groups on the GPU, per-chunk int8 bounds on the host (0.55 GiB at 1M).
COMPACT_INDEX = {"shadow": {"shadows_on": "host"},
                 "summary": {"bounds": "int8", "coarse_group": 4, "host_bounds": "int8"}}


def index_gpu_bytes(spec: RuntimeSpec, cfg, options: dict | None = None) -> int:
    """GPU bytes of sparse selection at full ctx: every layer's index buffers, plus the largest temporaries of one
    layer's build or select (layers build and select one at a time, so those count once), plus the token stage's
    scratch. options: index options the planner chose on top of the user's (shadows_on)."""
    from offload.indexes import Budget
    mc = spec.model_config
    C, n_sink, n_window = _geometry(cfg)
    n = math.ceil(spec.ctx / C)
    idx = new_index(spec, cfg, device="cpu", options=options)
    b = Budget.parse(cfg.budget, cfg.streaming_heads)
    width = max(b.chunks(spec.ctx, C, layer) for layer in range(mc.num_layers))
    if cfg.select_unit == "token":
        width = math.ceil(width * float(cfg.token_candidates))
    width = min(n, width + n_sink + n_window)                # the index is asked for want + sinks + window
    scratch = getattr(idx, "scratch_bytes", None)
    build, peak = (scratch(), scratch(n, width)) if scratch else (0, 0)
    return (mc.num_layers * (idx.gpu_bytes(n) - build) + max(build, peak)
            + token_stage_bytes(mc, cfg, spec.ctx, spec.dtype))


def token_stage_bytes(mc, cfg, ctx: int, dtype) -> int:
    """GPU scratch of the token stage at full ctx (one layer at a time; 0 for select_unit=chunk): the candidate
    keys, their fp32 copy, the picked rows and the per-query-head scores. At 1M tokens and a 5% budget this is
    over 1 GiB, so the planner takes it from the KV tier up front instead of failing mid-session."""
    if cfg.select_unit != "token":
        return 0
    from offload.indexes import Budget
    C, n_sink, n_window = _geometry(cfg)
    n = math.ceil(ctx / C)
    fixed = n_sink + n_window
    b = Budget.parse(cfg.budget, cfg.streaming_heads)
    most = max(b.chunks(ctx, C, layer) for layer in range(mc.num_layers))
    # candidate columns per KV head: the index is asked for want + fixed ids (sinks and window among them
    # come back as padding), and every column is gathered
    m = (max(0, min(n - fixed, math.ceil(most * float(cfg.token_candidates)))) + fixed) * C
    picked = min(m, most * C)
    el = _itemsize(dtype)
    keys = mc.num_kv_heads * m * mc.head_dim * (2 * el + 4)          # gathered keys (+ a part's, added in) + fp32 copy
    scores = 3 * mc.num_heads * m * 4                                # q.k, softmax shares, masked copies
    rows = 2 * mc.num_kv_heads * picked * mc.head_dim * (el + 4)     # picked K and V, fp32 for attention
    return keys + scores + rows


def new_index(spec: RuntimeSpec, cfg, device=None, options: dict | None = None):
    """A fresh (empty) index of the configured method for one layer; buffers stop growing at ctx. options: what
    the planner chose on top of cfg.index_options (BudgetPlan.index_options)."""
    from offload.indexes import make_index
    mc, C = spec.model_config, cfg.chunk_tokens
    return make_index(cfg.index, num_kv_heads=mc.num_kv_heads, num_q_heads=mc.num_heads, head_dim=mc.head_dim,
                      chunk_tokens=C, device=device or spec.device, dtype=spec.dtype,
                      max_chunks=math.ceil(spec.ctx / C), **{**(cfg.index_options or {}), **(options or {})})


def long_chunk_bytes(mc, cfg) -> int:
    """Extra GPU bytes of a long forward on CUDA (engine/runner.py runs it in stream_chunk tokens, not
    prefill_chunk), per extra token: the attention's float32 running output and merge temporaries
    (3 x Hq x D x 4), its bf16 query and cuDNN output (2 x Hq x D x 2), and the hidden states of the chunk
    in use, the next one read ahead and the last one being written back, plus the MLP's output (4 x H x 2).
    The MLP's own temporaries keep their 2K-row pieces (model/llama.py)."""
    extra = max(0, cfg.stream_chunk - cfg.prefill_chunk)
    return extra * (mc.num_heads * mc.head_dim * 16 + mc.hidden_size * 8)


def prefill_stage_bytes(p) -> int:
    """Device bytes of a tiered prefill's window (engine/staging.py): one layer's KV at the full context, at most
    512 MiB (128K tokens of an 8B layer: a 128K prompt never streams; longer ones stream the rest in blocks).
    The planner reserves twice this beside the activations (`plan`)."""
    return min(512 << 20, p.chunk_bytes * math.ceil(p.ctx / p.chunk_tokens))


def fits_on_device(p, mc) -> bool:
    return p.gpu_chunks >= mc.num_layers * math.ceil(p.ctx / p.chunk_tokens)


def make(spec: RuntimeSpec, plan_=None, cfg=None):
    """The attention backend for a new session; plan_: the BudgetPlan of spec.config (re-planned for another cfg)."""
    from offload import selection
    cfg = cfg or spec.config
    mc = spec.model_config
    # a session with overrides is planned now, with the weights already loaded (and counted as used)
    p = plan_ if plan_ is not None and cfg is spec.config else plan(spec, cfg, weights_loaded=True)
    cfg = selection.apply(cfg, p)       # index "auto": the preset the planner chose
    m = mode(spec, plan_, cfg)    # 'auto' asks whether the session's KV fits as the LLM was planned
    if m == "full" and fits_on_device(p, mc):
        from offload.engine.sparse_prefill import SparsePrefill
        return DenseAttention(mc.num_layers, mc.num_kv_heads, mc.head_dim, spec.ctx, spec.device, spec.dtype,
                              static=spec.device.type == "cuda",
                              sparse_prefill=SparsePrefill() if cfg.prefill == "sparse" else None)
    from offload.engine.tiered import TieredAttention
    from offload.indexes import Budget
    from offload.indexes.selector import Selector
    from offload.tiers.store import TieredKVStore

    C, n_sink, n_window = _geometry(cfg)
    store = TieredKVStore(ChunkShape(mc.num_kv_heads, C, mc.head_dim, spec.dtype), mc.num_layers, p.capacities,
                          spec.device, disk_dir=cfg.disk_dir, policy=cfg.policy, sink_chunks=n_sink,
                          window_chunks=n_window, kv_dtype=p.kv_dtype, promote_hot=cfg.promote_hot)
    indexes, budget = None, None
    if m == "sparse":
        budget = Budget.parse(cfg.budget, cfg.streaming_heads)
        for layer in range(mc.num_layers):   # refuse heads or per-layer lists that do not fit the model now
            budget.head_chunks(layer, mc.num_kv_heads, spec.ctx, C)
        # built now, so a bad method or option fails before any KV is stored
        indexes = [new_index(spec, cfg, options=dict(p.index_options)) for _ in range(mc.num_layers)]
    token = cfg.select_unit == "token" and m == "sparse"
    selector = Selector(num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads, chunk_tokens=C, n_sink=n_sink,
                        n_window=n_window, device=spec.device, indexes=indexes, budget=budget,
                        token_candidates=float(cfg.token_candidates) if token else None, token_reduce=cfg.token_reduce,
                        token_mass=float(cfg.token_mass or 0.0), token_floor=int(cfg.token_floor),
                        token_scores=cfg.token_scores)
    backend = TieredAttention(num_q_heads=mc.num_heads, head_dim=mc.head_dim, ctx=spec.ctx, store=store,
                              selector=selector, stage_bytes=prefill_stage_bytes(p))
    if cfg.prefill == "sparse":              # long prompts at 1M prefill on this backend: sparse applies here too
        from offload.engine.sparse_prefill import PrefillStats, SparsePrefill
        backend.sparse_prefill, backend.prefill_stats = SparsePrefill(), PrefillStats()
    return backend
