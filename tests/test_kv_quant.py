"""offload.kernels.quant: compressed KV chunks (int8 / int4) against their definitions (CPU), the CuPy kernels
of quant.cu against the torch references (GPU, `-m gpu`)."""
from __future__ import annotations


import pytest
import torch

from offload.kernels import reference
from offload.kernels.quant import (PackedFormat, dequantize_chunks, gather_attend_q, gather_rows_q, quantize_chunks,
                                   reference_gather_attend_q, reference_gather_rows_q)

ALT = reference.ALT_SLOT


def _kv(gen, n, hkv, c, d, dtype=torch.bfloat16):
    """Chunks whose key channels carry offsets and a few outlier channels, as post-RoPE keys do."""
    k = torch.randn(n, hkv, c, d, generator=gen) + 3 * torch.randn(1, hkv, 1, d, generator=gen)
    k[..., :2] *= 8                                                     # outlier channels
    v = torch.randn(n, hkv, c, d, generator=gen)
    return torch.stack([k, v], dim=1).to(dtype)                         # kv: [n, 2, Hkv, C, D]


# ---- format and round trips ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_bf16_mode_is_bit_identical(dtype):
    gen = torch.Generator().manual_seed(0)
    kv = _kv(gen, 3, 2, 16, 64, dtype)
    fmt = PackedFormat("bf16", 2, 16, 64, dtype)
    packed = quantize_chunks(kv, fmt)
    assert packed.dtype == torch.uint8 and packed.shape == (3, fmt.chunk_bytes) and fmt.chunk_bytes == kv[0].nbytes
    back = dequantize_chunks(packed, fmt)
    assert back.dtype == dtype and torch.equal(back.view(torch.uint8), kv.view(torch.uint8))


