"""The ANN index's decode search path (issue 13: 832 ms/token at 128K): parallel faiss search, best_first, and the
scores against exact references (every list probed and every token retrieved = exact attention mass)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from offload.indexes import chunk_attention_mass, make_index, mass_recall
from offload.indexes.adaptive import true_chunk_log_mass
from offload.indexes.synthetic import synthetic_layer

pytest.importorskip("faiss")
from offload.indexes.ann_search import best_first  # noqa: E402

HKV, HQ, D, C = 2, 8, 64, 32
SHAPE = dict(num_kv_heads=HKV, num_q_heads=HQ, head_dim=D, chunk_tokens=C, background=False)


def lexsort_reference(score: np.ndarray, k: int) -> np.ndarray:
    """The order select promises: score descending, ties newest (largest column) first."""
    n = score.shape[1]
    return np.lexsort((np.broadcast_to(-np.arange(n), score.shape), -score), axis=1)[:, :min(k, n)]


@pytest.mark.parametrize("kind", ["dense", "integer ties", "sparse", "all zero"])
def test_best_first_equals_a_full_lexsort(kind):
    rng = np.random.default_rng(3)
    for _ in range(200):
        h, n = int(rng.integers(1, 6)), int(rng.integers(1, 200))
        k = int(rng.integers(1, n + 3))
        score = {"dense": lambda: np.abs(rng.standard_normal((h, n))),
                 "integer ties": lambda: rng.integers(0, 4, (h, n)).astype(np.float64),
                 "sparse": lambda: np.where(rng.random((h, n)) < 0.1, rng.random((h, n)), 0.0),
                 "all zero": lambda: np.zeros((h, n))}[kind]()
        got = best_first(score, k)
        assert got.dtype == np.int64 and np.array_equal(got, lexsort_reference(score, k)), (h, n, k)


@pytest.fixture(scope="module")
def layer():
    keys, decode, _ = synthetic_layer(8192, HKV, HQ, D, num_queries=4, seed=11)   # keys: [Hkv, N, D]
    return keys, decode


def test_parallel_search_returns_what_the_serial_search_does(layer):
    """parallel_mode 3 over 2 threads (the decode default) against faiss's serial mode 0 on one thread: the same
    ids and the same mass estimates (the heap holds the same tokens whatever the order the lists are scanned in)."""
    keys, decode = layer
    index = make_index("ann", min_ivf_tokens=256, threads=2, **SHAPE)
    index.build(keys)
    assert index._ivf.parallel_mode == 3
    parallel = [(index.select(decode[:, i], 20), index.chunk_log_mass(decode[:, i], 12)) for i in range(4)]
    index._ivf.parallel_mode, index.search_threads = 0, 1
    for i, (ids, lm) in enumerate(parallel):
        assert torch.equal(ids, index.select(decode[:, i], 20))
        assert torch.equal(lm, index.chunk_log_mass(decode[:, i], 12))


@pytest.mark.parametrize("space", ["l2aug", "ip"])
def test_every_list_probed_and_every_token_retrieved_is_exact_mass(layer, space):
    """probe_fraction=1 and a retrieve_factor that covers every token: the expsum votes are the chunks' exact
    attention mass, so select must pick chunks worth the best chunks' mass, and chunk_log_mass must equal each
    chunk's exact logsumexp (the IVF path end to end: coarse step, faiss scan, votes, best_first)."""
    keys, decode = layer
    n = keys.shape[1] // C
    index = make_index("ann", min_ivf_tokens=256, probe_fraction=1.0, retrieve_factor=n, space=space, **SHAPE)
    index.build(keys)
    assert index._ivf is not None
    for i in range(decode.shape[1]):
        q = decode[:, i]                                                       # q: [Hq, D]
        mass = chunk_attention_mass(q, keys, C)                                # mass: [Hkv, n]
        ids = index.select(q, 24)                                              # ids: [Hkv, 24]
        assert mass_recall(mass, ids).min() > 1 - 1e-6
        want = true_chunk_log_mass(q, keys, C, 1 / math.sqrt(D))               # want: [Hkv, G, n]
        torch.testing.assert_close(index.chunk_log_mass(q, 4 * n), want, atol=2e-3, rtol=1e-4)


def test_search_threads_option_is_validated():
    from offload.errors import ConfigError
    with pytest.raises(ConfigError, match="search_threads"):
        make_index("ann", search_threads=-1, **SHAPE)


