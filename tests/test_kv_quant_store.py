"""Compressed host and disk tiers (kv_dtype int8 / int4, issue 12): the store, the planner, the option."""
import pytest
import torch

from fixtures_models import write_tiny_checkpoint
from offload import LLM, ConfigError
from offload.kernels.quant import PackedFormat, dequantize_chunks, quantize_chunks
from offload.planner import plan_budget
from offload.tiers.base import ChunkShape
from offload.tiers.store import TieredKVStore

SHAPE = ChunkShape(2, 16, 64, torch.float32)


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_store_holds_packed_chunks_off_the_gpu_tier(kv_dtype, tmp_path):
    """GPU-tier chunks read back bit-identical; host and disk chunks as the codec's round trip, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(20, *SHAPE.shape, generator=gen)                  # kv: [20, 2, Hkv, C, D]
    fmt = PackedFormat(kv_dtype, 2, 16, 64, torch.float32)
    with TieredKVStore(SHAPE, 1, (4, 6, 12), disk_dir=str(tmp_path), sink_chunks=1, window_chunks=2,
                       kv_dtype=kv_dtype) as store:
        for i in range(0, 20, 5):
            store.put(0, i, kv[i:i + 5])
        assert store.tiers[1].slab.dtype == torch.uint8 and store.tiers[1].slab.shape[1] == fmt.chunk_bytes
        back = store.read(0, range(20))
        tier = store.residency(0).tier if hasattr(store, "residency") else store._tier[0][:20]
        lossy = dequantize_chunks(quantize_chunks(kv, fmt), fmt)
        for i in range(20):
            want = kv[i] if int(tier[i]) == 0 else lossy[i]
            assert torch.equal(back[i], want), f"chunk {i} in tier {int(tier[i])}"
        assert {int(t) for t in tier} == {0, 1, 2}                     # every tier holds some
        st = store.stats()
        assert st["kv_dtype_host"] == kv_dtype and st["kv_dtype_gpu"] == "bf16"
        assert st["bytes_in_use_host"] == 6 * fmt.chunk_bytes


def test_planner_counts_compressed_bytes():
    args = dict(num_layers=2, num_kv_heads=8, head_dim=128, dtype_bytes=2, ctx=64 * 1024, weight_bytes=0,
                device="cpu", gpu_mem=1 << 26, host_mem=1 << 30, chunk_tokens=32)
    raw = plan_budget(**args)
    fmt = PackedFormat("int4", 8, 32, 128)
    packed = plan_budget(**args, kv_dtype="int4", cold_chunk_bytes=fmt.chunk_bytes)
    assert raw.gpu_chunks == packed.gpu_chunks
    assert packed.host_chunks == min(4096 - packed.gpu_chunks, (1 << 30) // fmt.chunk_bytes)
    assert packed.host_bytes == packed.host_chunks * fmt.chunk_bytes and "int4" in packed.summary()
    assert "int4" not in raw.summary()


def test_bad_kv_dtype_is_refused():
    from offload.config import OffloadConfig
    with pytest.raises(ConfigError, match="kv-dtype"):
        OffloadConfig(kv_dtype="fp8")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("kvq"), "llama", num_key_value_heads=2)


@pytest.mark.parametrize("mode", [dict(attention="full"),
                                  dict(attention="sparse", budget="50%", select_unit="token", token_candidates=2)])
def test_session_with_int8_host_tier_stays_close_to_bf16(tiny, mode):
    """Exact attention and the sparse token stage through the tiered store: int8 host KV changes the logits a
    little, the argmax only at a near tie."""
    opts = dict(device="cpu", ctx=512, chunk_tokens=8, sink_tokens=16, window_tokens=32, gpu_mem="40KiB", **mode)
    ids = torch.randint(0, tiny.model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    out = {}
    for kd in ("bf16", "int8"):
        sess = LLM(str(tiny.path), kv_dtype=kd, **opts).session()
        logits = [sess.prefill(ids[:260])] + [sess.step(t) for t in ids[260:300]]
        out[kd] = torch.stack(logits)                                  # [41, V]
        st = sess.stats()
        assert st["kv_dtype_host"] == kd
        assert sum(st.get(k, 0) for k in ("attended_host_selections", "candidate_host_selections")) > 0   # host read
        if st.get("attended_host_selections"):      # bytes read from the host at the size the host tier stores
            store = sess.attn.store
            per = store.cold_shape.nbytes // store.shape.num_kv_heads
            assert st["attended_bytes_host"] == st["attended_host_selections"] * per
            assert (per < st["attended_bytes_gpu"] // max(1, st["attended_gpu_selections"])) == (kd == "int8")
        sess.close()
    diff = (out["int8"] - out["bf16"]).abs().max()
    assert 0 < float(diff) < 0.05 * float(out["bf16"].abs().max())
    # the argmax holds except at near ties of this random model (a top-2 margin under 1 % of the logit scale)
    top2 = out["bf16"].topk(2, -1).values                              # top2: [41, 2]
    flips = out["int8"].argmax(-1) != out["bf16"].argmax(-1)
    assert int(flips.sum()) <= 1 and bool((top2[flips, 0] - top2[flips, 1] < 0.01 * top2[:, 0].abs().max()).all())


def test_session_saved_with_one_kv_dtype_loads_into_another_and_says_so(tiny, tmp_path, capsys):
    """The file holds the values the saving session read (packed chunks dequantized): another kv_dtype loads
    them (converted) and one line on stderr says so; the same kv_dtype loads silently."""
    opts = dict(device="cpu", ctx=512, chunk_tokens=8, sink_tokens=16, window_tokens=32, gpu_mem="40KiB",
                attention="full")
    ids = torch.randint(0, tiny.model.config.vocab_size, (260,), generator=torch.Generator().manual_seed(2)).tolist()
    int4 = LLM(str(tiny.path), kv_dtype="int4", **opts)
    s = int4.session()
    s.prefill(ids)
    saved = [s.attn.read_kv(layer) for layer in range(int4.model_config.num_layers)]
    s.save(tmp_path / "s.offload")
    s.close()
    capsys.readouterr()
    same = int4.load_session(tmp_path / "s.offload")
    assert capsys.readouterr().err == ""
    same.close()
    plain = LLM(str(tiny.path), kv_dtype="bf16", **opts).load_session(tmp_path / "s.offload")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saved with int4 host KV, loaded into a bf16 session" in err[0]
    for layer, (k, v) in enumerate(saved):
        k2, v2 = plain.attn.read_kv(layer)
        assert torch.equal(k2[:, :260], k[:, :260]) and torch.equal(v2[:, :260], v[:, :260])
    plain.close()


def test_session_saved_with_an_older_int8_layout_loads_and_says_so(tiny, tmp_path, capsys, monkeypatch):
    """A saved session holds dequantized values, so an older packed layout cannot be misread: it loads, its
    chunks are quantized again in this layout, and one line on stderr says so (the same layout: silent)."""
    from offload.kernels import quant
    opts = dict(device="cpu", ctx=512, chunk_tokens=8, sink_tokens=16, window_tokens=32, gpu_mem="40KiB",
                attention="full")
    ids = torch.randint(0, tiny.model.config.vocab_size, (260,), generator=torch.Generator().manual_seed(3)).tolist()
    llm = LLM(str(tiny.path), kv_dtype="int8", **opts)
    for version, name in ((1, "old.offload"), (2, "new.offload")):
        monkeypatch.setitem(quant.LAYOUTS, "int8", version)
        s = llm.session()
        s.prefill(ids)
        s.save(tmp_path / name)
        s.close()
    monkeypatch.setitem(quant.LAYOUTS, "int8", 2)
    capsys.readouterr()
    llm.load_session(tmp_path / "new.offload").close()
    assert capsys.readouterr().err == ""
    llm.load_session(tmp_path / "old.offload").close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int8 host KV of layout int8.v1, loaded into int8.v2" in err[0], err