def _groups(x: torch.Tensor, dim: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """min and max of x over groups of `size` along dim, broadcast back to x's shape (the definition)."""
    shape = list(x.shape)
    g = x.unflatten(dim, (shape[dim] // size, size))
    lo, hi = g.amin(dim + 1, keepdim=True), g.amax(dim + 1, keepdim=True)
    return lo.expand_as(g).flatten(dim, dim + 1), hi.expand_as(g).flatten(dim, dim + 1)


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
@pytest.mark.parametrize("hkv,c,d", [(2, 32, 128), (3, 32, 64), (1, 16, 64), (2, 64, 64)])
def test_round_trip_error_within_half_a_step(kv_dtype, hkv, c, d):
    gen = torch.Generator().manual_seed(c + d)
    kv = _kv(gen, 4, hkv, c, d).float()
    fmt = PackedFormat(kv_dtype, hkv, c, d, torch.float32)
    back = dequantize_chunks(quantize_chunks(kv, fmt), fmt)              # back: [n, 2, Hkv, C, D]
    levels = (1 << fmt.bits) - 1
    # keys: groups of Gk tokens per channel; values: groups of Gv channels per token (int8: the whole head)
    for which, dim, size in ((0, 2, min(32, c)), (1, 3, d if kv_dtype == "int8" else min(32, d))):
        x = kv[:, which]
        lo, hi = _groups(x, dim, size)
        step = (hi - lo) / levels
        # int8 keys keep their step in 8 bits (3 mantissa bits), rounded up: up to 1/8 larger (or 2^-17)
        grow = 1 + 1 / 8 if kv_dtype == "int8" and which == 0 else 1
        # half a step, fp16 rounding of the step (levels x 2^-11 of it) and of the min (2^-11 of |min|)
        bound = step * (0.5 * grow + levels / 2048) + lo.abs() / 2048 + 2 ** -18 + 1e-6
        err = (back[:, which] - x).abs()
        assert bool((err <= bound).all()), f"worst excess {float((err - bound).max())}"
        assert float(err.mean()) < float(step.mean()) * 0.3              # rounding, not clamping, dominates


def test_sizes_and_ratios():
    f8, f4 = PackedFormat("int8", 8, 32, 128), PackedFormat("int4", 8, 32, 128)
    # int8: codes + K (fp16 min, u8 step) per channel over 32 tokens + V (fp16 step, min) per token
    assert f8.chunk_bytes / f8.raw_chunk_bytes == pytest.approx((2 * 4096 + 128 * 3 + 32 * 4) / 16384) == 0.53125
    assert f4.chunk_bytes / f4.raw_chunk_bytes == pytest.approx(0.3125)  # codes + (scale, min) per 32 values
    for f in (f8, f4, PackedFormat("int8", 3, 32, 64), PackedFormat("int8", 2, 16, 64)):
        # every part starts on a 32-byte sector (128 bytes at D = 128): UVA reads move whole sectors
        assert all(f.part_offset(w, h) % (128 if f.head_dim == 128 else 32) == 0 for w in (0, 1)
                   for h in range(f.num_kv_heads))
        assert f.chunk_bytes == f.part_offset(1, f.num_kv_heads - 1) + f.value_part_bytes
    assert (f8.layout, f4.layout, PackedFormat("bf16", 8, 32, 128).layout) == ("int8.v2", "int4.v1", "bf16")


def test_int8_key_step_is_the_top_byte_of_its_fp16_rounded_up():
    from offload.kernels.quant import _step8, _unstep8
    s16 = torch.tensor([0.0, 1.0, 1.001, 3e-5, 0.3, 6e-8, 500.0], dtype=torch.float16)
    back = _unstep8(_step8(s16))
    # up to 1/8 larger; below fp16's normal range (2^-14) the 8-bit grid is 2^-17 apart (absolute)
    assert bool((back >= s16.float()).all()) and bool((back <= (s16.float() * (1 + 1 / 8)).clamp(min=2 ** -17)).all())
    assert torch.equal(back[:2], torch.tensor([0.0, 1.0]))               # representable steps stay exact
    assert torch.equal((_step8(s16).to(torch.int16) << 7) & 0x7F, torch.zeros(7, dtype=torch.int16))


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_layout_addresses_one_element_per_code(kv_dtype):
    """Changing the code of (chunk n, K/V w, head h, token t, channel j) where the layout says it lives
    changes that element of the dequantized chunk and nothing else (the kernels rely on this layout)."""
    hkv, c, d = 2, 32, 64
    gen = torch.Generator().manual_seed(5)
    fmt = PackedFormat(kv_dtype, hkv, c, d, torch.float32)
    packed = quantize_chunks(_kv(gen, 2, hkv, c, d).float(), fmt)
    base = dequantize_chunks(packed, fmt)
    for n, w, h, t, j in [(1, 0, 1, 5, 7), (0, 1, 0, 31, 62), (1, 1, 1, 0, 1)]:
        p = packed.clone()
        off = fmt.part_offset(w, h) + t * d * fmt.bits // 8 + j * fmt.bits // 8
        if fmt.bits == 8:
            p[n, off] ^= 1
        else:
            p[n, off] ^= 1 << (4 * (j % 2))                                 # element 2i: low nibble
        diff = (dequantize_chunks(p, fmt) - base).abs() > 0
        assert diff.sum() == 1 and bool(diff[n, w, h, t, j])


def test_int8_layout_addresses_each_scale():
    """int8 (layout 2): a K min / K step byte of (head h, key group g, channel j) changes channel j of that
    group's tokens only; a V pair of (head h, token t) changes that token's row only (quant.cu reads these)."""
    hkv, c, d = 2, 64, 64                                                # two key groups
    gen = torch.Generator().manual_seed(6)
    fmt = PackedFormat("int8", hkv, c, d, torch.float32)
    packed = quantize_chunks(_kv(gen, 1, hkv, c, d).float(), fmt)
    base = dequantize_chunks(packed, fmt)
    ng, cb = c // 32, fmt.code_bytes
    cases = [(0, 1, cb + 2 * (1 * d + 9) + 1, (slice(32, 64), 9)),       # K min (fp16 high byte) of g1, j9
             (0, 0, cb + 2 * ng * d + 0 * d + 3, (slice(0, 32), 3)),      # K step of g0, j3
             (1, 1, cb + 4 * 17 + 3, (17, slice(None)))]                  # V pair of token 17 (min's high byte)
    for w, h, off, (rows, cols) in cases:
        p = packed.clone()
        p[0, fmt.part_offset(w, h) + off] ^= 0x04
        diff = (dequantize_chunks(p, fmt) - base).abs() > 0              # diff: [1, 2, Hkv, C, D]
        want = torch.zeros_like(diff)
        want[0, w, h, rows, cols] = True
        assert torch.equal(diff, diff & want) and bool(diff.any()), (w, h, off)


def test_bad_format_and_shapes_are_refused():
    with pytest.raises(ValueError, match="kv_dtype"):
        PackedFormat("fp8", 2, 32, 64)
    fmt = PackedFormat("int8", 2, 32, 64)
    with pytest.raises(ValueError, match="does not match"):
        quantize_chunks(torch.zeros(1, 2, 3, 32, 64), fmt)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_chunks(torch.zeros(1, 7, dtype=torch.uint8), fmt)


# ---- attention and rows over packed pools (references) -------------------------------------------------
def _pools(gen, kv_dtype, hkv, c, d, s_gpu=9, s_host=11, raw=torch.bfloat16):
    fmt = PackedFormat(kv_dtype, hkv, c, d, raw)
    gpu = _kv(gen, s_gpu, hkv, c, d, raw)                               # gpu: [S_gpu, 2, Hkv, C, D] raw
    host = quantize_chunks(_kv(gen, s_host, hkv, c, d, raw), fmt)       # host: [S_host, B] packed
    return fmt, gpu, host


def _slots(gen, hkv, k, s_gpu, s_host, pad=2):
    """Per KV head: distinct GPU slots and ALT-flagged host slots, some -1."""
    rows = []
    for _ in range(hkv):
        g = torch.randperm(s_gpu, generator=gen)[:k // 2]
        h = torch.randperm(s_host, generator=gen)[:k - k // 2] | ALT
        row = torch.cat([g, h])[torch.randperm(k, generator=gen)]
        row[torch.randperm(k, generator=gen)[:pad]] = -1
        rows.append(row)
    return torch.stack(rows)                                            # slots: [Hkv, K]


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
@pytest.mark.parametrize("hq,hkv,d,c", [(8, 2, 64, 32), (9, 3, 64, 16), (4, 4, 128, 32)])
def test_reference_attend_q_equals_attention_over_dequantized_chunks(kv_dtype, hq, hkv, d, c):
    gen = torch.Generator().manual_seed(hq + d)
    fmt, gpu, host = _pools(gen, kv_dtype, hkv, c, d)
    slots = _slots(gen, hkv, 8, gpu.shape[0], host.shape[0])
    q = torch.randn(hq, d, generator=gen)
    want = reference.gather_attend(q, gpu, slots, d ** -0.5, dequantize_chunks(host, fmt))
    got = gather_attend_q(q, gpu, slots, d ** -0.5, fmt, host)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # packed main pool alone, and a selection of nothing
    own = torch.where(slots >= 0, slots & ~ALT, -1) % host.shape[0]
    torch.testing.assert_close(gather_attend_q(q, host, own, 0.1, fmt),
                               reference.gather_attend(q, dequantize_chunks(host, fmt), own, 0.1), rtol=1e-5, atol=1e-5)
    o, lse = gather_attend_q(q, host, torch.full((hkv, 3), -1), 0.1, fmt)
    assert torch.equal(o, torch.zeros(hq, d)) and torch.isneginf(lse).all()


def test_raw_pools_take_the_uncompressed_path_bit_identically():
    gen = torch.Generator().manual_seed(3)
    pool = _kv(gen, 6, 2, 16, 64)
    slots = torch.tensor([[0, 3, -1], [5, 1, 2]])
    q = torch.randn(8, 64, generator=gen)
    got = gather_attend_q(q, pool, slots, 0.125)
    want = reference.gather_attend(q, pool, slots, 0.125)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(gather_rows_q(pool, slots, 1), reference.gather_rows(pool, slots, 1))


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
@pytest.mark.parametrize("which", [0, 1])
def test_reference_rows_q_equal_rows_of_dequantized_chunks(kv_dtype, which):
    gen = torch.Generator().manual_seed(which)
    hkv, c, d = 2, 16, 64
    fmt, gpu, host = _pools(gen, kv_dtype, hkv, c, d)
    slots = _slots(gen, hkv, 6, gpu.shape[0], host.shape[0])
    rows = torch.randint(-3, 6 * c + 3, (hkv, 40), generator=gen)       # some out of range: zeros
    deq = dequantize_chunks(host, fmt, torch.bfloat16)
    for r in (None, rows):
        got = gather_rows_q(gpu, slots, which, r, host, fmt)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, reference.gather_rows(gpu, slots, which, r, deq))


def test_int8_attention_stays_close_to_exact():
    """A regression guard on accuracy: keys with channel offsets and outliers, 64 chunks."""
    gen = torch.Generator().manual_seed(11)
    hkv, c, d = 2, 32, 128
    kv = _kv(gen, 64, hkv, c, d, torch.float32)
    q = torch.randn(8, d, generator=gen) * 0.3
    slots = torch.arange(64).expand(hkv, -1)
    exact, _ = reference.gather_attend(q, kv, slots, d ** -0.5)
    for kv_dtype, tol in (("int8", 0.01), ("int4", 0.12)):
        fmt = PackedFormat(kv_dtype, hkv, c, d, torch.float32)
        o, _ = gather_attend_q(q, quantize_chunks(kv, fmt), slots, d ** -0.5, fmt)
        rel = float(((o - exact).norm(dim=-1) / exact.norm(dim=-1)).max())
        assert rel < tol, f"{kv_dtype}: relative error {rel:.4f}"


# ---- GPU: quant.cu against the references -------------------------------------------------------
gpu = pytest.mark.gpu


@pytest.fixture
def poison():
    """The quant.cu launchers, with outputs and scratch filled with NaN first (an element left unwritten shows)."""
    from offload.kernels import _cupy, _cupy_quant
    with _cupy.launch_options(poison=True):
        yield _cupy_quant


def _nan_out(hq, d):
    return (torch.full((hq, d), float("nan"), device="cuda"), torch.full((hq,), float("nan"), device="cuda"))


@gpu
@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
@pytest.mark.parametrize("hq,hkv,d,c", [(32, 8, 128, 32), (9, 3, 64, 32), (8, 8, 128, 16), (64, 8, 128, 64),
                                        (16, 4, 64, 32), (8, 2, 64, 8)])
@pytest.mark.parametrize("layout", ["host_alt", "packed_only", "both_packed"])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_gpu_attend_q_matches_reference(poison, kv_dtype, hq, hkv, d, c, layout, num_splits):
    gen = torch.Generator().manual_seed(hq * 7 + c)
    fmt, gpu_pool, host = _pools(gen, kv_dtype, hkv, c, d, s_gpu=13, s_host=29)
    q = torch.randn(hq, d, generator=gen).to(torch.bfloat16)
    slots = _slots(gen, hkv, 24, 13, 29, pad=3)
    pinned = host.pin_memory()
    if layout == "host_alt":
        pool, alt = gpu_pool.cuda(), pinned                             # GPU pool raw, host slab packed (UVA)
    elif layout == "packed_only":
        pool, alt, slots = pinned, None, torch.where(slots >= 0, (slots & ~ALT) % 29, -1)
    else:
        pool, alt = quantize_chunks(gpu_pool, fmt).cuda(), pinned
    assert poison.supports_attend_q(q.cuda(), pool, alt, fmt)
    want = reference_gather_attend_q(q.float(), pool.cpu(), slots, 0.09, fmt, None if alt is None else alt.cpu())
    for idx in (torch.int32, torch.int64):
        got = poison.gather_attend_q(q.cuda(), pool, slots.to("cuda", idx), 0.09, fmt, alt, out=_nan_out(hq, d),
                                     num_splits=num_splits)
        torch.testing.assert_close(got[0].cpu(), want[0], rtol=2e-4, atol=2e-4)
        torch.testing.assert_close(got[1].cpu(), want[1], rtol=2e-4, atol=2e-4)


@gpu
def test_gpu_attend_q_empty_selection_and_public_dispatch(poison):
    gen = torch.Generator().manual_seed(2)
    fmt, gpu_pool, host = _pools(gen, "int8", 8, 32, 128)
    q = torch.randn(32, 128, generator=gen).cuda()
    o, lse = poison.gather_attend_q(q, host.pin_memory(), torch.full((8, 5), -1, device="cuda"), 0.1, fmt,
                                    out=_nan_out(32, 128), num_splits=2)
    assert torch.equal(o.cpu(), torch.zeros(32, 128)) and torch.isneginf(lse).all()
    slots = _slots(gen, 8, 6, gpu_pool.shape[0], host.shape[0])
    got = gather_attend_q(q, gpu_pool.cuda(), slots.cuda(), 0.1, fmt, host.pin_memory())   # the public call
    want = reference_gather_attend_q(q.cpu(), gpu_pool, slots, 0.1, fmt, host)
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=2e-4, atol=2e-4)


@gpu
@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
@pytest.mark.parametrize("d,c", [(128, 32), (64, 16), (128, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("which", [0, 1])
def test_gpu_rows_q_match_reference(poison, kv_dtype, d, c, dtype, which):
    gen = torch.Generator().manual_seed(d + which)
    hkv = 4
    fmt, gpu_pool, host = _pools(gen, kv_dtype, hkv, c, d, s_gpu=7, s_host=17, raw=dtype)
    slots = _slots(gen, hkv, 10, 7, 17)
    rows = torch.randint(-2, 10 * c + 2, (hkv, 77), generator=gen)
    for r in (None, rows):
        want = reference_gather_rows_q(gpu_pool, slots, which, r, host, fmt, dtype)
        got = poison.gather_rows_q(gpu_pool.cuda(), slots.cuda(), which, None if r is None else r.cuda(),
                                   host.pin_memory(), fmt, dtype)
        assert got.dtype == dtype
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-5)
