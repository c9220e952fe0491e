"""The ANN index's device mode (`index_options: {search: gpu}`, offload/indexes/ann_gpu.py): chunk scores against a
plain torch reference from the keys, centroids and list ids; recall next to the host (faiss) mode; filing, growth,
capture-safe buffers; no faiss needed; bad options refused in one line."""
from __future__ import annotations

import importlib.util
import math
import sys

import pytest
import torch

from offload.errors import ConfigError
from offload.indexes import check_index_options, chunk_attention_mass, make_index, mass_recall
from offload.indexes.ann_gpu import DeviceANNIndex
from offload.indexes.synthetic import synthetic_layer

HKV, HQ, D, C = 2, 8, 32, 16
G = HQ // HKV
SHAPE = dict(num_kv_heads=HKV, num_q_heads=HQ, head_dim=D, chunk_tokens=C)


def gpu_index(**opts) -> DeviceANNIndex:
    return make_index("ann", search="gpu", **{**SHAPE, **opts})


def reference_scores(index: DeviceANNIndex, keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """From the definition: every key replaced by its list's centroid (first D dims), each query head's softmax
    over all keys, summed per chunk and over the query group -> float64 [Hkv, n]."""
    n_tok = keys.shape[1]
    lists = index._lists[:, :n_tok].long()                                      # lists: [Hkv, N]
    cents = torch.stack([index._cents[h, lists[h], :D] for h in range(HKV)]).double()  # cents: [Hkv, N, D]
    logit = torch.einsum("hgd,hnd->hgn", query.double().reshape(HKV, G, D), cents) * index.scale  # [Hkv, G, N]
    share = torch.softmax(logit, dim=2)                                         # share: [Hkv, G, N]
    return share.reshape(HKV, G, -1, C).sum(dim=(1, 3))                         # [Hkv, n]


@pytest.mark.parametrize("space", ["l2", "l2aug"])
def test_chunk_scores_match_a_torch_reference(space):
    keys, dec, _ = synthetic_layer(1024, HKV, HQ, D, num_queries=3, seed=4)
    index = gpu_index(space=space, min_ivf_tokens=256, max_chunks=80)
    index.build(keys)
    assert index._nl == 1024 // 8                                               # IVF (8 keys a list), not exact
    for i in range(3):
        got = index.chunk_scores(dec[:, i])                                     # got: [Hkv, cap] (log)
        ref = reference_scores(index, keys, dec[:, i])
        assert got.shape == (HKV, 80) and torch.isneginf(got[:, 64:]).all()     # rows past the count: nothing
        torch.testing.assert_close(got[:, :64].double().exp(), ref, rtol=1e-4, atol=1e-6)
        ids = index.select(dec[:, i], 7)
        assert torch.equal(ids, torch.topk(got[:, :64], 7, dim=1).indices)
        lm = index.chunk_log_mass(dec[:, i])                                    # lm: [Hkv, G, cap]
        assert torch.isinf(lm[..., 64:]).all() and torch.isfinite(lm[..., :64]).all()


def test_centroids_are_cell_means_and_every_key_sits_in_its_nearest_list():
    keys, _, _ = synthetic_layer(2048, HKV, HQ, D, num_queries=1, seed=5)
    index = gpu_index(min_ivf_tokens=256)
    index.build(keys[:, :1536])
    index.extend(keys[:, 1536:])                                                # filed, no retraining
    nl = index._nl
    for h in range(HKV):
        cents = index._cents[h, :nl]                                            # cents: [nl, D]
        dist = torch.cdist(keys[h].double(), cents.double())                   # dist: [N, nl]
        lists = index._lists[h, :2048].long()
        near = dist.gather(1, lists[:, None])[:, 0]
        assert (near <= dist.min(dim=1).values + 1e-4).all()
        built = lists[:1536]                                                     # k-means's last assignment
        used = torch.unique(built)
        means = torch.stack([keys[h, :1536][built == c].mean(0) for c in used.tolist()])
        # Lloyd's on a sample: a centroid is the mean of its sample cell, close to (not equal to) the full cell's
        assert (means - cents[used]).norm(dim=1).mean() < 0.5 * keys[h].std(0).norm()


def test_exact_below_min_ivf_tokens_and_lists_trained_once_extend_crosses_it():
    keys, *_ = synthetic_layer(1024, HKV, HQ, D, num_queries=1, seed=6)
    query = torch.randn(HQ, D, generator=torch.Generator().manual_seed(0)) * 2
    index = gpu_index(min_ivf_tokens=512)
    index.build(keys[:, :256])
    assert index._nl == 0                                                       # every key its own centroid
    mass = chunk_attention_mass(query, keys[:, :256], C)                        # mass: [Hkv, 16]
    torch.testing.assert_close(index.chunk_scores(query)[:, :16].double().exp(), mass.double(), rtol=1e-4, atol=1e-6)
    assert index.select(query, 5).tolist() == torch.topk(mass, 5, dim=1).indices.tolist()
    for a in range(256, 1024, 4 * C):
        index.extend(keys[:, a:a + 4 * C])
    assert index._nl == 512 // 8 and index.num_chunks == 64
    torch.testing.assert_close(index.chunk_scores(query)[:, :64].double().exp(), reference_scores(index, keys, query),
                               rtol=1e-4, atol=1e-6)


def test_buffers_keep_their_address_while_appending_up_to_max_chunks():
    """A captured decode step reads the buffers by address: reserved rows mean no regrowth and an unchanged key."""
    keys, *_ = synthetic_layer(1280, HKV, HQ, D, num_queries=1, seed=7)
    index = gpu_index(min_ivf_tokens=256, max_chunks=80)
    index.build(keys[:, :640])
    index.reserve(80)
    key, ptrs = index.graph_key(), (index._cents.data_ptr(), index._lists.data_ptr())
    for a in range(640, 1280, C):
        index.extend(keys[:, a:a + C])
    assert index.graph_key() == key and (index._cents.data_ptr(), index._lists.data_ptr()) == ptrs
    assert index.num_chunks == 80 and int(index._count) == 80
    assert index.nbytes["gpu"] == index.gpu_bytes(80) - index.scratch_bytes()


def test_grows_without_max_chunks():
    keys, *_ = synthetic_layer(1024, HKV, HQ, D, num_queries=1, seed=8)
    query = torch.randn(HQ, D, generator=torch.Generator().manual_seed(1))
    index, whole = gpu_index(min_ivf_tokens=128), gpu_index(min_ivf_tokens=128)
    index.build(keys[:, :0])
    for a in range(0, 1024, C):
        index.extend(keys[:, a:a + C])
    whole.build(keys[:, :128])
    whole.extend(keys[:, 128:])
    # both train their lists when they reach 128 keys, on the same keys: the same lists and the same scores
    assert index._lists.shape[1] >= 1024 and index.num_chunks == whole.num_chunks == 64
    assert torch.equal(index._lists[:, :1024].long(), whole._lists[:, :1024].long())
    torch.testing.assert_close(index.chunk_scores(query)[:, :64], whole.chunk_scores(query)[:, :64])


def test_recall_next_to_the_host_mode_and_the_summary_index():
    """Synthetic topic keys (bench/index_recall.py's data), 4K tokens, Llama head shapes: the device estimate at
    centroid resolution against faiss's exact scan of the probed lists and the summary bounds."""
    keys, dec, _ = synthetic_layer(4096, 4, 16, 128, num_queries=4, seed=2)
    shape = dict(num_kv_heads=4, num_q_heads=16, head_dim=128, chunk_tokens=32)
    masses = [chunk_attention_mass(dec[:, i], keys, 32) for i in range(4)]

    def recall(method, **opts):
        index = make_index(method, **shape, **opts)
        index.build(keys)
        out = {}
        for frac in (0.05, 0.10):
            k = math.ceil(frac * index.num_chunks)
            out[frac] = float(torch.stack([mass_recall(m, index.select(dec[:, i], k))
                                           for i, m in enumerate(masses)]).mean())
        return out

    gpu, summary = recall("ann", search="gpu"), recall("summary")
    # measured at 5% / 10%: 0.962 / 0.990 (gpu), 0.818 / 0.901 (summary), 0.987 / 0.984 (host faiss, below);
    # floors ~0.05 under
    assert gpu[0.05] >= 0.90 and gpu[0.10] >= 0.93
    assert gpu[0.05] > summary[0.05] + 0.08 and gpu[0.10] > summary[0.10] + 0.05
    if importlib.util.find_spec("faiss") is not None:
        host = recall("ann", background=False)
        assert gpu[0.10] >= host[0.10] - 0.03           # at 10% the two agree; at 5% the host's exact scan leads
        assert gpu[0.05] >= host[0.05] - 0.06


def test_gpu_mode_needs_no_faiss(monkeypatch):
    for name in [m for m in sys.modules if m in ("offload.indexes.ann", "offload.indexes.ann_search")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "faiss", None)                             # import faiss -> ImportError
    index = make_index("ann", search="gpu", **SHAPE)
    index.build(torch.randn(HKV, 4 * C, D))
    assert index.select(torch.randn(HQ, D), 2).shape == (HKV, 2)
    with pytest.raises(ConfigError, match="pip install 'offload\\[ann\\]'"):   # the host mode still says how
        make_index("ann", **SHAPE)


@pytest.mark.parametrize("options, words", [
    ({"search": "cuda"}, ["search='cuda'", "'host', 'gpu'"]),
    ({"search": 1}, ["search=1", "'host', 'gpu'"]),
    ({"search": "gpu", "codec": "sq8"}, ["no option(s) codec"]),               # a host-mode option
    ({"search": "gpu", "space": "ip"}, ["space='ip'"]),
    ({"search": "gpu", "nlist": 1}, ["nlist=1"]),
    ({"search": "gpu", "nlist": "many"}, ["nlist='many'", "whole number"]),
])
def test_bad_options_are_one_line_config_errors(options, words):
    with pytest.raises(ConfigError) as err:
        check_index_options("ann", options)
        make_index("ann", **SHAPE, **options)
    text = str(err.value)
    assert "\n" not in text and all(w in text for w in words), text


def test_config_refuses_a_bad_search_before_any_weights_load():
    from offload.config import OffloadConfig
    with pytest.raises(ConfigError, match="search='fast'"):
        OffloadConfig(attention="sparse", index="ann", index_options={"search": "fast"})
    OffloadConfig(attention="sparse", index="ann", index_options={"search": "gpu", "nlist": 64})


# ---- on the GPU ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_select_matches_the_cpu_and_replays_in_a_cuda_graph():
    keys, dec, _ = synthetic_layer(8192, 8, 32, 128, num_queries=3, seed=9)
    shape = dict(num_kv_heads=8, num_q_heads=32, head_dim=128, chunk_tokens=32, max_chunks=300)
    cpu = make_index("ann", search="gpu", **shape)
    dev = make_index("ann", search="gpu", device="cuda", dtype=torch.bfloat16, **shape)
    cpu.build(keys[:, :8192 - 1024])
    dev.build(keys[:, :8192 - 1024].cuda().bfloat16())
    dev._cents.copy_(cpu._cents)                          # the same lists (k-means on two devices may differ)
    dev._lists.copy_(cpu._lists)
    q = dec[:, 0].cuda()
    got, ref = dev.chunk_scores(q).cpu(), cpu.chunk_scores(dec[:, 0])           # logs, -inf past the count
    torch.testing.assert_close(got[:, :224].exp(), ref[:, :224].exp(), rtol=1e-3, atol=1e-7)
    assert torch.isneginf(got[:, 224:]).all()
    # captured once, replayed after appends: the device-side count and the same buffers
    static_q = q.clone()
    dev.select(static_q, 64)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids = dev.select(static_q, 64)                                           # ids: [Hkv, 64]
    key = dev.graph_key()
    for a in range(8192 - 1024, 8192, 32 * 8):
        dev.extend(keys[:, a:a + 256].cuda().bfloat16())
        cpu.extend(keys[:, a:a + 256])
    assert dev.graph_key() == key
    dev._lists.copy_(cpu._lists)                          # filing on two devices: ties could differ
    for i in range(3):
        static_q.copy_(dec[:, i].cuda())
        graph.replay()
        ref = torch.topk(cpu.chunk_scores(dec[:, i])[:, :256], 64, dim=1)
        got = cpu.chunk_scores(dec[:, i])[:, :256].gather(1, ids.cpu())
        torch.testing.assert_close(got, ref.values, rtol=1e-3, atol=1e-6)      # the same mass, best first
