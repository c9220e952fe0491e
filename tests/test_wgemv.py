"""The tuned dequantize-GEMV (offload/kernels/wgemv.cu): every variant the tune bench may pick, on every block
format, against the float32 torch reference; and the table that picks them (CPU)."""
from __future__ import annotations

import pytest
import torch

from offload.kernels import _build, wgemv_table
from offload.model import qformats
from offload.model.qlinear import Part, QuantWeight

FORMATS = list(qformats.SUPPORTED)
_F16_FIELDS = {"Q8_0": ("d",), "Q4_0": ("d",), "Q4_1": ("dm",), "Q6_K": ("d",)}


def _random_blocks(fmt: str, rows: int, cols: int, seed: int) -> QuantWeight:
    """Every code and scale byte random (all 6-bit Q4_K scales, the full int8 Q6_K scales), float16 fields finite."""
    g = torch.Generator().manual_seed(seed)
    planes = qformats.quantize(fmt, torch.zeros(rows, cols))   # only for the plane names and sizes
    planes = {k: torch.randint(0, 256, v.shape, generator=g, dtype=torch.uint8) for k, v in planes.items()}
    halves = lambda n: (torch.rand(rows, n, generator=g) * 0.02 + 0.001).half().view(torch.uint8)  # noqa: E731
    for name in _F16_FIELDS.get(fmt, ()):
        planes[name] = halves(planes[name].shape[1] // 2).reshape(rows, -1)
    if fmt == "Q4_K":   # d, dmin: the first 4 of each super-block's 16 meta bytes
        meta = planes["meta"].reshape(rows, -1, 16)
        meta[:, :, :4] = halves(meta.shape[1] * 2).reshape(rows, -1, 4)
        planes["meta"] = meta.reshape(rows, -1)
    return QuantWeight([Part(fmt, planes)], cols)


# ---- CPU: the table ------------------------------------------------------------------------------------------
def test_every_table_entry_and_candidate_is_a_valid_variant():
    assert {v.name for v in wgemv_table.CANDIDATES} == {wgemv_table.parse(v.name).name for v in wgemv_table.CANDIDATES}
    for fmt in FORMATS:
        for cls in wgemv_table.CLASSES:
            v = wgemv_table.pick(fmt, *{"few_rows": (1024, 4096), "square": (4096, 4096), "wide": (28672, 4096),
                                        "many_rows": (128256, 4096), "long_k": (4096, 14336)}[cls])
            assert v == wgemv_table.parse(wgemv_table.TABLE[fmt][cls])
    with pytest.raises(ValueError, match="no GEMV variant"):
        wgemv_table.parse("w8r2")
    with pytest.raises(ValueError, match="ksplit must divide"):
        wgemv_table.parse("w8r2u2k3sm")
    with pytest.raises(ValueError, match="ksplit must divide"):
        wgemv_table.parse("t8m1k3x")


def test_tensor_core_variants_apply_to_bf16_x_and_4_bit_formats_only():
    v = wgemv_table.parse("t16m2k8xdp2")
    assert (v.kernel, v.warps, v.mt, v.ksplit, v.sub, v.pipe, v.ctas_per_sm, v.tile_rows) == \
        ("tc", 16, 2, 8, 1, 1, 2, 64)
    assert "-DTC_MT=2" in v.defines and "-DTC_PIPE=1" in v.defines
    for fmt in FORMATS:
        assert wgemv_table.tc_applies(fmt, 4096, True) == (fmt in ("Q4_K", "Q4_0", "Q4_1"))
        assert not wgemv_table.tc_applies(fmt, 4096, False)
    assert not wgemv_table.tc_applies("Q4_0", 4096 + 32, True)   # rows of whole 64-weight units only
    for fmt in wgemv_table.TC_FORMATS:
        assert wgemv_table.fallback(fmt, 4096, 4096).kernel == "v2"


def test_tune_bench_picks_the_fastest_passing_variant_and_renders_the_table():
    """bench/gemv_tune.py's selection: least summed time over a class's shapes; a variant wrong anywhere in a
    format is never picked for it; the rendered module keeps the other formats and picks the new entries."""
    import importlib.util
    import inspect
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "gemv_tune.py")
    spec = importlib.util.spec_from_file_location("gemv_tune", path)
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)

    def row(shape, rows, cols, variant, ms=None, error=None):
        r = {"weights": "Q4_K", "shape": shape, "rows": rows, "cols": cols, "variant": variant,
             "class": wgemv_table.shape_class(rows, cols)}
        return {**r, "ms": ms, "gb_per_s": 1.0, "x_of_copy": 0.5} if error is None else {**r, "error": error}
    rows = [row("qkv", 6144, 4096, "w8r2u2k1sm", 1.0), row("o", 4096, 4096, "w8r2u2k1sm", 1.0),
            row("qkv", 6144, 4096, "w8r2u4k1sm", 0.5), row("o", 4096, 4096, "w8r2u4k1sm", 2.0),   # 2.5 > 2.0
            row("qkv", 6144, 4096, "w4r1u4k1sm", 0.1), row("o", 4096, 4096, "w4r1u4k1sm", 0.1),
            row("down", 4096, 14336, "w4r1u4k1sm", error="AssertionError: mismatch"),           # wrong elsewhere
            row("down", 4096, 14336, "w8r2u4k1sm", 3.0)]
    table, _ = tune.best_table(rows, ["Q4_K"])
    assert table == {"Q4_K": {"square": "w8r2u2k1sm", "long_k": "w8r2u4k1sm"}}
    ns: dict = {}
    exec(compile(tune.render_table(table, inspect.getsource(wgemv_table), "test"), "rendered", "exec"), ns)
    assert ns["pick"]("Q4_K", 4096, 4096).name == "w8r2u2k1sm"
    assert ns["TABLE"]["Q8_0"] == wgemv_table.TABLE["Q8_0"]
    assert ns["TABLE"]["Q4_K"]["few_rows"] == wgemv_table.TABLE["Q4_K"]["few_rows"]


