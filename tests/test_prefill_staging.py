"""Prefill staging (engine/staging.py): a bounded window of one layer on the device, older history streamed from
the store, must give exact prefill; and the store's bulk device read must return what was put, from every tier."""
from __future__ import annotations

import pytest
import torch

from fixtures_models import TIERED_OPTS, run_session
from offload import LLM
from offload.tiers.base import from_chunks
from test_tiers import bit_equal
from test_tiers_store import DEVICE, LAYERS, POLICIES, fill, make_store


@pytest.mark.parametrize("transport", ["uva", "copy"])
@pytest.mark.parametrize("kv_dtype", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("policy", POLICIES)
def test_read_device_returns_what_read_returns_from_every_tier(tmp_path, policy, kv_dtype, transport):
    """Host chunks reach the device by a UVA gather or by DMA of their slot runs (CUDA); both equal `read`."""
    dtype = torch.bfloat16
    with make_store(tmp_path, policy, dtype, kv_dtype=kv_dtype) as store:
        store.stream_copy = transport == "copy"
        fill(store, dtype)
        st = store.stats()
        assert st["bytes_in_use_gpu"] and st["bytes_in_use_host"] and st["bytes_in_use_disk"]
        exact = kv_dtype == "bf16" or DEVICE == "cpu"      # a CUDA dequantize may round differently
        for layer in range(LAYERS):
            for i in range(19):                            # one chunk at a time: order is the chunk's own
                k, v = store.read_device(layer, [i])       # k, v: [Hkv, C, D]
                rk, rv = from_chunks(store.read(layer, [i]))
                assert k.device.type == DEVICE and k.dtype == dtype
                if exact:
                    assert bit_equal(k.cpu(), rk) and bit_equal(v.cpu(), rv)
                else:
                    torch.testing.assert_close(k.cpu(), rk, rtol=1e-2, atol=1e-2)
            # all chunks at once come grouped by tier (GPU, host, disk), each group in id order
            ids = torch.arange(19)
            tiers, _ = store._lookup(layer, ids)
            order = ids[torch.sort(tiers.long(), stable=True).indices]              # order: [19]
            k, v = store.read_device(layer, ids)                                    # k, v: [Hkv, 19*C, D]
            rk, rv = from_chunks(store.read(layer, order))
            _same(k, rk, exact)
            _same(v, rv, exact)
            k, v = store.read_device(layer, ids, ordered=True)                      # in id order
            rk, rv = from_chunks(store.read(layer, ids))
            _same(k, rk, exact)
            _same(v, rv, exact)
        # on CUDA the packed host chunks went by DMA exactly when asked to (the CPU has no transport to pick)
        dma = store.stats().get("h2d_stream_bytes", 0)
        assert (dma > 0) == (DEVICE == "cuda" and transport == "copy" and kv_dtype != "bf16")


def _same(got: torch.Tensor, ref: torch.Tensor, exact: bool) -> None:
    if exact:
        assert bit_equal(got.cpu(), ref)
    else:
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("spill,stream_chunk,device", [(False, 16, "cpu"), (True, 16, "cpu"), (False, 32, "cpu"),
                                                        pytest.param(False, 32, "cuda", marks=pytest.mark.gpu)])
def test_streamed_prefill_with_a_small_window_is_exact(tiny, ids, dense, tmp_path, monkeypatch, spill, stream_chunk,
                                                       device):
    """A window far smaller than the context: history streams in blocks, the window slides, chunks reach the
    store mid-layer; prefill (in two calls, so the second has stored history) and decode stay exact. On CUDA a
    call that streams runs in forward chunks of stream_chunk tokens (the CPU keeps prefill_chunk)."""
    import offload.backends
    from offload.engine.staging import PrefillStage
    Hkv, D = 2, tiny.model.config.hidden_size // tiny.model.config.num_attention_heads
    window = 64                                            # tokens; the prompt is 250
    monkeypatch.setattr(offload.backends, "prefill_stage_bytes", lambda p: window * 2 * Hkv * D * 4)
    peaks, streamed = [], []
    real_open = PrefillStage.open

    sizes = []
    real_attend = PrefillStage.attend

    def open_(self, *a, **kw):
        real_open(self, *a, **kw)
        peaks.append(self.k.shape[1])

    def attend_(self, q, *a, **kw):
        sizes.append(q.shape[1])
        return real_attend(self, q, *a, **kw)
    monkeypatch.setattr(PrefillStage, "open", open_)
    monkeypatch.setattr(PrefillStage, "attend", attend_)
    if device == "cuda":   # hidden states through pinned host memory (embedded in slices) and the copy stream
        import offload.engine.runner as runner
        monkeypatch.setattr(runner, "HOST_HIDDEN_BYTES", 16 * tiny.model.config.hidden_size * 4)
    tiers = (dict(gpu_mem="60KiB", host_mem="30KiB", disk_mem="4MiB", disk_dir=str(tmp_path / "kv")) if spill
             else dict(gpu_mem="60KiB", host_mem="4MiB"))
    llm = LLM(str(tiny.path), attention="full", prefill_chunk=16, stream_chunk=stream_chunk, **tiers,
              **{**TIERED_OPTS, "device": device, "dtype": "float32"})
    tol = 1e-5 if device == "cpu" else 2e-4                # CUDA float32 attention rounds differently from the CPU
    s = llm.session()
    out = [s.prefill(ids[:120])[None]]
    sizes.clear()
    out.append(s.prefill(ids[120:250])[None])
    assert max(sizes) == (stream_chunk if device == "cuda" else 16), sizes
    streamed.append(s.attn.staging.streamed_tokens)
    out += [s.step(t)[None] for t in ids[250:]]
    got = torch.cat(out)
    got = got.cpu()
    torch.testing.assert_close(got[1], dense[0][0], rtol=0, atol=tol)   # last prompt position, after stage 2
    torch.testing.assert_close(got[2:], dense[0][1:], rtol=0, atol=tol)  # decode over what staging stored
    assert max(peaks) <= window < 250                      # the window never held the whole layer
    assert streamed[0] > 0                                 # and older history was streamed
    for layer in range(llm.model_config.num_layers):       # every token reached the store exactly
        for a, b in zip(s.attn.read_kv(layer), dense[1].attn.read_kv(layer)):
            torch.testing.assert_close(a.cpu(), b.cpu(), rtol=0, atol=tol)
    s.close()


def test_sparse_prefill_over_a_streamed_history_keeps_every_block_at_threshold_one(tiny, ids, dense, monkeypatch):
    """prefill='sparse' applies block selection inside the window; with threshold 1.0 (every block) it must equal
    exact prefill while older history streams."""
    import functools

    import offload.backends
    import offload.engine.sparse_prefill as sp
    D = tiny.model.config.hidden_size // tiny.model.config.num_attention_heads
    monkeypatch.setattr(offload.backends, "prefill_stage_bytes", lambda p: 64 * 2 * 2 * D * 4)
    monkeypatch.setattr(sp, "SparsePrefill", functools.partial(sp.SparsePrefill, threshold=1.0, block=8, stride=4,
                                                               local_blocks=1))
    llm = LLM(str(tiny.path), attention="full", prefill="sparse", prefill_chunk=16, stream_chunk=16, gpu_mem="60KiB",
              host_mem="4MiB", **TIERED_OPTS)
    got, s = run_session(llm, ids, 250)
    assert s.attn.staging.streamed_tokens > 0 and s.stats()["sparse_prefill_chunks"] > 0
    torch.testing.assert_close(got, dense[0], rtol=0, atol=1e-5)
    s.close()


@pytest.mark.parametrize("stream_tokens", [4096, 8])
def test_sparse_prefill_picks_streamed_history_through_the_decode_index(tiny, ids, dense, monkeypatch, stream_tokens):
    """Past the window, sparse prefill attends only the chunks the layer's index picks for each query block (plus
    sinks). A pick that covers every chunk equals exact prefill; a small one reads a fraction and stays close."""
    import functools

    import offload.backends
    import offload.engine.sparse_prefill as sp
    D = tiny.model.config.hidden_size // tiny.model.config.num_attention_heads
    monkeypatch.setattr(offload.backends, "prefill_stage_bytes", lambda p: 64 * 2 * 2 * D * 4)
    monkeypatch.setattr(sp, "SparsePrefill", functools.partial(sp.SparsePrefill, threshold=1.0, block=8, stride=4,
                                                               local_blocks=1, stream_tokens=stream_tokens))
    llm = LLM(str(tiny.path), attention="sparse", budget="4096", prefill="sparse", prefill_chunk=16,
              stream_chunk=16, gpu_mem="60KiB", host_mem="4MiB", **TIERED_OPTS)
    s = llm.session()
    got = s.prefill(ids[:250])
    st = s.stats()
    assert s.attn.staging.streamed_tokens > 0
    if stream_tokens >= 250:
        assert st["sparse_prefill_streamed_density"] == 1.0
        torch.testing.assert_close(got, dense[0][0], rtol=0, atol=1e-5)
    else:
        assert st["sparse_prefill_streamed_density"] < 0.8     # a fraction of the streamed chunks is read
        assert torch.isfinite(got).all()
        rel = (got - dense[0][0]).norm() / dense[0][0].norm()
        assert 0 < float(rel) < 0.5                             # lossy, not garbage (random tiny model)
    s.close()
