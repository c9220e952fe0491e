"""offload.kernels: torch references against naive float64 attention (CPU), CuPy kernels against the
references (GPU, `-m gpu`)."""
from __future__ import annotations

import math

import pytest
import torch

import offload.kernels as kernels
from offload.errors import OffloadError
from offload.kernels import _build, reference


def _naive_gather(q, pool, slots, scale):
    """Per query head: concatenate the K/V rows of its KV head's valid slots, softmax in float64."""
    hq, d = q.shape
    hkv = pool.shape[2]
    group = hq // hkv
    o = torch.zeros(hq, d, dtype=torch.float64)
    lse = torch.full((hq,), float("-inf"), dtype=torch.float64)
    for h in range(hq):
        kv_head = h // group
        picked = [int(s) for s in slots[kv_head].tolist() if s >= 0]
        if not picked:
            continue
        k = torch.cat([pool[s, 0, kv_head] for s in picked]).double()  # k: [n, D]
        v = torch.cat([pool[s, 1, kv_head] for s in picked]).double()  # v: [n, D]
        logits = k @ q[h].double() * scale                              # logits: [n]
        lse[h] = torch.logsumexp(logits, 0)
        o[h] = torch.softmax(logits, 0) @ v
    return o, lse


def _naive_dense(q, k, v, scale):
    hkv, n, d = k.shape
    pool = torch.stack([k, v], dim=1).permute(1, 0, 2, 3).reshape(1, 2, hkv, n, d)  # one chunk of n tokens
    return _naive_gather(q, pool, torch.zeros(hkv, 1, dtype=torch.long), scale)


def _random_pool(gen, slots_n, hkv, c, d, dtype=torch.float32):
    return torch.randn(slots_n, 2, hkv, c, d, generator=gen).to(dtype)  # pool: [S, 2, Hkv, C, D]


def _random_slots(gen, hkv, k, slots_n, pad):
    """Distinct slots per KV head with `pad` trailing/interleaved -1 entries."""
    rows = []
    for _ in range(hkv):
        row = torch.randperm(slots_n, generator=gen)[:k]
        if pad:
            row[torch.randperm(k, generator=gen)[:pad]] = -1
        rows.append(row)
    return torch.stack(rows)                                            # slots: [Hkv, K]


@pytest.mark.parametrize("hq,hkv,d,c", [(8, 8, 16, 4), (8, 2, 32, 8), (9, 3, 64, 16), (16, 2, 32, 4)])
def test_reference_gather_matches_naive(hq, hkv, d, c):
    gen = torch.Generator().manual_seed(hq * 100 + d)
    pool = _random_pool(gen, 23, hkv, c, d)
    slots = _random_slots(gen, hkv, 7, 23, pad=2)
    q = torch.randn(hq, d, generator=gen)
    scale = 1 / math.sqrt(d)
    o, lse = reference.gather_attend(q, pool, slots, scale)
    o_ref, lse_ref = _naive_gather(q, pool, slots, scale)
    assert o.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


def test_reference_gather_empty_and_all_padding():
    gen = torch.Generator().manual_seed(1)
    pool = _random_pool(gen, 5, 2, 4, 8)
    q = torch.randn(4, 8, generator=gen)
    slots = torch.tensor([[-1, -1], [3, -1]])                           # KV head 0 selects nothing
    o, lse = reference.gather_attend(q, pool, slots, 0.5)
    assert torch.equal(o[:2], torch.zeros(2, 8)) and torch.isneginf(lse[:2]).all()
    o_ref, lse_ref = _naive_gather(q, pool, slots, 0.5)
    torch.testing.assert_close(o[2:].double(), o_ref[2:])
    torch.testing.assert_close(lse[2:].double(), lse_ref[2:])
    o, lse = reference.gather_attend(q, pool, torch.empty(2, 0, dtype=torch.long), 0.5)
    assert torch.equal(o, torch.zeros(4, 8)) and torch.isneginf(lse).all()


@pytest.mark.parametrize("n", [1, 37])
def test_reference_dense_matches_naive(n):
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(8, 32, generator=gen)
    k, v = torch.randn(2, 2, n, 32, generator=gen).unbind(0)
    o, lse = reference.dense_attend(q, k, v, 0.2)
    o_ref, lse_ref = _naive_dense(q, k, v, 0.2)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_valid", [1, 20, 37])
