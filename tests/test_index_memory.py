"""What the planner reserves for sparse selection against what the indexes really hold (issue 13, deliverable 5).

`--index shadow` ran out of memory at 128K under a 24 GiB cap: the planner accepted a session whose index then
could not allocate. The planner now counts every layer's index buffers plus one layer's largest build or select
temporaries (backends.index_gpu_bytes), and an index whose default layout cannot fit beside the weights takes its
compact one (backends.COMPACT_INDEX: shadows on the host, two-level int8 summary bounds).
"""
from __future__ import annotations

import math
from collections import namedtuple

import pytest
import torch

from fixtures_models import TIERED_OPTS, write_tiny_checkpoint
from offload import LLM, OffloadConfig, backends, planner
from offload.errors import CapacityError
from test_indexes import _LiveBytes

GiB = 1 << 30


# ---- the planner's choice at 128K and 1M (Llama-3-8B on a faked 24 GiB card) ----------------------
@pytest.fixture
def card_24gib(monkeypatch):
    import psutil
    monkeypatch.setattr(planner, "_detect_gpu", lambda device: 23 * GiB)      # 24 GiB cap, nothing loaded yet
    monkeypatch.setattr(planner, "_gpu_usable_total", lambda device: 24 * GiB)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: namedtuple("VM", "available total")(120 * GiB, 128 * GiB))


def _plan_8b(tmp_path, ctx: str, index: str, options=None):
    from test_planner import _llama8b_llm
    cfg = OffloadConfig(ctx=ctx, attention="sparse", budget="2K", index=index, index_options=options,
                        host_mem="48GiB", disk_dir=str(tmp_path), kv_dtype="int8")
    return backends.plan(_llama8b_llm(cfg))


@pytest.mark.parametrize("index", ["shadow", "summary"])
def test_an_index_that_cannot_fit_at_1m_takes_its_compact_layout(card_24gib, tmp_path, index):
    at_128k, at_1m = _plan_8b(tmp_path, "128K", index), _plan_8b(tmp_path, "1M", index)
    assert at_128k.index_options == ()                                      # the default layout fits at 128K
    assert at_1m.index_options == tuple(backends.COMPACT_INDEX[index].items())
    assert at_1m.index_bytes < 2.5 * GiB and at_1m.gpu_chunks > 0
    # what was reserved is what the compact index says it needs
    from test_planner import _llama8b_llm
    spec = _llama8b_llm(OffloadConfig(ctx="1M", attention="sparse", budget="2K", index=index))
    assert at_1m.index_bytes == backends.index_gpu_bytes(spec, spec.config, backends.COMPACT_INDEX[index])


def test_a_placement_the_user_chose_is_kept_or_refused(card_24gib, tmp_path):
    """Shadows pinned on the device at 1M (18 GiB) do not fit: refused in one line, not silently moved."""
    with pytest.raises(CapacityError, match="sparse selection"):
        _plan_8b(tmp_path, "1M", "shadow", {"shadows_on": "device"})
    assert _plan_8b(tmp_path, "1M", "shadow", {"shadows_on": "host"}).index_options == ()


def test_the_build_scratch_is_counted_once_not_per_layer(card_24gib, tmp_path):
    from test_planner import _llama8b_llm
    spec = _llama8b_llm(OffloadConfig(ctx="128K", attention="sparse", budget="2K", index="shadow"))
    one = backends.new_index(spec, spec.config, device="cpu")
    n = math.ceil((128 << 10) / 32)
    buffers = one.gpu_bytes(n) - one.scratch_bytes()
    got = backends.index_gpu_bytes(spec, spec.config)
    assert got == 32 * buffers + max(one.scratch_bytes(), one.scratch_bytes(n, 64 + 2 + 8))
    assert got < 32 * one.gpu_bytes(n)                                       # 31 scratches fewer than before


# ---- a session's indexes hold what the planner counted (CPU tensors, tiny model) ---------------------
def _watch(indexes, held, peak: list) -> None:
    """Wrap every layer index's build/extend/select: peak[0] = max over calls of (bytes all indexes held before
    the call + new storages live at the call's peak), counted with _LiveBytes (CPU tensors)."""
    for idx in indexes:
        for name in ("build", "extend", "select"):
            real = getattr(idx, name)

            def call(*a, _real=real, **k):
                before = sum(held(i) for i in indexes)
                with _LiveBytes() as mem:
                    out = _real(*a, **k)
                peak[0] = max(peak[0], before + mem.peak)
                return out
            setattr(idx, name, call)


@pytest.fixture(scope="module")
def tiny_8kv(tmp_path_factory):
    # 8 KV heads of 16 dims: the index shapes that matter, in a model small enough for the CPU
    return write_tiny_checkpoint(tmp_path_factory.mktemp("mem"), "llama", num_attention_heads=8,
                                 num_key_value_heads=8, hidden_size=128)