def test_kernel_sources_have_their_headers_pasted_in():
    for file in ("wgemv.cu", "wquant.cu", "wgemv_tc.cu"):
        src = _build.source(file)
        assert "#include" not in src and "__device__ __forceinline__ float byte_f" in src


# ---- GPU: every variant against the reference -----------------------------------------------------------------
def _check(x, w, tol):
    from offload.kernels import wquant
    assert wquant.supports(x, w)
    y = wquant.gemv(x, w)
    ref = x.float() @ w.dequantize().t()   # float32 reference: [1, out]
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.fixture(scope="module")
def compiled():
    """All candidates' bf16 kernels compiled at once (NVRTC calls in parallel), so the cases below run fast."""
    from offload.kernels import _backend
    from offload.kernels.wquant import _CODES
    _backend()
    from offload.kernels import _cupy_wquant
    jobs = [(v, _CODES[f], torch.bfloat16) for v in wgemv_table.CANDIDATES for f in FORMATS]
    jobs += [(wgemv_table.parse(wgemv_table.TABLE[f][c]), _CODES[f], dtype) for f in FORMATS
             for c in wgemv_table.CLASSES for dtype in (torch.float32, torch.float16)]
    return _cupy_wquant.precompile(jobs, torch.cuda.current_device(), workers=16)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", [v.name for v in wgemv_table.CANDIDATES])
