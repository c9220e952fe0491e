"""Packed chunks in and out of a compressed store without re-quantizing (tiers/cold.py): what a prompt cache of
an int8 / int4 session saves and resumes."""
import pytest
import torch

from offload.errors import CapacityError, ConfigError
from offload.kernels.quant import PackedFormat, dequantize_chunks, quantize_chunks
from offload.tiers.base import ChunkShape
from offload.tiers.store import TieredKVStore

SHAPE = ChunkShape(2, 16, 64, torch.float32)


def _filled(kv_dtype, tmp_path, caps=(4, 6, 12)):
    kv = torch.randn(20, *SHAPE.shape, generator=torch.Generator().manual_seed(1))   # kv: [20, 2, Hkv, C, D]
    store = TieredKVStore(SHAPE, 1, caps, disk_dir=str(tmp_path / "a"), sink_chunks=1, window_chunks=2,
                          kv_dtype=kv_dtype)
    for i in range(0, 20, 5):
        store.put(0, i, kv[i:i + 5])
    return store, kv


@pytest.mark.parametrize("order", ["all", "middle", "shuffled"])
@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_read_stored_gives_packed_bytes_where_packed_and_bf16_elsewhere(kv_dtype, tmp_path, order):
    """Runs of rows are read straight into place, others gathered: every order gives the same chunks."""
    store, kv = _filled(kv_dtype, tmp_path)
    ids = {"all": list(range(20)), "middle": list(range(5, 15)),
           "shuffled": torch.randperm(20, generator=torch.Generator().manual_seed(3)).tolist()}[order]
    with store:
        got = store.read_stored(0, ids)
        tier = store._tier[0][ids]
        fmt = PackedFormat(kv_dtype, 2, 16, 64, torch.float32)
        packed_ref = quantize_chunks(kv, fmt)                                    # packed_ref: [20, B]
        assert torch.equal(got.packed, tier > 0) and int(got.packed.sum()) > 0
        for i, c in enumerate(ids):
            if got.packed[i]:
                assert torch.equal(got.cold[i], packed_ref[c])
            else:
                assert torch.equal(got.raw[i], kv[c])


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_put_cold_resumes_chunks_bit_identical(kv_dtype, tmp_path):
    """Every chunk of a store re-put from read_stored (raw -> put, packed -> put_cold) reads back equal."""
    src, _ = _filled(kv_dtype, tmp_path)
    with src, TieredKVStore(SHAPE, 1, (4, 3, 14), disk_dir=str(tmp_path / "b"), sink_chunks=1, window_chunks=2,
                            kv_dtype=kv_dtype) as dst:
        want = src.read(0, range(20))
        got = src.read_stored(0, range(20))
        for i in range(20):
            if got.packed[i]:
                dst.put_cold(0, i, got.cold[i:i + 1])
            else:
                dst.put(0, i, got.raw[i:i + 1])
        assert torch.equal(dst.read(0, range(20)), want)
        assert {int(t) for t in dst._tier[0][:20]} == {0, 1, 2}        # host filled up, then disk took the rest
        assert torch.equal(dst.read_stored(0, range(20)).cold[got.packed], got.cold[got.packed])


def test_put_cold_refuses_what_it_cannot_store(tmp_path):
    with TieredKVStore(SHAPE, 1, (4, 2, 0), sink_chunks=1, window_chunks=2) as plain:
        with pytest.raises(ConfigError, match="bf16"):
            plain.put_cold(0, 0, torch.zeros(1, 8, dtype=torch.uint8))
    fmt = PackedFormat("int4", 2, 16, 64, torch.float32)
    with TieredKVStore(SHAPE, 1, (4, 2, 0), sink_chunks=1, window_chunks=2, kv_dtype="int4") as store:
        with pytest.raises(ValueError, match="cold must be"):
            store.put_cold(0, 0, torch.zeros(1, 8, dtype=torch.uint8))
        with pytest.raises(CapacityError, match="full"):
            store.put_cold(0, 0, torch.zeros(3, fmt.chunk_bytes, dtype=torch.uint8))
        assert int(store._num[0]) == 0                                  # refused before anything changed
        cold = quantize_chunks(torch.randn(2, *SHAPE.shape), fmt)           # cold: [2, B]
        store.put_cold(0, 0, cold)
        assert torch.equal(store.read(0, [0, 1]), dequantize_chunks(cold, fmt))
