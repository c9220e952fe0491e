"""Sparse prefill (engine/sparse_prefill.py) against exact attention and a brute-force mass estimate."""
import pytest
import torch

from offload.engine.ops import causal_attend
from offload.engine.sparse_prefill import (PrefillStats, SparsePrefill, attend_blocks, block_mass,
                                           select_blocks, sparse_causal_attend, threshold_keep)

CFG = SparsePrefill(threshold=0.9, block=16, stride=4, sink_blocks=1, local_blocks=2, heads_per_call=3)


def peaked(Hq=6, Hkv=2, T=40, S=400, D=16, seed=0, device="cpu", dtype=torch.float32):
    """Keys with a few strongly matching blocks per KV head, so attention is concentrated (like real text)."""
    g = torch.Generator().manual_seed(seed)
    G = Hq // Hkv
    u = torch.nn.functional.normalize(torch.randn(Hkv, 1, D, generator=g), dim=-1)  # u: [Hkv, 1, D]
    q = torch.randn(Hq, T, D, generator=g) + 6 * u.repeat_interleave(G, 0)  # q: [Hq, T, D]
    k = torch.randn(Hkv, S, D, generator=g) * 0.3  # k: [Hkv, S, D]
    v = torch.randn(Hkv, S, D, generator=g)  # v: [Hkv, S, D]
    for h in range(Hkv):
        for blk in torch.randint(1, (S - T) // 16 - 3, (3,), generator=g).tolist():
            k[h, blk * 16:(blk + 1) * 16] += 4 * u[h, 0] * D ** 0.5 / 4
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def test_threshold_one_equals_exact_attention():
    q, k, v = peaked()
    stats = PrefillStats()
    got = sparse_causal_attend(q, k, v, 360, SparsePrefill(1.0, 16, 4, 1, 2, 4), stats)
    torch.testing.assert_close(got, causal_attend(q, k, v, 360), rtol=0, atol=2e-6)
    assert stats.chunks == 1 and stats.as_dict()["sparse_prefill_density"] == 1.0


def test_block_mass_equals_brute_force_antidiagonal_softmax():
    q, k, _ = peaked(Hq=4, Hkv=2, T=30, S=128, D=8)
    cfg = SparsePrefill(0.9, block=16, stride=4)
    got = block_mass(q, k, cfg)  # [Hq, nQ, nK]
    s, B, D = cfg.stride, cfg.block, q.shape[-1]
    want = torch.zeros_like(got)
    for h in range(4):
        qp = torch.cat([q[h], torch.zeros(32 - 30, D)])  # padded to 2 query blocks
        rows = []
        for r in range(32 // s):
            sc = torch.tensor([sum(float(qp[r * s + s - 1 - i] @ k[h // 2, c * s + i]) for i in range(s))
                               for c in range(128 // s)]) * D ** -0.5 / s
            rows.append(torch.softmax(sc, 0).view(128 // B, B // s).sum(1))
        rows = torch.stack(rows)  # [8 rows, nK]
        valid = (torch.arange(32 // s) * s < 30).float()
        for qb in range(2):
            w = valid[qb * 4:(qb + 1) * 4]
            want[h, qb] = (rows[qb * 4:(qb + 1) * 4] * w[:, None]).sum(0) / w.sum()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(4, 2), rtol=0, atol=1e-5)


def test_threshold_keep_is_the_smallest_prefix_reaching_the_mass():
    mass = torch.softmax(torch.randn(5, 7, 30, generator=torch.Generator().manual_seed(1)) * 2, -1)
    for t in (0.5, 0.9, 0.95):
        keep = threshold_keep(mass, t)
        kept = (mass * keep).sum(-1)
        assert (kept >= t - 1e-6).all()
        smallest = torch.where(keep, mass, torch.inf).amin(-1)   # dropping the smallest kept block falls short
        assert (kept - smallest < t).all()
    assert threshold_keep(mass, 1.0).all()


def test_selection_keeps_sinks_and_the_mass_and_skips_blocks():
    q, k, v = peaked(T=40, S=640)
    hist = k[:, :560]                  # 35 whole blocks before the local band
    idx = select_blocks(q, hist, CFG)  # [Hq, c]
    assert (idx[:, :1] == 0).all()      # sink block first (ids sorted)
    mass = block_mass(q, hist, CFG)
    mass[..., :1] = 0
    mass = mass / mass.sum(-1, keepdim=True)
    chosen = torch.zeros(6, 35, dtype=torch.bool).scatter(1, idx.clamp_min(0), idx >= 0)  # [Hq, nK]
    kept = (mass * chosen[:, None]).sum(-1)  # every (head, query block) keeps >= threshold of its estimate
    assert (kept >= CFG.threshold - 1e-6).all(), kept
    assert chosen.float().mean() < 0.6      # concentrated attention: most blocks skipped


def test_sparse_equals_exact_attention_over_its_chosen_blocks():
    """The output is exact attention restricted to sinks + chosen blocks + local band + causal square."""
    q, k, v = peaked(T=40, S=640, seed=2)
    off = 600
    cfg, B = CFG, CFG.block
    first_local = off // B - cfg.local_blocks
    idx = select_blocks(q, k[:, :first_local * B], cfg)
    allowed = torch.zeros(6, 640, dtype=torch.bool)  # [Hq, S]
    for h in range(6):
        for b in idx[h][idx[h] >= 0].tolist():
            allowed[h, b * B:(b + 1) * B] = True
    allowed[:, first_local * B:] = True
    G = 3
    s = q.double() @ k.double().repeat_interleave(G, 0).transpose(1, 2) * 16 ** -0.5  # s: [Hq, T, S]
    causal = torch.arange(640)[None] > (off + torch.arange(40))[:, None]
    s = s.masked_fill(causal[None] | ~allowed[:, None], float("-inf"))
    want = torch.softmax(s, -1) @ v.double().repeat_interleave(G, 0)
    got = sparse_causal_attend(q, k, v, off, cfg)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    assert allowed[:, :first_local * B].float().mean() < 1   # it did skip something


def test_dense_backend_runs_sparse_prefill_and_counts_density():
    from offload.engine.dense import DenseAttention
    q, k, v = peaked(T=40, S=640, seed=3)
    attn = DenseAttention(1, 2, 16, 1024, "cpu", torch.float32, sparse_prefill=CFG)
    exact = DenseAttention(1, 2, 16, 1024, "cpu", torch.float32)
    for backend in (attn, exact):
        backend.begin(600)
        backend.attend(0, q[:, :0].new_zeros(6, 600, 16), k[:, :600], v[:, :600])
        backend.end()
        backend.begin(40)
    got, ref = attn.attend(0, q, k[:, 600:], v[:, 600:]), exact.attend(0, q, k[:, 600:], v[:, 600:])
    d = attn.stats()["sparse_prefill_density"]
    assert 0 < d < 1 and attn.stats()["sparse_prefill_chunks"] == 1
    assert (got - ref).abs().max() < 0.5 * ref.abs().max()     # close to exact, not equal: blocks were skipped


def test_config_and_cli_name_the_prefill_modes():
    from offload.config import OffloadConfig
    from offload.errors import ConfigError
    assert OffloadConfig().prefill == "exact"
    assert OffloadConfig(prefill="sparse").prefill == "sparse"
    with pytest.raises(ConfigError, match="prefill"):
        OffloadConfig(prefill="fast")


@pytest.mark.gpu
def test_sparse_on_cuda_matches_cpu_reference():
    q, k, v = peaked(Hq=32, Hkv=8, T=256, S=8192 + 256, D=128, seed=4)
    cfg = SparsePrefill(0.9, block=128, stride=16, local_blocks=4, heads_per_call=8)
    ref = sparse_causal_attend(q, k, v, 8192, cfg)
    qc, kc, vc = (x.cuda().bfloat16() for x in (q, k, v))
    idx_cpu = select_blocks(q, k[:, :(64 - 4) * 128], cfg)
    idx_gpu = select_blocks(qc, kc[:, :(64 - 4) * 128], cfg)
    agree = (idx_cpu == idx_gpu.cpu()).float().mean().item()
    assert agree > 0.9, agree     # bf16 scores may reorder near-ties only
    # same blocks -> same output (the gathered attention itself on cuDNN vs float32 math)
    o_gpu, l_gpu = attend_blocks(qc, kc, vc, idx_cpu.cuda(), cfg)
    o_cpu, l_cpu = attend_blocks(q, k, v, idx_cpu, cfg)
    torch.testing.assert_close(o_gpu.cpu(), o_cpu, rtol=0, atol=3e-2)
    torch.testing.assert_close(l_gpu.cpu(), l_cpu, rtol=0, atol=3e-2)
    full = sparse_causal_attend(qc, kc, vc, 8192, SparsePrefill(1.0, 128, 16, 1, 4, 8))
    torch.testing.assert_close(full.float(), causal_attend(qc, kc, vc, 8192).float(), rtol=0, atol=2e-2)
    assert torch.isfinite(sparse_causal_attend(qc, kc, vc, 8192, cfg)).all() and ref.isfinite().all()


def test_tiered_backend_prefills_sparse_too(tmp_path):
    """Long prompts at large ctx prefill on the tiered backend: --prefill sparse must reach it, not only the
    dense one (it used to prefill exactly there)."""
    from fixtures_models import write_tiny_checkpoint
    from offload import LLM
    ckpt = write_tiny_checkpoint(tmp_path, "llama")
    ids = torch.randint(3, 320, (2600,), generator=torch.Generator().manual_seed(1)).tolist()  # > sinks + band
    logits = {}
    for prefill in ("exact", "sparse"):
        llm = LLM(str(ckpt.path), device="cpu", ctx=4096, attention="sparse", prefill=prefill, prefill_chunk=512,
                  chunk_tokens=16, budget="1K")
        s = llm.session()
        logits[prefill] = s.prefill(ids)
        stats = s.attn.stats()
        if prefill == "sparse":
            assert stats["sparse_prefill_chunks"] > 0 and 0 < stats["sparse_prefill_density"] <= 1
        s.close()
    assert torch.nn.functional.cosine_similarity(logits["exact"], logits["sparse"], dim=0) > 0.99


@pytest.mark.parametrize("T", [1, 3])
def test_dense_backend_decodes_exactly_under_sparse_prefill(T):
    """prefill="sparse" makes multi-token forwards block-sparse; a decode step (T = 1) stays exact. The CPU dense
    backend used to run single-token steps block-sparse too (its static GPU branch hid it there)."""
    from offload.engine.dense import DenseAttention
    q, k, v = peaked(T=T, S=1500, seed=5)                         # history far past sinks + the local band
    attn = DenseAttention(1, 2, 16, 2048, "cpu", torch.float32, sparse_prefill=SparsePrefill(threshold=0.3))
    exact = DenseAttention(1, 2, 16, 2048, "cpu", torch.float32)
    for backend in (attn, exact):
        backend.begin(1500 - T)
        backend.attend(0, q.new_zeros(q.shape[0], 1500 - T, 16), k[:, :1500 - T], v[:, :1500 - T])
        backend.end()
        backend.begin(T)
    got, ref = attn.attend(0, q, k[:, 1500 - T:], v[:, 1500 - T:]), exact.attend(0, q, k[:, 1500 - T:], v[:, 1500 - T:])
    if T == 1:
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    else:                                                         # a short append is still prefill: sparse
        assert not torch.equal(got, ref)
