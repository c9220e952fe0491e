"""bench/synthetic_fill.py: a session filled to N tokens without a prefill holds KV with the model's own statistics."""
import sys
from pathlib import Path

import pytest
import torch

from fixtures_models import write_tiny_checkpoint
from offload import LLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from synthetic_fill import fill  # noqa: E402

OPTS = dict(device="cpu", ctx=512, chunk_tokens=8, sink_tokens=16, window_tokens=32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("fill"), "llama", num_key_value_heads=2)


def test_layer0_kv_equals_the_models_kv_of_the_copied_tokens(tiny):
    """Layer 0's K and V depend on the token and (K, through RoPE) its position only, so with no noise the
    filled KV must be what a real prefill of the copied tokens computes, at every position."""
    sess = LLM(str(tiny.path), attention="sparse", budget="25%", **OPTS).session()
    fill(sess, 480, sample=128, noise=0.0, seed=1)
    assert sess.length == 480 and sess.attn.n_chunks == 60 and len(sess.tokens) == 480
    dense = LLM(str(tiny.path), attention="full", **OPTS).session()
    dense.prefill(sess.tokens)
    k, v = sess.attn.read_kv(0)                                        # [Hkv, 480, D] each
    dk, dv = dense.attn.read_kv(0)
    torch.testing.assert_close(k, dk, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v, dv, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(sess.step(3)).all() and sess.length == 481    # decode continues from the fill


def test_noise_makes_copied_runs_distinct_and_keeps_scale(tiny):
    sess = LLM(str(tiny.path), attention="sparse", budget="25%", **OPTS).session()
    fill(sess, 448, sample=128, noise=0.1, seed=2)
    k, _ = sess.attn.read_kv(1)                                        # k: [Hkv, 448, D]
    sample, copies = k[:, :128].float(), k[:, 128:].float()
    rows = copies.reshape(-1, copies.shape[-1])                        # rows: [Hkv * 320, D]
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]          # copied runs are not repeats
    # norms of filled keys stay within 20 % of the real ones (noise is 0.1 of each channel's spread)
    ratio = float(copies.norm(dim=-1).mean() / sample.norm(dim=-1).mean())
    assert 0.8 < ratio < 1.2