def test_reference_dense_with_device_count_equals_prefix(n_valid):
    gen = torch.Generator().manual_seed(n_valid)
    q = torch.randn(8, 32, generator=gen)
    k, v = torch.randn(2, 2, 37, 32, generator=gen).unbind(0)
    got = reference.dense_attend(q, k, v, 0.2, torch.tensor([n_valid]))
    want = reference.dense_attend(q, k[:, :n_valid], v[:, :n_valid], 0.2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_merge_of_halves_equals_union():
    gen = torch.Generator().manual_seed(2)
    pool = _random_pool(gen, 40, 4, 8, 32)
    slots = _random_slots(gen, 4, 12, 40, pad=3)
    q = torch.randn(16, 32, generator=gen) * 3                          # peaked softmax: weights matter
    part1 = reference.gather_attend(q, pool, slots[:, :5], 0.3)
    part2 = reference.gather_attend(q, pool, slots[:, 5:], 0.3)
    o, lse = reference.merge_attn(*part1, *part2)
    o_ref, lse_ref = _naive_gather(q, pool, slots, 0.3)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


def test_merge_with_empty_sides():
    gen = torch.Generator().manual_seed(3)
    o1, lse1 = torch.randn(4, 8, generator=gen), torch.randn(4, generator=gen)
    empty_o, empty_lse = torch.zeros(4, 8), torch.full((4,), float("-inf"))
    o, lse = reference.merge_attn(o1, lse1, empty_o, empty_lse)
    torch.testing.assert_close(o, o1)
    torch.testing.assert_close(lse, lse1)
    o, lse = reference.merge_attn(empty_o, empty_lse, empty_o, empty_lse)
    assert torch.equal(o, empty_o) and torch.isneginf(lse).all()


def _chunk_minmax(keys, c):
    hkv, n, d = keys.shape
    chunks = keys.reshape(hkv, n // c, c, d)                            # chunks: [Hkv, N/C, C, D]
    return chunks.amin(dim=2), chunks.amax(dim=2)


@pytest.mark.parametrize("group_reduce", ["max", "sum"])
def test_chunk_bounds_upper_bound_every_key(group_reduce):
    gen = torch.Generator().manual_seed(4)
    hq, hkv, d, c, n = 8, 2, 16, 8, 30
    keys = torch.randn(hkv, n * c, d, generator=gen)
    kmin, kmax = _chunk_minmax(keys, c)
    q = torch.randn(hq, d, generator=gen)
    bounds = reference.chunk_bounds(q, kmin, kmax, n, group_reduce)     # bounds: [Hkv, N]
    qg = q.reshape(hkv, hq // hkv, d)
    dots = torch.einsum("hgd,hnd->hgn", qg, keys).reshape(hkv, -1, n, c).amax(-1)  # dots: [Hkv, G, N]
    best = dots.amax(1) if group_reduce == "max" else dots.sum(1)
    assert (bounds >= best - 1e-5).all()
    # the literal definition, elementwise in float64
    lit = torch.maximum(qg[:, :, None].double() * kmin[:, None].double(),
                        qg[:, :, None].double() * kmax[:, None].double()).sum(-1)  # lit: [Hkv, G, N]
    lit = lit.amax(1) if group_reduce == "max" else lit.sum(1)
    torch.testing.assert_close(bounds.double(), lit, rtol=1e-5, atol=1e-5)


def test_score_chunks_topk_matches_brute_force():
    gen = torch.Generator().manual_seed(5)
    hq, hkv, d, cap, n_valid, k = 12, 3, 16, 64, 41, 9
    kmin = torch.randn(hkv, cap, d, generator=gen)
    kmax = kmin + torch.rand(hkv, cap, d, generator=gen)
    kmax[:, n_valid:] = 1e4                                             # beyond n_valid: must never be picked
    q = torch.randn(hq, d, generator=gen)
    ids = kernels.score_chunks(q, kmin, kmax, n_valid, k)
    assert ids.dtype == torch.int64 and ids.shape == (hkv, k)
    for h in range(hkv):
        scores = []
        for ch in range(n_valid):
            per_head = [sum(max(float(q[g, i] * kmin[h, ch, i]), float(q[g, i] * kmax[h, ch, i]))
                            for i in range(d)) for g in range(h * 4, h * 4 + 4)]
            scores.append(max(per_head))
        brute = sorted(range(n_valid), key=lambda i: -scores[i])[:k]
        assert ids[h].tolist() == brute
    assert kernels.score_chunks(q, kmin, kmax, 5, k).shape == (hkv, 5)
    assert kernels.score_chunks(q, kmin, kmax, 0, k).shape == (hkv, 0)


def test_cpu_dispatch_is_reference():
    gen = torch.Generator().manual_seed(6)
    pool = _random_pool(gen, 9, 2, 4, 16)
    slots = _random_slots(gen, 2, 3, 9, pad=1)
    q = torch.randn(4, 16, generator=gen)
    for got, want in zip(kernels.gather_attend(q, pool, slots, 0.25), reference.gather_attend(q, pool, slots, 0.25)):
        assert torch.equal(got, want)
    assert isinstance(kernels.KERNELS_AVAILABLE, bool)


def test_compile_error_names_kernel_and_first_error():
    log = "attend.cu(12): warning: unused\nattend.cu(40): error: identifier \"x\" is undefined\nmore"
    err = _build.compile_error("attend_kernel<BF16, BF16, 128, 4, int>", log)
    assert isinstance(err, OffloadError) and "\n" not in str(err)
    assert "attend_kernel<BF16, BF16, 128, 4, int>" in str(err) and 'identifier "x" is undefined' in str(err)


def test_kernel_sources_are_packaged():
    for name in ("attend.cu", "score.cu", "merge.cu"):
        src = _build.source(name)
        assert '#include "common.cuh"' not in src and "OFL_NEG_INF" in src


# ----------------------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


@pytest.fixture
def poison():
    from offload.kernels import _cupy
    with _cupy.launch_options(poison=True):
        yield _cupy


def _nan_out(hq, d):
    return (torch.full((hq, d), float("nan"), device="cuda"), torch.full((hq,), float("nan"), device="cuda"))


def _check(got, want, tol=2e-4):
    torch.testing.assert_close(got[0], want[0].to(got[0].device), rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], want[1].to(got[1].device), rtol=tol, atol=tol)


GATHER_CASES = [  # hq, hkv, d, c, k, dtype
    (8, 8, 128, 64, 33, torch.bfloat16),     # GQA 1, odd chunk count
    (32, 8, 128, 16, 129, torch.bfloat16),   # GQA 4
    (32, 4, 128, 32, 1, torch.bfloat16),     # GQA 8, a single chunk
    (64, 8, 64, 64, 77, torch.bfloat16),     # GQA 8, head_dim 64
    (9, 3, 64, 16, 250, torch.bfloat16),     # SmolLM2 shape (GQA 3)
    (16, 4, 64, 32, 5, torch.float32),
    (16, 4, 128, 16, 40, torch.float16),
]


@gpu
@pytest.mark.parametrize("hq,hkv,d,c,k,dtype", GATHER_CASES)
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_gpu_gather_attend_matches_reference(poison, hq, hkv, d, c, k, dtype, num_splits):
    gen = torch.Generator().manual_seed(hq + k + d)
    n_slots = k + 11
    pool = _random_pool(gen, n_slots, hkv, c, d, dtype).cuda()
    slots = _random_slots(gen, hkv, k, n_slots, pad=k // 5)
    slots[0, 0] = n_slots - 1                                           # the last slot of the pool
    q = torch.randn(hq, d, generator=gen).to(dtype).cuda()
    scale = 1 / math.sqrt(d)
    want = reference.gather_attend(q, pool, slots.cuda(), scale)
    for _ in range(2):                                                  # the second call reuses the tickets
        got = poison.gather_attend(q, pool, slots.cuda().int(), scale, out=_nan_out(hq, d), num_splits=num_splits)
        _check(got, want)


@gpu
def test_gpu_gather_attend_pinned_host_pool(poison):
    gen = torch.Generator().manual_seed(11)
    pool = _random_pool(gen, 300, 8, 64, 128, torch.bfloat16).pin_memory()
    slots = _random_slots(gen, 8, 97, 300, pad=9)
    q = torch.randn(32, 128, generator=gen).to(torch.bfloat16).cuda()
    assert pool.is_pinned() and poison.supports_gather(q, pool)        # the public call takes the kernel path
    got = kernels.gather_attend(q, pool, slots.cuda(), 0.088)
    _check(got, reference.gather_attend(q, pool, slots, 0.088))


@gpu
def test_gpu_gather_attend_empty_selection(poison):
    pool = torch.randn(4, 2, 2, 16, 64, device="cuda").bfloat16()
    q = torch.randn(8, 64, device="cuda").bfloat16()
    for slots in (torch.full((2, 3), -1, device="cuda"), torch.empty(2, 0, dtype=torch.long, device="cuda")):
        o, lse = poison.gather_attend(q, pool, slots, 0.1, out=_nan_out(8, 64))
        assert torch.equal(o, torch.zeros_like(o)) and torch.isneginf(lse).all()
    slots = torch.tensor([[-1, -1, -1], [2, -1, 0]], device="cuda")       # one KV head empty, one not
    _check(poison.gather_attend(q, pool, slots, 0.1, out=_nan_out(8, 64), num_splits=3),
           reference.gather_attend(q, pool, slots, 0.1))


@gpu
@pytest.mark.parametrize("hq,hkv,d,n", [(32, 8, 128, 319), (9, 3, 64, 1), (32, 8, 128, 64), (16, 2, 64, 1000)])
def test_gpu_dense_attend_matches_reference(poison, hq, hkv, d, n):
    gen = torch.Generator().manual_seed(n)
    buf = torch.randn(2, hkv, n + 40, d, generator=gen).bfloat16().cuda()
    k, v = buf[0, :, 8:8 + n], buf[1, :, 8:8 + n]                       # strided views of a ring buffer
    q = torch.randn(hq, d, generator=gen).bfloat16().cuda()
    got = poison.dense_attend(q, k, v, 0.09, out=_nan_out(hq, d))
    _check(got, reference.dense_attend(q, k, v, 0.09))


@gpu
@pytest.mark.parametrize("n_valid", [1, 63, 64, 65, 96])
def test_gpu_dense_attend_reads_its_count_on_the_device(poison, n_valid):
    """The tail of a captured decode step: a fixed [Hkv, 96, D] buffer, the valid count in device memory."""
    gen = torch.Generator().manual_seed(n_valid)
    k, v = torch.randn(2, 8, 96, 128, generator=gen).bfloat16().cuda().unbind(0)
    q = torch.randn(32, 128, generator=gen).bfloat16().cuda()
    count = torch.tensor([n_valid], device="cuda")
    got = poison.dense_attend(q, k, v, 0.09, count, out=_nan_out(32, 128))
    _check(got, reference.dense_attend(q, k[:, :n_valid], v[:, :n_valid], 0.09))
    _check(kernels.dense_attend(q, k, v, 0.09, count), reference.dense_attend(q, k, v, 0.09, count))


@gpu
def test_gpu_merge_matches_reference(poison):
    gen = torch.Generator().manual_seed(7)
    o1, o2 = torch.randn(2, 32, 128, generator=gen).cuda().unbind(0)
    lse1, lse2 = torch.randn(2, 32, generator=gen).cuda().unbind(0)
    lse1[:3] = float("-inf")
    lse2[1:5] = float("-inf")                                           # rows 1, 2: both sides empty
    o1[:3] = 0
    o2[1:5] = 0
    got = poison.merge_attn(o1, lse1, o2, lse2)
    assert not torch.isnan(got[0]).any()
    _check(got, reference.merge_attn(o1, lse1, o2, lse2), tol=1e-5)


@gpu
@pytest.mark.parametrize("hq,hkv,d,dtype", [(32, 8, 128, torch.bfloat16), (8, 8, 64, torch.bfloat16),
                                            (64, 8, 128, torch.bfloat16), (9, 3, 64, torch.float32)])
@pytest.mark.parametrize("group_reduce", ["max", "sum"])
def test_gpu_chunk_bounds_and_topk(poison, hq, hkv, d, dtype, group_reduce):
    gen = torch.Generator().manual_seed(hq + d)
    cap, n_valid, k = 3000, 2047, 100
    kmin = torch.randn(hkv, cap, d, generator=gen)
    kmax = kmin + torch.rand(hkv, cap, d, generator=gen)
    kmin, kmax = kmin.to(dtype).cuda(), kmax.to(dtype).cuda()
    q = torch.randn(hq, d, generator=gen).to(dtype).cuda()
    bounds = poison.chunk_bounds(q, kmin, kmax, n_valid, group_reduce)
    want = reference.chunk_bounds(q, kmin, kmax, n_valid, group_reduce)
    torch.testing.assert_close(bounds, want, rtol=1e-4, atol=1e-3)
    ids = kernels.score_chunks(q, kmin, kmax, n_valid, k, group_reduce)
    assert ids.shape == (hkv, k)
    kth = want.topk(k, dim=1).values[:, -1:]                            # kth: [Hkv, 1]
    assert (want.gather(1, ids) >= kth - 1e-3).all()                    # same set up to float ties
    assert ids.max() < n_valid


@gpu
def test_gpu_compile_error_is_offload_error(monkeypatch):
    from offload.kernels import _cupy  # noqa: F401  (needs CuPy)
    monkeypatch.setattr(_build, "source", lambda file: "__global__ void broken_kernel() { undefined_name; }")
    with pytest.raises(OffloadError, match="broken_kernel.*undefined_name"):
        _build.function("broken.cu", "broken_kernel", torch.cuda.current_device())


@gpu
@pytest.mark.parametrize("defines", [("-DATT_PREFETCH=1",), ("-DATT_PREFETCH=1", "-DATT_U_SMALL=2"),
                                     ("-DATT_U_SMALL=8",)])
@pytest.mark.parametrize("hq,hkv,d,c,k,dtype", [GATHER_CASES[i] for i in (0, 1, 3, 4)])
def test_gpu_gather_attend_tuning_variants(poison, monkeypatch, defines, hq, hkv, d, c, k, dtype):
    """The compile-time variants the benchmark compares must give the same answer as the default."""
    gen = torch.Generator().manual_seed(k)
    pool = _random_pool(gen, k + 5, hkv, c, d, dtype).cuda()
    slots = _random_slots(gen, hkv, k, k + 5, pad=k // 4).cuda()
    q = torch.randn(hq, d, generator=gen).to(dtype).cuda()
    want = reference.gather_attend(q, pool, slots, 0.1)
    with poison.launch_options(poison=True, attend_defines=defines):
        for splits in (None, 1, 5):
            _check(poison.gather_attend(q, pool, slots, 0.1, out=_nan_out(hq, d), num_splits=splits), want)
    k_win, v_win = pool[:3, 0].transpose(0, 1).reshape(hkv, -1, d), pool[:3, 1].transpose(0, 1).reshape(hkv, -1, d)
    _check(poison.dense_attend(q, k_win, v_win, 0.1, out=_nan_out(hq, d)), reference.dense_attend(q, k_win, v_win, 0.1))


@gpu
def test_gpu_decode_step_replays_in_cuda_graph():
    """gather + dense + merge captured once in a torch CUDA graph, replayed on new q and slots."""
    gen = torch.Generator().manual_seed(12)
    hq, hkv, d, c = 32, 8, 128, 64
    pool = _random_pool(gen, 60, hkv, c, d, torch.bfloat16).cuda()
    k_win, v_win = torch.randn(2, hkv, 300, d, generator=gen).bfloat16().cuda().unbind(0)
    q = torch.empty(hq, d, dtype=torch.bfloat16, device="cuda")
    slots = torch.empty(hkv, 21, dtype=torch.int32, device="cuda")

    def step():
        return kernels.merge_attn(*kernels.gather_attend(q, pool, slots, 0.09), *kernels.dense_attend(q, k_win, v_win, 0.09))

    q.copy_(torch.randn(hq, d, generator=gen))
    slots.copy_(_random_slots(gen, hkv, 21, 60, pad=4))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                                       # warm-up: compiles, allocates tickets
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        q.copy_(torch.randn(hq, d, generator=gen))
        slots.copy_(_random_slots(gen, hkv, 21, 60, pad=4))
        graph.replay()
        torch.cuda.synchronize()
        want = reference.merge_attn(*reference.gather_attend(q, pool, slots, 0.09),
                                    *reference.dense_attend(q, k_win, v_win, 0.09))
        _check(out, want)


def _plan_case(seed, hkv=8, m=74, n=500, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    sel = torch.stack([torch.randperm(n, generator=gen)[:m] for _ in range(hkv)])      # sel: [Hkv, M]
    tier = torch.randint(0, 2, (n + 20,), generator=gen, dtype=torch.int8)             # tier: [max chunks]
    slot = torch.randperm(5000, generator=gen)[:n + 20]                                # slot: [max chunks]
    streaming = torch.zeros(hkv, dtype=torch.bool)
    streaming[1] = True
    return [t.to(device) for t in (sel, torch.tensor([n]), streaming, tier, slot)]


def _plan_args(sel, n, n_sink, n_window, take, streaming, tier, slot, hits, chunk_hits, apart=False):
    """The Selection and ChunkTable plan_slots takes, from plain tensors; hits: [8] (attended, candidates)."""
    from offload.indexes.selector import Selection
    from offload.tiers.decode import ChunkTable
    return (Selection(sel, take, n_sink, n_window, streaming, token_k=1 if apart else 0),
            ChunkTable(n, tier, slot, hits[:4], hits[4:8], chunk_hits))


def test_reference_plan_slots_by_hand():
    sel = torch.tensor([[9, 0, 5, 7, 3], [8, 2, 4, 6, 1]])          # chunks 0 (sink) and 8, 9 (window) of n = 10
    tier = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 0], dtype=torch.int8)
    slot = torch.arange(10) + 100
    hits, chunk_hits = torch.zeros(8, dtype=torch.long), torch.zeros(10)
    lists = reference.plan_slots(*_plan_args(sel, torch.tensor([10]), 1, 2, 2, torch.tensor([False, True]), tier,
                                             slot, hits, chunk_hits))
    gpu, host = lists.gpu, lists.host
    # head 0: sink 0, window 8, 9, then the first 2 eligible of the selection: 5, 7 (3 is over budget)
    assert gpu[0].tolist() == [100, 108, 109, -1, -1, -1, -1, -1]
    assert host[0].tolist() == [-1, -1, -1, -1, -1, 105, 107, -1]
    # head 1 streams: sinks and window only
    assert gpu[1].tolist() == [100, 108, 109, -1, -1, -1, -1, -1] and (host[1] == -1).all()
    assert hits[:4].tolist() == [8, 6, 2, 0] and chunk_hits[[0, 5, 7, 8, 9]].tolist() == [2, 1, 1, 2, 2]


@gpu
@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("m,budget", [(74, 64), (74, 10), (700, 650), (1, 1)])
@pytest.mark.parametrize("apart", [False, True])
def test_gpu_plan_slots_matches_reference(poison, m, budget, merged, apart):
    sel, n, streaming, tier, slot = _plan_case(m, m=m, device="cuda")
    outs = []
    for fn in (poison.plan_slots, reference.plan_slots):
        hits, chunk_hits = torch.zeros(8, dtype=torch.long, device="cuda"), torch.zeros(520, device="cuda")
        lists = fn(*_plan_args(sel, n, 2, 8, budget, streaming, tier, slot, hits, chunk_hits, apart), merged,
                   with_ids=True)
        outs.append((lists.gpu, lists.host, lists.ids, hits, chunk_hits))
    if apart:
        assert outs[0][-2][4:].sum() > 0
    for got, want in zip(*outs):
        assert (got is None and want is None) or torch.equal(got, want)


@gpu
@pytest.mark.parametrize("hq,hkv,d,c", [(32, 8, 128, 32), (9, 3, 64, 16)])
def test_gpu_gather_attend_two_pools_in_one_launch(poison, hq, hkv, d, c):
    """GPU pool + pinned host slab: host slots flagged ALT_SLOT, -1 padding, both tiers in one list."""
    gen = torch.Generator().manual_seed(c)
    gpu_pool = _random_pool(gen, 50, hkv, c, d, torch.bfloat16).cuda()
    host_pool = _random_pool(gen, 70, hkv, c, d, torch.bfloat16).pin_memory()
    own = _random_slots(gen, hkv, 41, 50, pad=5)                               # own: [Hkv, 41]
    alt = _random_slots(gen, hkv, 41, 70, pad=5)                               # alt: [Hkv, 41]
    pick = torch.rand(hkv, 41, generator=gen) < 0.5
    slots = torch.where(pick, torch.where(alt >= 0, alt | reference.ALT_SLOT, alt), own).int()
    q = torch.randn(hq, d, generator=gen).to(torch.bfloat16).cuda()
    got = poison.gather_attend(q, gpu_pool, slots.cuda(), 0.1, host_pool, out=_nan_out(hq, d))
    _check(got, reference.gather_attend(q, gpu_pool, slots.cuda(), 0.1, host_pool))
    # and the reference's own split: two single-pool gathers merged
    none = torch.full_like(slots, -1)
    parts = [reference.gather_attend(q, gpu_pool, torch.where(pick, none, own).cuda(), 0.1),
             reference.gather_attend(q, host_pool, torch.where(pick, alt, none), 0.1)]
    _check(got, reference.merge_attn(*parts[0], *parts[1]))


def test_reference_two_pool_gather_equals_merge_of_two():
    gen = torch.Generator().manual_seed(3)
    pools = [_random_pool(gen, n, 2, 8, 32) for n in (9, 12)]
    own, alt = _random_slots(gen, 2, 7, 9, pad=2), _random_slots(gen, 2, 7, 12, pad=2)   # [Hkv, 7] each
    pick = torch.rand(2, 7, generator=gen) < 0.5
    slots = torch.where(pick, torch.where(alt >= 0, alt | reference.ALT_SLOT, alt), own)
    q = torch.randn(8, 32, generator=gen)
    none = torch.full_like(slots, -1)
    want = reference.merge_attn(*reference.gather_attend(q, pools[0], torch.where(pick, none, own), 0.2),
                                *reference.gather_attend(q, pools[1], torch.where(pick, alt, none), 0.2))
    got = reference.gather_attend(q, pools[0], slots, 0.2, pools[1])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_reference_topk_rows_ignores_rows_past_the_count():
    scores = torch.tensor([[0.1, 0.9, 0.5, 7.0], [3.0, -1.0, 2.0, 9.0]])
    assert reference.topk_rows(scores, torch.tensor([3]), 2).tolist() == [[1, 2], [0, 2]]


@gpu
@pytest.mark.parametrize("n,count,k", [(8192, 4100, 74), (300, 300, 300), (40000, 33000, 1200), (64, 1, 1),
                                       (5000, 4999, 4096)])
def test_gpu_topk_rows_matches_torch(n, count, k):
    from offload.kernels import _cupy
    gen = torch.Generator().manual_seed(n + k)
    scores = torch.randn(8, n, generator=gen).cuda()
    scores[:, count:] = float("nan")                      # unwritten rows past the count: never picked
    scores[0, :10] = 5.0                                  # ties: lower rows first
    c = torch.tensor([count], device="cuda")
    got = _cupy.topk_rows(scores, c, k)
    want = reference.topk_rows(scores, c, k)
    masked = scores.masked_fill(torch.arange(n, device="cuda") >= count, float("-inf"))
    torch.testing.assert_close(masked.gather(1, got), masked.gather(1, want), rtol=0, atol=0)  # same values, same order
    assert (got < count).all() or k > count
    if count >= 10 and k >= 10:
        assert got[0, :10].tolist() == list(range(10))


def _naive_rows(pool, slots, which, rows, alt_pool=None):
    """Row by row: position p of head h -> (slot, token) of the head's concatenated chunks, zeros elsewhere."""
    _, _, hkv, c, d = pool.shape
    out = torch.zeros(hkv, rows.shape[1], d, dtype=pool.dtype)
    for h in range(hkv):
        for r, p in enumerate(rows[h].tolist()):
            if 0 <= p < slots.shape[1] * c and int(slots[h, p // c]) >= 0:
                s = int(slots[h, p // c])
                src = alt_pool if alt_pool is not None and s & reference.ALT_SLOT else pool
                out[h, r] = src[s & ~reference.ALT_SLOT, which, h, p % c]
    return out


def _two_pool_slots(gen, hkv, k, n_own, n_alt):
    own, alt = _random_slots(gen, hkv, k, n_own, pad=2), _random_slots(gen, hkv, k, n_alt, pad=2)  # [Hkv, K] each
    pick = torch.rand(hkv, k, generator=gen) < 0.5
    return torch.where(pick, torch.where(alt >= 0, alt | reference.ALT_SLOT, alt), own)           # [Hkv, K]


@pytest.mark.parametrize("which", [0, 1])
def test_reference_gather_rows_matches_naive(which):
    gen = torch.Generator().manual_seed(which)
    pools = [_random_pool(gen, n, 3, 4, 8) for n in (9, 12)]
    slots = _two_pool_slots(gen, 3, 6, 9, 12)                                 # slots: [Hkv, 6]
    rows = torch.randint(-3, 6 * 4 + 3, (3, 17), generator=gen)               # rows: [Hkv, 17], some outside
    got = reference.gather_rows(pools[0], slots, which, rows, pools[1])
    torch.testing.assert_close(got, _naive_rows(pools[0], slots, which, rows, pools[1]), rtol=0, atol=0)
    every = reference.gather_rows(pools[0], slots, which, None, pools[1])     # every: [Hkv, 24, D]
    torch.testing.assert_close(every, _naive_rows(pools[0], slots, which, torch.arange(24).expand(3, -1), pools[1]))


@gpu
@pytest.mark.parametrize("hkv,c,d,dtype", [(8, 64, 128, torch.bfloat16), (3, 16, 64, torch.bfloat16),
                                           (4, 32, 64, torch.float32), (2, 8, 16, torch.float32)])
@pytest.mark.parametrize("with_rows", [False, True])
def test_gpu_gather_rows_matches_reference(poison, hkv, c, d, dtype, with_rows):
    """GPU pool + pinned host slab in one launch; positions past the list, -1 slots and -1 rows give zeros."""
    gen = torch.Generator().manual_seed(c + d)
    gpu_pool = _random_pool(gen, 40, hkv, c, d, dtype).cuda()
    host_pool = _random_pool(gen, 30, hkv, c, d, dtype).pin_memory()
    slots = _two_pool_slots(gen, hkv, 13, 40, 30).int().cuda()               # slots: [Hkv, 13]
    rows = torch.randint(-2, 13 * c + 5, (hkv, 301), generator=gen).cuda() if with_rows else None  # [Hkv, 301]
    for which in (0, 1):
        got = poison.gather_rows(gpu_pool, slots, which, rows, host_pool)
        want = reference.gather_rows(gpu_pool, slots, which, rows, host_pool)
        assert got.device == slots.device and got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_reference_gather_rows_flagged_slot_without_alt_pool_is_padding():
    gen = torch.Generator().manual_seed(5)
    pool = _random_pool(gen, 6, 2, 4, 8)
    slots = torch.tensor([[0, 3 | reference.ALT_SLOT], [-1, 2]])                # slots: [Hkv, 2]
    got = reference.gather_rows(pool, slots, 1)                                 # got: [Hkv, 8, D]
    assert (got[0, 4:] == 0).all() and (got[1, :4] == 0).all()
    torch.testing.assert_close(got[0, :4], pool[0, 1, 0])
    torch.testing.assert_close(got[1, 4:], pool[2, 1, 1])


@pytest.mark.parametrize("bad", [dict(which=2), dict(slots=torch.zeros(3, 2, dtype=torch.long)),
                                 dict(rows=torch.zeros(1, 4, dtype=torch.long))])
def test_gather_rows_refuses_mismatched_arguments_on_every_path(bad):
    args = dict(pool=torch.zeros(4, 2, 2, 4, 8), slots=torch.zeros(2, 2, dtype=torch.long), which=0, rows=None)
    with pytest.raises(ValueError, match="do not match"):
        kernels.gather_rows(**{**args, **bad})


def test_reference_plan_slots_counts_selection_hits_apart():
    """Token mode: sinks + window (attended whole) count into hits[:4], the selected candidates into hits[4:8]."""
    tier = torch.tensor([0, 0, 1, 1, 0, 1, 0, 0, 0, 0], dtype=torch.int8)         # chunk -> tier
    slot = torch.arange(10) + 100                                                  # chunk -> slot
    sel = torch.tensor([[2, 3, 4, 0], [5, 9, 4, 1]])                              # sel: [Hkv, 4] best first
    args = (sel, torch.tensor([10]), 1, 2, 3, torch.tensor([False, False]), tier, slot)
    apart, together = torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)
    lists = reference.plan_slots(*_plan_args(*args, apart, torch.zeros(10), apart=True), True)
    want = reference.plan_slots(*_plan_args(*args, together, torch.zeros(10)), True)
    torch.testing.assert_close(lists.gpu, want.gpu)                                # same slot lists
    assert apart[:4].tolist() == [0, 6, 0, 0]          # sinks (chunk 0) + window (8, 9): all on the GPU tier
    assert apart[4:].tolist() == [2, 3, 3, 0]          # head 0: 2 3 4 (host host gpu); head 1: 5 4 1 (9: window)
    assert (apart[:4] + apart[4:]).tolist() == together[:4].tolist()
