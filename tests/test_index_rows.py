"""Index rows for the prompt cache: a summary index filled from exported rows (import_rows) equals, bit for bit,
one built from the original keys (buffers, count, selections, mass estimates); the selector passes them through,
also past a mass budget's wrapper, and reports no rows for indexes that keep none."""
from __future__ import annotations

import pytest
import torch

from offload.indexes import Budget, make_index
from offload.indexes.selector import Selector

HKV, HQ, D, C, LAYERS = 2, 8, 16, 4, 2
N = 22                                   # chunks per layer: 22 = 5 groups of 4 + an incomplete one
BUILD_SPLIT = (0, 9, 16, N)              # index_chunks calls: chunks 0..8, 9..15, 16..21
# import_rows calls: a cut of its own where the planner fixed the context (max_chunks), as the runtime always
# does; without it buffers are sized from the first call (build's 2x rule), so the cuts must agree
IMPORT_SPLIT = {64: (0, 10, N), 0: (0, 9, N)}

# (bounds, host_bounds, coarse_group): one level native / int8, two levels with native or int8 fine rows
LEVELS = [("native", "native", 1), ("int8", "native", 1), ("native", "native", 4), ("int8", "native", 4),
          ("int8", "int8", 4)]


def _selector(opts: dict, dtype, max_chunks: int, budget="p=0.9,floor=4,cap=32", method="summary") -> Selector:
    indexes = [make_index(method, num_kv_heads=HKV, num_q_heads=HQ, head_dim=D, chunk_tokens=C, device="cpu",
                          dtype=dtype, max_chunks=max_chunks, **opts) for _ in range(LAYERS)]
    return Selector(num_layers=LAYERS, num_kv_heads=HKV, chunk_tokens=C, n_sink=1, n_window=1, device="cpu",
                    indexes=indexes, budget=Budget.parse(budget))


def _built(opts, dtype, max_chunks, budget) -> tuple[Selector, dict]:
    g = torch.Generator().manual_seed(0)
    keys = {layer: (torch.randn(HKV, N * C, D, generator=g) * 3).to(dtype) for layer in range(LAYERS)}  # [Hkv, N*C, D]
    sel = _selector(opts, dtype, max_chunks, budget)
    for a, b in zip(BUILD_SPLIT, BUILD_SPLIT[1:]):
        for layer in range(LAYERS):
            sel.index_chunks(layer, a, keys[layer][:, a * C:b * C])
    return sel, keys


def _summary(sel: Selector, layer: int):
    idx = sel.indexes[layer]
    return getattr(idx, "inner", idx)       # a mass budget wraps the summary index


def _assert_same_index(a, b) -> None:
    assert a.num_chunks == b.num_chunks == N
    assert torch.equal(a._count, b._count)
    for tier_a, tier_b in ((a._device_tier, b._device_tier), (a._host_tier, b._host_tier)):
        if tier_a is None:
            assert tier_b is None
            continue
        assert tier_a.size == tier_b.size
        for buf_a, buf_b in ((tier_a.lo, tier_b.lo), (tier_a.hi, tier_b.hi), (tier_a.scale, tier_b.scale)):
            assert buf_a.data.dtype == buf_b.data.dtype and buf_a.size == buf_b.size
            assert torch.equal(buf_a.valid, buf_b.valid)                # bit-identical written rows
            assert buf_a.data.shape == buf_b.data.shape                 # the same room (no regrowth later)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bounds,host_bounds,group", LEVELS, ids=["-".join(map(str, lv)) for lv in LEVELS])
@pytest.mark.parametrize("max_chunks,budget", [(64, "12"), (0, "p=0.9,floor=4,cap=32")], ids=["ctx-fixed", "mass"])
def test_imported_rows_equal_the_index_built_from_keys(dtype, bounds, host_bounds, group, max_chunks, budget):
    opts = {"bounds": bounds, "host_bounds": host_bounds, "coarse_group": group}
    a, _ = _built(opts, dtype, max_chunks, budget)                    # budget "12": 3 chunks of 4 tokens per head
    b = _selector(opts, dtype, max_chunks, budget)
    fine_int8 = (host_bounds if group > 1 else bounds) == "int8"
    item = torch.empty((), dtype=dtype).element_size()
    r = HKV * (2 * D + 4) if fine_int8 else HKV * 2 * D * item       # lo + hi (+ a float32 scale) per KV head
    assert a.row_bytes() == b.row_bytes() == r
    for layer in range(LAYERS):
        rows = a.export_rows(layer, 0, N)                                  # rows: [N, R]
        assert rows.dtype == torch.uint8 and rows.shape == (N, r) and rows.device.type == "cpu"
        assert torch.equal(torch.cat([a.export_rows(layer, 0, 7), a.export_rows(layer, 7, N - 7)]), rows)
        cuts = IMPORT_SPLIT[max_chunks]
        for x, y in zip(cuts, cuts[1:]):
            b.import_rows(layer, x, rows[x:y])
        _assert_same_index(_summary(a, layer), _summary(b, layer))
        assert torch.equal(b.export_rows(layer, 0, N), rows)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        q = (torch.randn(HQ, D, generator=g) * 3).to(dtype)               # q: [Hq, D]
        for layer in range(LAYERS):
            for k in (1, 5, N):
                assert torch.equal(_summary(a, layer).select(q, k), _summary(b, layer).select(q, k))
            assert torch.equal(_summary(a, layer).chunk_log_mass(q), _summary(b, layer).chunk_log_mass(q))
            sa, sb = a.select(layer, q, N, N * C + 2), b.select(layer, q, N, N * C + 2)
            assert sa.ids.shape[1] < N                                     # a sparse selection, not every chunk
            assert torch.equal(sa.ids, sb.ids) and sa.take == sb.take


def test_import_refuses_rows_out_of_order_or_of_another_shape():
    opts = {"bounds": "int8", "coarse_group": 4}
    a, _ = _built(opts, torch.float32, 64, "12")
    rows = a.export_rows(0, 0, N)                                          # rows: [N, R]
    b = _selector(opts, torch.float32, 64, "12")
    with pytest.raises(ValueError, match="start at chunk 3"):
        b.import_rows(0, 3, rows[3:])                                      # an empty index starts at 0
    b.import_rows(0, 0, rows[:10])
    for first in (9, 11, 0):
        with pytest.raises(ValueError, match="holds 10 chunks"):
            b.import_rows(0, first, rows[10:])
    with pytest.raises(ValueError, match="must be uint8"):
        b.import_rows(0, 10, rows[10:, :-1])                               # a row of another configuration
    with pytest.raises(ValueError, match="must be uint8"):
        b.import_rows(0, 10, rows[10:].float())
    assert _summary(b, 0).num_chunks == 10                                 # nothing half-imported
    with pytest.raises(ValueError, match="not all indexed"):
        a.export_rows(0, N - 2, 3)


def test_selectors_without_summary_rows_export_none():
    exact = Selector(num_layers=LAYERS, num_kv_heads=HKV, chunk_tokens=C, n_sink=1, n_window=1, device="cpu")
    shadow = _selector({"rank": 4}, torch.float32, 64, "12", method="shadow")
    for sel in (exact, shadow):
        assert sel.row_bytes() == 0
        assert sel.export_rows(0, 0, 1) is None
        with pytest.raises(ValueError, match="no exportable rows"):
            sel.import_rows(0, 0, torch.zeros(1, 8, dtype=torch.uint8))