@pytest.mark.parametrize("space", ["l2aug", "ip"])
def test_probes_are_each_query_heads_nearest_lists_of_its_own_kv_head_nearest_first(layer, space):
    """The coarse step against a brute-force reference: per query head, the probe lists of its own KV head whose
    centroids are nearest in the search space (L2 to [q, 0] for l2aug, largest inner product for ip), in order."""
    keys, decode = layer
    index = make_index("ann", min_ivf_tokens=256, space=space, probe_fraction=0.1, **SHAPE)
    index.build(keys)
    cents = torch.from_numpy(index._centroids).double()                       # cents: [Hkv, nlist, D']
    nlist = cents.shape[1]
    for i in range(decode.shape[1]):
        q = decode[:, i].double().reshape(HKV, HQ // HKV, D)                   # q: [Hkv, G, D]
        lists, _ = index._probe(index._host_query(decode[:, i]))              # lists: [Hq, probe]
        probe = lists.shape[1]
        assert probe == math.ceil(0.1 * nlist)
        if space == "l2aug":
            qx = torch.cat([q, torch.zeros(*q.shape[:2], 1, dtype=q.dtype)], dim=2)  # qx: [Hkv, G, D+1]
            key = torch.cdist(qx, cents)                                       # key: [Hkv, G, nlist], smaller first
        else:
            key = -torch.einsum("hgd,hld->hgl", q, cents)
        own = torch.from_numpy(lists).reshape(HKV, HQ // HKV, probe) - (torch.arange(HKV) * nlist)[:, None, None]
        assert bool(((own >= 0) & (own < nlist)).all())                       # only its own KV head's lists
        got = key.gather(2, own)                                               # got: [Hkv, G, probe] in our order
        tol = 1e-4 * key.abs().amax()
        assert bool((got.diff(dim=2) >= -tol).all())                           # nearest first
        ranked = key.sort(dim=2).values                                        # ranked: [Hkv, G, nlist]
        assert bool((got[..., -1] <= ranked[..., probe - 1] + tol).all())      # and they are the nearest ones
        assert torch.allclose(got.sort(dim=2).values, ranked[..., :probe], atol=float(tol))


@pytest.mark.parametrize("space", ["l2aug", "ip"])
def test_torch_probe_picks_the_lists_the_numpy_probe_does_in_the_same_order(layer, space):
    """The coarse step a GPU select runs where the query is (_probe_torch) against the host's numpy _probe, here
    both on the CPU: the same lists per query head, nearest first, and the same coarse distances."""
    keys, decode = layer
    index = make_index("ann", min_ivf_tokens=256, space=space, probe_fraction=0.1, **SHAPE)
    index.build(keys)
    for i in range(decode.shape[1]):
        want_lists, want_dis = index._probe(index._host_query(decode[:, i]))   # [Hq, probe] each
        lists, dis = index._probe_torch(decode[:, i])
        assert np.array_equal(lists.numpy(), want_lists)
        np.testing.assert_allclose(dis.numpy(), want_dis, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("space", ["l2aug", "ip"])
def test_gpu_select_returns_the_ids_of_the_host_select(layer, space):
    """A select whose query is on the GPU (probe on the GPU, faiss on the host, ids back through a pinned buffer)
    returns the ids the same index gives the query on the host (numpy probe), step after step (buffers reused)."""
    keys, decode = layer
    index = make_index("ann", min_ivf_tokens=256, space=space, device="cuda", **SHAPE)
    index.build(keys)                                  # host keys: the lists from the same k-means as on the CPU
    for _ in range(2):
        for i in range(decode.shape[1]):
            got = index.select(decode[:, i].cuda(), 20)
            assert got.is_cuda and torch.equal(got, index.select(decode[:, i], 20))


@pytest.mark.parametrize("chunk_score", ["expsum", "count"])
def test_torch_ranking_returns_the_ids_of_votes_and_best_first(layer, chunk_score):
    """The votes + ranking a GPU select runs (_rank_torch), here on the CPU, against _chunk_votes + best_first on
    the same retrieved tokens: the same ids, also with -1 padding (fewer tokens found than asked) and with k past
    the voted chunks (the unvoted ones follow newest first)."""
    keys, decode = layer
    index = make_index("ann", min_ivf_tokens=256, chunk_score=chunk_score, **SHAPE)
    index.build(keys)
    for i in range(decode.shape[1]):
        ip, tok = index._search(index._host_query(decode[:, i]), index._tokens_for(20))  # [Hkv, G, k_tok] each
        tok = tok.copy()
        tok[:, 1, -50:] = -1                                                   # one query head found fewer tokens
        for k in (20, index.num_chunks):
            want = best_first(index._chunk_votes(ip, tok), k)
            got = index._rank_torch(torch.from_numpy(ip), torch.from_numpy(tok), k)
            assert np.array_equal(got.numpy(), want), (i, k)
