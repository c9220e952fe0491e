"""Budget planner: tier capacities add up, detection uses the right sources, refusals say what to change."""
from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from offload import planner
from offload.errors import CapacityError
from offload.planner import plan_budget

GiB = 1 << 30
LLAMA8B = dict(num_layers=32, num_kv_heads=8, head_dim=128, dtype_bytes=2)   # 128 KiB of KV per token
VM = namedtuple("VM", "available total")
DU = namedtuple("DU", "total used free")


@pytest.fixture
def machine(monkeypatch):
    """A fake PC: 64 GiB RAM with 60 available, a 1 TiB disk with 500 GiB free."""
    import psutil
    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM(60 * GiB, 64 * GiB))
    monkeypatch.setattr(planner.shutil, "disk_usage", lambda p: DU(1024 * GiB, 524 * GiB, 500 * GiB))


def test_refusal_names_need_budgets_and_fix(tmp_path, machine):
    with pytest.raises(CapacityError) as e:
        plan_budget(**LLAMA8B, ctx=1 << 20, weight_bytes=16 * GiB, device="cpu", gpu_mem=6 * GiB,
                    host_mem=48 * GiB, disk_mem=40 * GiB, disk_dir=str(tmp_path))
    assert str(e.value) == ("ctx 1M needs 128 GiB of KV; GPU 6 + host 48 + disk 40 = 94 GiB available; "
                            "raise --disk-mem or lower --ctx, or compress host and disk KV with --kv-dtype int8 "
                            "(0.56x) or int4 (0.31x)")
    with pytest.raises(CapacityError, match="pass --disk-dir"):
        plan_budget(**LLAMA8B, ctx=1 << 20, weight_bytes=0, device="cpu", gpu_mem=6 * GiB, host_mem=48 * GiB)


