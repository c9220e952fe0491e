"""Prefill attention (engine/ops.py): split + log-sum-exp merge against masked float64 attention; on CUDA the
cuDNN kernel (GQA, LSE base and layout) against float32 math, the fallback, and the streamed-history variant."""
import pytest
import torch

from offload.engine import ops


def reference(q, k, v, q_offset):
    """Masked causal attention in float64 with K/V expanded per query head: [Hq, T, D]."""
    Hq, T, D = q.shape
    G = Hq // k.shape[0]
    kk, vv = k.double().repeat_interleave(G, 0), v.double().repeat_interleave(G, 0)  # [Hq, S, D]
    s = q.double() @ kk.transpose(1, 2) * D ** -0.5  # s: [Hq, T, S]
    pos = q_offset + torch.arange(T, device=q.device)
    s = s.masked_fill(torch.arange(k.shape[1], device=q.device)[None] > pos[:, None], float("-inf"))
    return torch.softmax(s, -1) @ vv, torch.logsumexp(s, -1)


def rand(Hq, Hkv, T, S, D, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(Hq, T, D, device=device, dtype=dtype, generator=g)  # q: [Hq, T, D]
    k = torch.randn(Hkv, S, D, device=device, dtype=dtype, generator=g)  # k: [Hkv, S, D]
    v = torch.randn(Hkv, S, D, device=device, dtype=dtype, generator=g)  # v: [Hkv, S, D]
    return q, k, v


@pytest.mark.parametrize("off", [0, 1, 97, 256])
def test_causal_attend_equals_masked_reference_cpu(off):
    q, k, v = rand(8, 2, 40, off + 40, 32)
    ref, _ = reference(q, k, v, off)
    torch.testing.assert_close(ops.causal_attend(q, k, v, off).double(), ref, rtol=0, atol=2e-6)


def test_attend_lse_returns_natural_log_sum_exp_cpu():
    q, k, v = rand(6, 3, 17, 50, 16)
    o, lse = ops.attend_lse(q, k, v, causal=False)
    ref_o, ref_lse = reference(q, k, v, 10**6)      # every key visible
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(o.double(), ref_o, rtol=0, atol=1e-6)


def test_streamed_history_blocks_equal_whole_history_cpu():
    q, k, v = rand(8, 2, 24, 300, 32, seed=1)
    off = 276
    blocks = [(k[:, a:b], v[:, a:b]) for a, b in ((200, 276), (0, 7), (7, 7), (7, 200))]   # any order, empty ok
    got = ops.causal_attend_blocks(q, k[:, off:], v[:, off:], blocks)
    torch.testing.assert_close(got, ops.causal_attend(q, k, v, off), rtol=0, atol=2e-6)


def test_merge_lse_of_two_halves_equals_whole():
    q, k, v = rand(4, 4, 9, 64, 8, seed=2)
    o, lse = ops.merge_lse(*ops.attend_lse(q, k[:, :20], v[:, :20], False), *ops.attend_lse(q, k[:, 20:], v[:, 20:], False))
    ro, rlse = ops.attend_lse(q, k, v, False)
    torch.testing.assert_close(o, ro, rtol=0, atol=2e-6)
    torch.testing.assert_close(lse, rlse, rtol=0, atol=2e-6)


def test_prefill_kernel_rejects_unknown_name():
    with pytest.raises(ValueError, match="prefill kernel"):
        with ops.prefill_kernel("flash3"):
            pass


# ---- CUDA ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_attend_lse_matches_float32_gqa(causal):
    """cuDNN takes GQA K/V as they are; its LSE is the natural log, one value per (head, query)."""
    T, S = 1024, 1024 if causal else 20000
    q, k, v = rand(32, 8, T, S, 128, device="cuda", dtype=torch.bfloat16)
    o, lse = ops.attend_lse(q, k, v, causal)
    assert ops.kernel_report().get("cuda:0/bfloat16/d128") == "ok", ops.kernel_report()
    assert o.shape == (32, T, 128) and lse.shape == (32, T) and lse.dtype == torch.float32
    ro, rlse = reference(q, k, v, 0 if causal else 10**9)   # float64 math on the inputs cuDNN saw
    torch.testing.assert_close(lse.double(), rlse, rtol=0, atol=1e-3)
    torch.testing.assert_close(o.double(), ro, rtol=0, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("off", [0, 700, 4096])
def test_causal_attend_cudnn_and_old_kernel_match_reference(off):
    q, k, v = rand(32, 8, 300, off + 300, 128, device="cuda", dtype=torch.bfloat16, seed=3)
    ref, _ = reference(q, k, v, off)
    new = ops.causal_attend(q, k, v, off)
    with ops.prefill_kernel("efficient"):
        old = ops.causal_attend(q, k, v, off)
    for got in (new, old):
        assert got.dtype == torch.bfloat16
        rel = ((got.double() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, rel


@pytest.mark.gpu
def test_shapes_cudnn_cannot_take_fall_back_exactly():
    """head_dim 256 (over cuDNN's limit here) and float32 take the mem-efficient op, still exact."""
    for D, dtype in ((256, torch.bfloat16), (64, torch.float32)):
        q, k, v = rand(8, 2, 64, 200, D, device="cuda", dtype=dtype, seed=4)
        ref, _ = reference(q, k, v, 136)
        got = ops.causal_attend(q, k, v, 136)
        rel = ((got.double() - ref).norm() / ref.norm()).item()
        assert rel < (1e-2 if dtype == torch.bfloat16 else 1e-5), (D, dtype, rel)


@pytest.mark.gpu
def test_streamed_history_on_cuda_equals_whole():
    q, k, v = rand(32, 8, 512, 8192 + 512, 128, device="cuda", dtype=torch.bfloat16, seed=5)
    off = 8192
    blocks = [(k[:, a:a + 3000], v[:, a:a + 3000]) for a in range(0, off, 3000)]
    blocks[-1] = (k[:, 6000:off], v[:, 6000:off])
    got = ops.causal_attend_blocks(q, k[:, off:], v[:, off:], blocks)
    torch.testing.assert_close(got.float(), ops.causal_attend(q, k, v, off).float(), rtol=0, atol=2e-2)