def test_every_variant_matches_reference(fmt, variant, compiled, monkeypatch):
    """320 rows of two parts (tiles cut mid-part, y written through a view) and K = 2304: Q4_K's reordered
    units (multiples of 64) and the plain tail after them, every scale bit random."""
    from offload.kernels import _cupy_wquant
    monkeypatch.setattr(_cupy_wquant, "forced_variant", wgemv_table.parse(variant))
    w = QuantWeight.cat([_random_blocks(fmt, 300, 2304, 0), _random_blocks("Q8_0", 20, 2304, 1)], "w").to("cuda")
    x = torch.randn(1, 2304, device="cuda", dtype=torch.bfloat16)
    _check(x, w, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_table_variants_in_every_x_dtype(fmt, dtype, compiled, monkeypatch):
    """The table's picks (what runs in a model) with float32 and float16 activations."""
    from offload.kernels import _cupy_wquant
    for name in sorted(set(wgemv_table.TABLE[fmt].values())):
        monkeypatch.setattr(_cupy_wquant, "forced_variant", wgemv_table.parse(name))
        w = _random_blocks(fmt, 96, 1024, 2).to("cuda")
        x = torch.randn(1, 1024, device="cuda", dtype=dtype)
        _check(x, w, 1e-4 if dtype == torch.float32 else 2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K", "Q6_K"])
def test_long_rows_take_more_than_48k_of_shared_memory(fmt, compiled, monkeypatch):
    """K = 14336 (down_proj): x staged in float32 needs 61 KB, over the launch default."""
    from offload.kernels import _cupy_wquant
    monkeypatch.setattr(_cupy_wquant, "forced_variant", wgemv_table.parse("w8r2u4k1sm"))
    w = _random_blocks(fmt, 40, 14336, 3).to("cuda")
    _check(torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16), w, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["w8r2u4k1smp2", "w8r2u2k4smp2", "t8m1k2xp2", "t8m2k4xp2"])
def test_capped_grid_loops_over_more_tiles_than_ctas(variant, compiled, monkeypatch):
    """A grid of 2 CTAs per SM over ~9000 rows: each CTA takes many tiles (and the k-split's barriers repeat)."""
    from offload.kernels import _cupy_wquant
    monkeypatch.setattr(_cupy_wquant, "forced_variant", wgemv_table.parse(variant))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    w = _random_blocks("Q4_K", 2 * sms * 32 + 37, 256, 4).to("cuda")
    _check(torch.randn(1, 256, device="cuda", dtype=torch.bfloat16), w, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", list(wgemv_table.TC_FORMATS))
@pytest.mark.parametrize("variant", ["t8m1k8x", "t8m2k4xd", "t8m1k4o"])
@pytest.mark.parametrize("cols", [320, 14336])
def test_tensor_core_kernel_long_rows_partial_groups_and_outliers(fmt, variant, cols, compiled, monkeypatch):
    """wgemv_tc.cu: K = 14336 (56 super-blocks over the K split), K = 320 (5 units: a group of 4 lanes with one
    unit, Q4_0/Q4_1 only), 45 rows (a partial tile), activations with outliers of 1e3 (the products stay exact)."""
    from offload.kernels import _cupy_wquant
    if cols % qformats.FORMATS[fmt].block:
        pytest.skip(f"{fmt} needs whole {qformats.FORMATS[fmt].block}-weight blocks")
    monkeypatch.setattr(_cupy_wquant, "forced_variant", wgemv_table.parse(variant))
    w = _random_blocks(fmt, 45, cols, 6).to("cuda")
    x = torch.randn(1, cols, device="cuda", dtype=torch.bfloat16)
    x[0, ::97] = 1e3
    _check(x, w, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tensor_core_pick_falls_back_for_other_activations(dtype, compiled, monkeypatch):
    """A "tc" variant with float32 / float16 x runs the wgemv.cu fallback (wgemv_tc.cu reads bf16 only)."""
    from offload.kernels import _cupy_wquant
    monkeypatch.setattr(_cupy_wquant, "forced_variant", wgemv_table.parse("t8m1k4x"))
    w = _random_blocks("Q4_K", 96, 1024, 7).to("cuda")
    _check(torch.randn(1, 1024, device="cuda", dtype=dtype), w, 1e-4 if dtype == torch.float32 else 2e-3)


@pytest.mark.gpu
def test_default_pick_runs_inside_a_cuda_graph(compiled):
    """What decode does: the table's launch captured and replayed, same result as eager."""
    from offload.kernels import wquant
    w = _random_blocks("Q4_K", 1024, 4096, 5).to("cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    eager = wquant.gemv(x, w)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        wquant.gemv(x, w)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = wquant.gemv(x, w)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager)