@pytest.mark.parametrize("ctx", [4096, 128 << 10, 1 << 20, 1000003])
def test_plan_fills_gpu_then_host_then_disk(tmp_path, machine, ctx):
    budgets = dict(gpu_mem=6 * GiB, host_mem=40 * GiB, disk_mem=200 * GiB)
    p = plan_budget(**LLAMA8B, ctx=ctx, weight_bytes=16 * GiB, device="cpu", disk_dir=str(tmp_path),
                    chunk_tokens=64, **budgets)
    total = 32 * -(-ctx // 64)
    assert p.chunk_bytes == 2 * 8 * 64 * 128 * 2 and p.kv_bytes == total * p.chunk_bytes
    assert p.gpu_chunks + p.host_chunks + p.disk_chunks == max(total, 32 * 5)
    assert (p.gpu_bytes, p.host_bytes, p.disk_bytes) == tuple(c * p.chunk_bytes for c in p.capacities)
    for used, budget in zip((p.gpu_bytes, p.host_bytes, p.disk_bytes), budgets.values()):
        assert used <= budget
    # a lower tier is used only when the ones above are full
    if p.host_chunks:
        assert p.gpu_chunks == 6 * GiB // p.chunk_bytes
    if p.disk_chunks:
        assert p.host_chunks == 40 * GiB // p.chunk_bytes
    line = p.summary()
    assert "\n" not in line and "GPU" in line and "host" in line


def test_detected_budgets_leave_headroom(tmp_path, machine):
    p = plan_budget(**LLAMA8B, ctx=1 << 20, weight_bytes=16 * GiB, device="cpu", gpu_mem=6 * GiB,
                    disk_dir=str(tmp_path))
    gpu, host, disk = p.available
    assert host == 60 * GiB - int(0.2 * 64 * GiB) - 16 * GiB - 6 * GiB        # RAM headroom, weights, "GPU"
    assert disk == 500 * GiB - int(0.05 * 1024 * GiB)
    assert p.disk_chunks > 0 and p.disk_dir == str(tmp_path)


def test_cuda_budget_detection_and_refusal(monkeypatch, machine):
    monkeypatch.setattr(planner, "_detect_gpu", lambda device: 23 * GiB)
    monkeypatch.setattr(planner, "_gpu_usable_total", lambda device: 24 * GiB)
    p = plan_budget(**LLAMA8B, ctx=32 << 10, weight_bytes=16 * GiB, device="cuda")
    reserve = max(int(1.5 * GiB), int(0.1 * 24 * GiB))
    assert p.gpu_reserve_bytes == reserve and p.available[0] == 23 * GiB - 16 * GiB - reserve
    assert p.gpu_chunks == 32 * 1024 and p.host_chunks == 0                   # 4 GiB of KV fits on the GPU
    with pytest.raises(CapacityError, match="lower --gpu-mem"):
        plan_budget(**LLAMA8B, ctx=32 << 10, weight_bytes=16 * GiB, device="cuda", gpu_mem=8 * GiB)


def test_pinned_window_and_disk_mem_refusals(tmp_path, machine):
    with pytest.raises(CapacityError, match="sinks and local windows .* raise --gpu-mem"):
        plan_budget(**LLAMA8B, ctx=8192, weight_bytes=0, device="cpu", gpu_mem=1 << 20, host_mem=GiB)
    with pytest.raises(CapacityError, match="lower --disk-mem"):
        plan_budget(**LLAMA8B, ctx=8192, weight_bytes=0, device="cpu", disk_mem=800 * GiB, disk_dir=str(tmp_path))
    with pytest.raises(CapacityError, match="--disk-dir"):
        plan_budget(**LLAMA8B, ctx=8192, weight_bytes=0, device="cpu", disk_mem=8 * GiB)


def test_plan_drives_a_store(tmp_path, machine):
    from offload.tiers import ChunkShape, TieredKVStore
    p = plan_budget(num_layers=2, num_kv_heads=2, head_dim=8, dtype_bytes=4, ctx=400, weight_bytes=0,
                    device="cpu", gpu_mem=12 * 512, host_mem=10 * 512, disk_mem=1 << 20,
                    disk_dir=str(tmp_path), chunk_tokens=4)
    assert p.capacities == (12, 10, 178)
    with TieredKVStore(ChunkShape(2, 4, 8, torch.float32), 2, p, "cpu", str(tmp_path)) as store:
        for layer in range(2):
            store.put(layer, 0, torch.randn(100, 2, 2, 4, 8))
        assert store.stats()["bytes_in_use_disk"] == 178 * 512


def test_sparse_index_metadata_is_reserved_on_the_gpu(monkeypatch, machine):
    monkeypatch.setattr(planner, "_detect_gpu", lambda device: 23 * GiB)
    monkeypatch.setattr(planner, "_gpu_usable_total", lambda device: 24 * GiB)
    plain = plan_budget(**LLAMA8B, ctx=256 << 10, weight_bytes=16 * GiB, device="cuda")
    with_index = plan_budget(**LLAMA8B, ctx=256 << 10, weight_bytes=16 * GiB, device="cuda", index_bytes=2 * GiB)
    assert plain.gpu_bytes - with_index.gpu_bytes >= 2 * GiB - plain.chunk_bytes
    assert "sparse index 2 GiB" in with_index.summary() and with_index.index_bytes == 2 * GiB
    with pytest.raises(CapacityError, match="to sparse selection"):
        plan_budget(**LLAMA8B, ctx=256 << 10, weight_bytes=16 * GiB, device="cuda", gpu_mem=4 * GiB,
                    index_bytes=2 * GiB)


def _llama8b_llm(cfg):
    """What backends.plan reads of an LLM, for the 8B architecture on a (faked) CUDA device."""
    from types import SimpleNamespace

    from offload.model.config import ModelConfig
    mc = ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                     num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=5e5,
                     rope_scaling=None, max_position_embeddings=1 << 20, tie_word_embeddings=False,
                     attention_bias=False)
    return SimpleNamespace(config=cfg, model_config=mc, dtype=torch.bfloat16, device=torch.device("cuda"),
                           ctx=cfg.ctx)


