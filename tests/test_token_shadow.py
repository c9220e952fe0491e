"""The token stage ranked from the shadow index's low-rank keys (token_scores "shadow", issue 13 deliverable 3).

ShadowKV rebuilds the selected chunks' keys from low-rank shadows on the GPU so that only values cross PCIe;
here the shadows only rank the candidate tokens, and the picked tokens' exact K and V rows are attended. At
full rank the estimates are the exact logits, so the stage must pick and attend what the exact-key stage does.
"""
import pytest
import torch

from fixtures_models import TIERED_OPTS, run_session, write_tiny_checkpoint
from offload import LLM, ConfigError, OffloadConfig

HEAD_DIM = 16       # the shared tiny checkpoint's (fixtures_models: tiny, ids, dense)


def _opts(device="cpu", rank=HEAD_DIM, **kw):
    return dict(TIERED_OPTS, device=device, dtype="float32", attention="sparse", budget="24", select_unit="token",
                token_candidates=3, index="shadow", index_options={"rank": rank}, **kw)


def _run(tiny, ids, **opts):
    out, s = run_session(LLM(str(tiny.path), **opts), ids, 250)
    return out, s.stats()


@pytest.mark.parametrize("host", [False, True])
def test_full_rank_shadow_ranking_attends_what_exact_keys_do(tiny, ids, host):
    # host: most chunks in the host tier (read in place), so the picked K rows come from both pools
    extra = dict(gpu_mem="64KiB", host_mem="4MiB") if host else {}
    keys, st_keys = _run(tiny, ids, **_opts(token_scores="keys", **extra))
    shadow, st_shadow = _run(tiny, ids, **_opts(token_scores="shadow", **extra))
    torch.testing.assert_close(shadow, keys, rtol=0, atol=1e-4)
    # the exact stage reads every candidate's keys; the ranked one reads none, only the picked rows
    assert st_keys["scored_key_bytes"] > 0 and st_shadow["scored_key_bytes"] == 0, (st_keys, st_shadow)
    assert st_shadow["token_attended_bytes"] == st_keys["token_attended_bytes"] > 0
    assert (st_shadow["bytes_in_use_host"] > 0) == host, st_shadow


def test_low_rank_ranking_is_an_approximation_of_the_exact_stage(tiny, ids, dense):
    dense, _ = dense
    keys, _ = _run(tiny, ids, **_opts(token_scores="keys", rank=4))
    shadow, st = _run(tiny, ids, **_opts(token_scores="shadow", rank=4))
    assert st["scored_key_bytes"] == 0 and torch.isfinite(shadow).all()
    # lossy: rank 4 of 16 ranks differently from the exact keys, but still attends real K/V rows exactly
    assert not torch.equal(shadow, keys)
    err = lambda x: ((x - dense).norm() / dense.norm()).item()   # noqa: E731
    assert err(shadow) < 0.5, (err(shadow), err(keys))


@pytest.mark.parametrize("bad,msg", [
    (dict(token_scores="low-rank"), "token_scores 'low-rank' is not one of keys, shadow"),
    (dict(token_scores="shadow", select_unit="token", index="summary"), "set select_unit token and index shadow"),
    (dict(token_scores="shadow", index="shadow"), "set select_unit token and index shadow"),
])
def test_bad_token_scores_is_one_line(bad, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        OffloadConfig(**bad)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    # head_dim 64: the shapes the CuPy kernels take (head_dim 16 runs the torch references, whose host-tier reads
    # copy through the host and cannot be captured)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tokshadow64"), "llama", hidden_size=256,
                                 num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.gpu
def test_gpu_shadow_ranked_step_is_one_cuda_graph_equal_to_exact_keys(tiny64, ids):
    opts = _opts(device="cuda", rank=64, gpu_mem="128KiB", host_mem="4MiB")
    keys, _ = _run(tiny64, ids, **dict(opts, token_scores="keys", cuda_graph=False))
    shadow, st = _run(tiny64, ids, **dict(opts, token_scores="shadow"))
    assert st["decode_mode"] == "graph" and "graph_error" not in st, {k: st.get(k) for k in (
        "decode_mode", "graph_captures", "graph_error")}
    assert st["scored_key_bytes"] == 0 and st["bytes_in_use_host"] > 0, st
    torch.testing.assert_close(shadow, keys, rtol=0, atol=1e-3)
