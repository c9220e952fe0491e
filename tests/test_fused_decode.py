"""The fused decode kernels (offload/kernels/fused.cu, issue 16) against the model's own torch forms, and the decode
step with them against the step without them. CPU: the dispatch falls back to those torch forms, bit for bit."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from offload.engine.dense import DenseAttention
from offload.engine.ops import decode_attend_masked
from offload.engine.runner import Engine
from offload.kernels import fused
from offload.model import llama
from offload.model.config import ModelConfig
from offload.model.rope import rope_inv_freq

HALF = [torch.bfloat16, torch.float16]


def _cfg(hq=8, hkv=2, d=32, hidden=128, inter=192, bias=False) -> ModelConfig:
    return ModelConfig(model_type="qwen2" if bias else "llama", vocab_size=256, hidden_size=hidden,
                       intermediate_size=inter, num_layers=2, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                       rms_norm_eps=1e-5, rope_theta=5e5, rope_scaling=None, max_position_embeddings=4096,
                       tie_word_embeddings=False, attention_bias=bias)


def _cos_sin(pos: torch.Tensor, d: int, dtype, device):
    ang = pos.to(torch.float64)[:, None] * rope_inv_freq(d, 5e5, None)[None, :]  # ang: [T, D/2]
    ang = torch.cat([ang, ang], dim=-1)  # ang: [T, D]
    return ang.cos().to(device, dtype), ang.sin().to(device, dtype)


def _old_layer(m: llama.LlamaModel, i: int, x, cos, sin, attn):
    """The decoder layer as written before the fused dispatch (the torch forms inline)."""
    cfg, w = m.cfg, m.layers[i]
    T, Hq, Hkv, D = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = llama.linear(llama.rms_norm(x, w.attn_norm, cfg.rms_norm_eps), w.wqkv, w.bqkv)  # qkv: [T, (Hq+2Hkv)*D]
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q = llama.apply_rope(q.view(T, Hq, D).transpose(0, 1), cos, sin)  # q: [Hq, T, D]
    k = llama.apply_rope(k.view(T, Hkv, D).transpose(0, 1), cos, sin)  # k: [Hkv, T, D]
    o = attn.attend(i, q, k, v.view(T, Hkv, D).transpose(0, 1))  # o: [Hq, T, D]
    x = x + llama.linear(o.transpose(0, 1).reshape(T, Hq * D), w.wo)  # x: [T, H]
    gate, up = llama.linear(llama.rms_norm(x, w.mlp_norm, cfg.rms_norm_eps), w.w_gate_up).chunk(2, dim=-1)
    return x + llama.linear(F.silu(gate) * up, w.w_down)  # [T, H]


# ---- CPU (CI): the dispatch is the torch reference there -------------------------------------------------------
@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dispatch_is_the_torch_reference(on, dtype):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1, 64, generator=g).to(dtype)  # x, y: [1, 64]
    w = (torch.rand(64, generator=g) + 0.5).to(dtype)  # w: [64]
    qkv = torch.randn(1, (4 + 2 * 2) * 16, generator=g).to(dtype)  # qkv: [1, (Hq + 2Hkv) * D]
    cos, sin = _cos_sin(torch.tensor([1234]), 16, dtype, "cpu")  # cos, sin: [1, D]
    gu = torch.randn(1, 2 * 48, generator=g).to(dtype)  # gu: [1, 2I]
    with fused.fused_decode(on):
        assert fused.rms_norm(x, w, 1e-5) is None and fused.add_rms_norm(x, y, w, 1e-5) is None
        assert fused.rope_qk(qkv, cos, sin, 4, 2) is None and fused.silu_mul(gu) is None
        cache = torch.zeros(2, 2, 5, 16, dtype=dtype)  # cache: [2, Hkv, S, D]
        assert not fused.kv_append(cache[0], cache[1], qkv.view(8, 1, 16)[4:6], qkv.view(8, 1, 16)[6:],
                                   torch.tensor([3]))
        assert fused.dense_decode(qkv.view(8, 1, 16)[:4], cache[0], cache[1], torch.tensor([3])) is None
        assert torch.equal(llama.norm(x, w, 1e-5), llama.rms_norm(x, w, 1e-5))
        total, h = llama.add_norm(x, y, w, 1e-5)
        assert torch.equal(total, x + y) and torch.equal(h, llama.rms_norm(x + y, w, 1e-5))
        q, k, v = llama.rope_qkv(qkv, cos, sin, 4, 2)
        ref = qkv.view(1, 8, 16).transpose(0, 1)  # ref: [Hq + 2Hkv, 1, D]
        assert torch.equal(q, llama.apply_rope(ref[:4], cos, sin))
        assert torch.equal(k, llama.apply_rope(ref[4:6], cos, sin))
        assert torch.equal(v, ref[6:])
        assert torch.equal(llama.silu_mul(gu), F.silu(gu[:, :48]) * gu[:, 48:])


@pytest.mark.parametrize("on", [True, False])
def test_cpu_decode_equals_the_layer_written_inline(on):
    """A prefill and three decode steps through LlamaModel.forward equal the pre-dispatch layer, bit for bit."""
    cfg = _cfg(bias=True)
    m = llama.LlamaModel.random(cfg, "cpu", torch.float32, seed=1)
    for lw in m.layers:   # norms that are not all ones, so the weight's product is checked
        lw.attn_norm.uniform_(0.5, 1.5)
        lw.mlp_norm.uniform_(0.5, 1.5)
    ids = torch.randint(0, cfg.vocab_size, (12,), generator=torch.Generator().manual_seed(2))

    def run(forward):
        attn = DenseAttention(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 64, "cpu", torch.float32)
        out = []
        for s, e in ((0, 9), (9, 10), (10, 11), (11, 12)):
            attn.begin(e - s)
            out.append(forward(ids[s:e], torch.arange(s, e), attn))
            attn.end()
        return torch.stack(out)  # [4, V]

    def old_forward(ids_, pos, attn):
        cos, sin = m.rope(pos)
        x = m.embed[ids_]
        for i in range(cfg.num_layers):
            x = _old_layer(m, i, x, cos, sin, attn)
        return m.logits(x[-1:])[0]
    with fused.fused_decode(on):
        assert torch.equal(run(m.forward), run(old_forward))


def test_env_var_turns_the_fused_path_off():
    code = "from offload.kernels import fused; print(fused.enabled())"
    env = dict(os.environ)
    outs = []
    for value in ("0", "1"):
        env["OFFLOAD_FUSED_DECODE"] = value
        outs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout.strip())
    assert outs == ["False", "True"]


# ---- GPU: each kernel against the torch form it replaces --------------------------------------------------------
@pytest.fixture(scope="module")
def compiled():
    """Every fused.cu kernel in every dtype compiled at once (NVRTC calls in parallel), so the cases run fast."""
    from concurrent.futures import ThreadPoolExecutor

    from offload.kernels import _backend, _build
    assert _backend() is not None, "CuPy failed to load"
    names = [f"{k}<{t}>" for k in ("rms_norm_kernel", "rope_qk_kernel", "silu_mul_kernel", "kv_append_kernel")
             for t in ("BF16", "F16", "F32")]
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda n: _build.function("fused.cu", n, torch.cuda.current_device()), names))


def _tol(dtype):
    """A few units in the last place: the kernels round where torch does, but sum in another order and take
    fast-math exp / rsqrt, so a value near a rounding boundary may land one step away (and a product of two)."""
    return {torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=1e-5),
            torch.float32: dict(rtol=1e-5, atol=1e-5)}[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("rows,hidden", [(1, 4096), (1, 576), (3, 64), (2, 1000)])
def test_rms_norm_kernels_match_torch(dtype, rows, hidden, compiled):
    g = torch.Generator(device="cuda").manual_seed(hidden)
    x = torch.randn(rows, hidden, device="cuda", generator=g).to(dtype) * 3  # x: [T, H]
    y = torch.randn(rows, hidden, device="cuda", generator=g).to(dtype)  # y: [T, H]
    w = (torch.rand(hidden, device="cuda", generator=g) + 0.5).to(dtype)  # w: [H]
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), llama.rms_norm(x, w, 1e-5), **_tol(dtype))
    total, h = fused.add_rms_norm(x, y, w, 1e-6)
    torch.testing.assert_close(total, x + y, rtol=0, atol=0)
    torch.testing.assert_close(h, llama.rms_norm(x + y, w, 1e-6), **_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("rows,hq,hkv,d", [(1, 32, 8, 128), (1, 9, 3, 64), (5, 4, 2, 16)])
def test_rope_kernel_matches_apply_rope(dtype, rows, hq, hkv, d, compiled):
    g = torch.Generator(device="cuda").manual_seed(d)
    qkv = torch.randn(rows, (hq + 2 * hkv) * d, device="cuda", generator=g).to(dtype)  # qkv: [T, (Hq+2Hkv)*D]
    cos, sin = _cos_sin(torch.arange(70000, 70000 + rows), d, dtype, "cuda")  # cos, sin: [T, D]
    q, k = fused.rope_qk(qkv, cos, sin, hq, hkv)
    ref = qkv.view(rows, hq + 2 * hkv, d).transpose(0, 1)  # ref: [Hq + 2Hkv, T, D]
    torch.testing.assert_close(q, llama.apply_rope(ref[:hq], cos, sin), **_tol(dtype))
    torch.testing.assert_close(k, llama.apply_rope(ref[hq:hq + hkv], cos, sin), **_tol(dtype))
    q1, k1, v1 = llama.rope_qkv(qkv[:1], cos[:1], sin[:1], hq, hkv)   # a decode row: the model's dispatch
    torch.testing.assert_close(q1, llama.apply_rope(ref[:hq, :1], cos[:1], sin[:1]), **_tol(dtype))
    torch.testing.assert_close(k1, llama.apply_rope(ref[hq:hq + hkv, :1], cos[:1], sin[:1]), **_tol(dtype))
    assert torch.equal(v1, ref[hq + hkv:, :1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("rows,inter", [(1, 14336), (1, 1536), (3, 56)])
def test_silu_mul_kernel_matches_torch(dtype, rows, inter, compiled):
    g = torch.Generator(device="cuda").manual_seed(inter)
    gu = (torch.randn(rows, 2 * inter, device="cuda", generator=g) * 4).to(dtype)  # gu: [T, 2I]
    torch.testing.assert_close(fused.silu_mul(gu), F.silu(gu[:, :inter]) * gu[:, inter:], **_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (9, 3, 64)])
def test_kv_append_equals_index_copy(dtype, hq, hkv, d, compiled):
    """k (the RoPE kernel's output) and v (a strided view of qkv) into layer 1 of a layered cache at a device-side
    position; every other row untouched."""
    g = torch.Generator(device="cuda").manual_seed(d)
    qkv = torch.randn(1, (hq + 2 * hkv) * d, device="cuda", generator=g).to(dtype)  # qkv: [1, (Hq+2Hkv)*D]
    k = torch.randn(hkv, 1, d, device="cuda", generator=g).to(dtype)  # k: [Hkv, 1, D]
    v = qkv.view(1, hq + 2 * hkv, d).transpose(0, 1)[hq + hkv:]  # v: [Hkv, 1, D], strided
    cache = torch.randn(2, 3, hkv, 300, d, device="cuda", generator=g).to(dtype)  # cache: [K|V, L, Hkv, S, D]
    want = cache.clone()
    pos = torch.tensor([217], device="cuda")  # pos: [1]
    want[0, 1].index_copy_(1, pos, k)
    want[1, 1].index_copy_(1, pos, v)
    assert fused.kv_append(cache[0, 1], cache[1, 1], k, v, pos)
    assert torch.equal(cache, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("hq,hkv,d,n_valid", [(32, 8, 128, 700), (9, 3, 64, 1), (8, 8, 128, 1000)])
def test_dense_decode_matches_masked_attention(dtype, hq, hkv, d, n_valid):
    """One query over the first n_valid keys of a 1000-slot cache (the rest holds garbage that must not count)."""
    g = torch.Generator(device="cuda").manual_seed(n_valid)
    q = torch.randn(hq, 1, d, device="cuda", generator=g).to(dtype)  # q: [Hq, 1, D]
    kv = torch.randn(2, 3, hkv, 1000, d, device="cuda", generator=g).to(dtype)  # kv: [2, L, Hkv, S, D]
    kc, vc = kv[0, 1], kv[1, 1]  # kc, vc: [Hkv, S, D], views into a layered cache as DenseAttention holds them
    count = torch.tensor([n_valid], device="cuda")  # count: [1]
    valid = torch.arange(1000, device="cuda") < n_valid  # valid: [S]
    got = fused.dense_decode(q, kc, vc, count)
    want = decode_attend_masked(q.float(), kc.float(), vc.float(), valid)  # float32 reference: [Hq, 1, D]
    assert got.shape == (hq, 1, d) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=1e-2)


# ---- GPU: a whole decode step, captured in a CUDA graph, fused against unfused -----------------------------------
def _decode_logits(m: llama.LlamaModel, ids: list[int], prompt: int) -> torch.Tensor:
    cfg = m.cfg
    attn = DenseAttention(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 128, "cuda", m.dtype, static=True)
    eng = Engine(m, attn)
    out = [eng.prefill(ids[:prompt])] + [eng.step(t) for t in ids[prompt:]]
    assert eng.stats()["decode_mode"] == "graph"
    return torch.stack(out)  # [steps + 1, V]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,quantize,bias", [(torch.bfloat16, None, False), (torch.float16, None, True),
                                                 (torch.bfloat16, "Q8_0", False), (torch.bfloat16, "Q4_K", False)])
def test_fused_decode_graph_matches_unfused(dtype, quantize, bias, monkeypatch, compiled):
    from offload.kernels import _backend
    _backend()
    from offload.kernels import _cupy, _cupy_fused
    calls: dict[str, int] = {}
    def counted(name, real):
        def run(*a, **kw):
            calls[name] = calls.get(name, 0) + 1
            return real(*a, **kw)
        return run
    for mod, name in ((_cupy_fused, "rms_norm"), (_cupy_fused, "rope_qk"), (_cupy_fused, "silu_mul"),
                      (_cupy_fused, "kv_append"), (_cupy, "dense_attend")):
        monkeypatch.setattr(mod, name, counted(name, getattr(mod, name)))
    cfg = _cfg(hq=8, hkv=2, d=128, hidden=256, inter=512, bias=bias)
    m = llama.LlamaModel.random(cfg, "cuda", dtype, seed=3, quantize=quantize)
    for lw in m.layers:
        lw.attn_norm.uniform_(0.5, 1.5)
        lw.mlp_norm.uniform_(0.5, 1.5)
    ids = torch.randint(0, cfg.vocab_size, (48,), generator=torch.Generator().manual_seed(4)).tolist()
    with fused.fused_decode(False):
        want = _decode_logits(m, ids, 40)
    assert not calls, "the unfused step must not launch the fused kernels"
    with fused.fused_decode(True):
        got = _decode_logits(m, ids, 40)
    assert set(calls) == {"rms_norm", "rope_qk", "silu_mul", "kv_append", "dense_attend"}
    torch.testing.assert_close(got, want, rtol=0.03, atol=0.03 * want.abs().max().item())