def test_token_stage_scratch_is_reserved_with_the_index(monkeypatch, machine, tmp_path):
    from offload import OffloadConfig, backends
    monkeypatch.setattr(planner, "_detect_gpu", lambda device: 23 * GiB)
    monkeypatch.setattr(planner, "_gpu_usable_total", lambda device: 24 * GiB)
    # native bounds named: the planner's compact fallback (int8 two-level bounds) would otherwise make room
    opts = dict(ctx="1M", attention="sparse", budget="5%", host_mem="40GiB", disk_dir=str(tmp_path),
                index="summary", index_options={"bounds": "native"})
    chunk_cfg, token_cfg = OffloadConfig(**opts), OffloadConfig(**opts, select_unit="token", token_candidates=4)
    # a 24 GiB card: 16 GiB of weights, the summary bounds and 4x candidates of a 5% budget leave no KV tier
    with pytest.raises(CapacityError, match="sparse selection .* lower --budget .* use chunk"):
        backends.plan(_llama8b_llm(token_cfg))
    monkeypatch.setattr(planner, "_detect_gpu", lambda device: 47 * GiB)
    monkeypatch.setattr(planner, "_gpu_usable_total", lambda device: 48 * GiB)
    chunk, token = backends.plan(_llama8b_llm(chunk_cfg)), backends.plan(_llama8b_llm(token_cfg))
    scratch = backends.token_stage_bytes(_llama8b_llm(token_cfg).model_config, token_cfg, 1 << 20, torch.bfloat16)
    assert scratch > 1 * GiB                       # 4 x 5% of 1M tokens of candidate keys per layer
    assert token.index_bytes - chunk.index_bytes == scratch
    assert chunk.gpu_bytes - token.gpu_bytes >= scratch - chunk.chunk_bytes   # taken from the GPU KV tier
    assert backends.token_stage_bytes(_llama8b_llm(chunk_cfg).model_config, chunk_cfg, 1 << 20, torch.bfloat16) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_freed_cache_counts_as_free_under_a_cap():
    """Memory the caching allocator keeps after tensors are freed is ours to reuse: a benchmark that freed
    8 GiB must not make the planner refuse the next model."""
    dev = torch.device("cuda")
    before = planner._detect_gpu(dev)
    x = torch.empty(4 << 30, dtype=torch.uint8, device=dev)   # x: [4 GiB]
    during = planner._detect_gpu(dev)
    del x                                                     # freed, but still reserved by the allocator
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() >= 4 << 30
    after = planner._detect_gpu(dev)
    assert during <= before - (4 << 30) + (64 << 20)
    assert after >= before - (64 << 20)
    torch.cuda.empty_cache()


def test_session_with_overrides_is_planned_with_the_weights_already_loaded(monkeypatch, tmp_path):
    """llm.session(prefill=...) re-plans after load: the weights are then part of what the device reports as
    used, and subtracting them again refused the 8B model on a 24 GiB card (7 GiB free beside its weights)."""
    from offload import OffloadConfig, backends
    monkeypatch.setattr(planner, "_detect_gpu", lambda device: 7 * GiB)      # 24 GiB card, 16 GiB of weights in
    monkeypatch.setattr(planner, "_gpu_usable_total", lambda device: 24 * GiB)
    spec = _llama8b_llm(OffloadConfig(ctx="128K", attention="full", host_mem="40GiB"))
    with pytest.raises(CapacityError, match="weights do not fit"):
        backends.plan(spec)                                  # before load: 7 GiB cannot take 15 GiB of weights
    after = backends.plan(spec, weights_loaded=True)
    # the free memory less the activation and prefill-staging reserve (whole chunks of every layer); the reserve
    # holds the window, streamed blocks and 8K-token prefill chunks' activations (backends.long_chunk_bytes)
    room = 7 * GiB - after.gpu_reserve_bytes
    assert 2.5 * GiB <= room - after.chunk_bytes * after.num_layers < after.gpu_bytes <= room
    # and the runtime does re-plan that way: a session with overrides on the tiny CPU model
    from fixtures_models import write_tiny_checkpoint
    from offload import LLM
    llm = LLM(str(write_tiny_checkpoint(tmp_path, "llama").path), device="cpu", ctx=256)
    seen, real = [], backends.plan
    monkeypatch.setattr(backends, "plan", lambda *a, **k: seen.append(k.get("weights_loaded")) or real(*a, **k))
    llm.session(prefill="sparse").close()
    assert seen and all(seen)           # every re-plan of a session (and its room check) counts the weights as in