@pytest.mark.parametrize("index, options", [("summary", None), ("shadow", {"rank": 8}),
                                            ("summary", {"bounds": "int8", "coarse_group": 4, "host_bounds": "int8"}),
                                            ("ann", {"search": "gpu", "min_ivf_tokens": 128})])
def test_session_indexes_hold_what_the_planner_counts(tiny_8kv, index, options):
    llm = LLM(str(tiny_8kv.path), attention="sparse", budget="64", index=index, index_options=options,
              show_progress=False, **TIERED_OPTS)
    s = llm.session()
    peak = [0]
    _watch(s.attn.indexes, lambda i: i.nbytes["gpu"], peak)
    ids = torch.randint(0, 320, (470,), generator=torch.Generator().manual_seed(0)).tolist()
    s.prefill(ids[:440])
    for t in ids[440:]:                                   # decode across chunk boundaries: extends and selects
        s.step(t)
    n = math.ceil(llm.ctx / llm.config.chunk_tokens)
    one = backends.new_index(llm.spec, llm.config, device="cpu")
    reserved = backends.index_gpu_bytes(llm.spec, llm.config)
    # the buffers: exactly the planner's per-layer count, sized once for the whole context
    assert sum(i.nbytes["gpu"] for i in s.attn.indexes) == llm.model_config.num_layers * (
        one.gpu_bytes(n) - one.scratch_bytes())
    # buffers + the temporaries of any one call: within the reservation
    assert 0 < peak[0] <= reserved, (peak[0], reserved)
    llm.close()


# ---- the real allocator's peak on a GPU, every index, through the public API ----------------------------
@pytest.fixture(scope="module")
def attention_8b(tmp_path_factory):
    """Llama-3-8B's attention shapes (32 query heads, 8 KV heads of 128 dims) in 4 small layers."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("gpu-mem"), "llama", hidden_size=512, intermediate_size=1024,
                                 num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                 max_position_embeddings=65536)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ctx", [8192, 32768])
@pytest.mark.parametrize("index", ["summary", "shadow", "ann", "ann-gpu"])
def test_session_peak_within_the_plan_on_cuda(attention_8b, index, ctx):
    """An 8B-shaped attention (32 query heads, 8 KV heads of 128 dims) in 4 layers, KV mostly on the host:
    prefill ctx - 64 tokens + 40 decode steps. The indexes' own peak (what they hold + one call's temporaries,
    from torch.cuda.max_memory_allocated around each call) stays within plan.index_bytes, and the whole session's
    peak above what it held at start within plan.index_bytes + plan.gpu_reserve_bytes (activations, staging)."""
    options = {"search": "gpu"} if index == "ann-gpu" else None
    index = index.split("-")[0]
    llm = LLM(str(attention_8b.path), device="cuda", dtype="bfloat16", ctx=ctx, attention="sparse", budget="2K", index=index,
              index_options=options, gpu_mem="64MiB", host_mem="4GiB", show_progress=False)
    plan = llm.plan
    s = llm.session()
    host_ann = index == "ann" and options is None
    held = (lambda i: 0) if host_ann else (lambda i: i.nbytes["gpu"])     # host ann holds nothing on the GPU
    top, index_peak = [0], [0]

    def fold() -> None:
        top[0] = max(top[0], torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()

    for idx in s.attn.indexes:
        for name in ("build", "extend", "select"):
            real = getattr(idx, name)

            def call(*a, _real=real, **k):
                fold()
                before, own = torch.cuda.memory_allocated(), sum(held(i) for i in s.attn.indexes)
                out = _real(*a, **k)
                index_peak[0] = max(index_peak[0], own + torch.cuda.max_memory_allocated() - before)
                fold()
                return out
            setattr(idx, name, call)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, 320, (ctx - 24,), generator=torch.Generator().manual_seed(0)).tolist()
    logits = s.prefill(ids[:ctx - 64])
    for t in ids[ctx - 64:]:
        logits = s.step(t)
    for idx in s.attn.indexes:
        getattr(idx, "wait", lambda: None)()
    torch.cuda.synchronize()
    fold()
    assert torch.isfinite(logits).all()
    assert plan.index_bytes > 0 and index_peak[0] > 0
    assert index_peak[0] <= plan.index_bytes, f"{index}: index peak {index_peak[0] / 2**20:.1f} MiB > " \
                                              f"reserved {plan.index_bytes / 2**20:.1f} MiB"
    assert top[0] - base <= plan.index_bytes + plan.gpu_reserve_bytes, (top[0] - base, plan)
    llm.close()
