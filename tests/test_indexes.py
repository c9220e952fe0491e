"""Chunk indexes: one contract for every implementation, exact references, recall, config errors."""
from __future__ import annotations

import math

import pytest
import torch

from offload.errors import ConfigError
from offload.indexes import Budget, ChunkIndex, chunk_attention_mass, make_index, mass_recall
from offload.indexes.summary import dequantize_bounds, quantize_bounds
from offload.indexes.synthetic import synthetic_layer

HKV, HQ, D, C = 2, 8, 32, 16
G = HQ // HKV

# every implementation and its notable option sets; min_ivf_tokens=256 makes the small tests use IVF
CONFIGS = {
    "summary": ("summary", {}),
    "summary-sum-int8": ("summary", {"group_reduce": "sum", "bounds": "int8"}),
    "summary-2level": ("summary", {"coarse_group": 4}),
    "summary-2level-int8": ("summary", {"coarse_group": 4, "bounds": "int8", "host_bounds": "int8"}),
    "shadow": ("shadow", {"rank": 8, "fine_reduce": "max"}),
    "shadow-mass-summary-host": ("shadow", {"rank": 8, "fine_reduce": "mass", "coarse": "summary",
                                            "shadows_on": "host",
                                            "summary_options": {"bounds": "int8", "coarse_group": 4}}),
    "ann": ("ann", {"min_ivf_tokens": 256}),
    "ann-ip-queries": ("ann", {"space": "ip", "train_on": "queries", "min_ivf_tokens": 256}),
    "ann-sq8-count": ("ann", {"codec": "sq8", "chunk_score": "count", "min_ivf_tokens": 256}),
    "ann-gpu": ("ann", {"search": "gpu", "min_ivf_tokens": 256}),
    "ann-gpu-l2aug": ("ann", {"search": "gpu", "space": "l2aug", "min_ivf_tokens": 256}),
}


def new_index(name: str, hkv=HKV, hq=HQ, d=D, c=C, **extra):
    method, opts = CONFIGS[name]
    return make_index(method, num_kv_heads=hkv, num_q_heads=hq, head_dim=d, chunk_tokens=c,
                      **{**opts, **extra})


def planted_layer(num_chunks=64, plant=3, seed=0):
    """Random keys, except `plant` chunks per KV head whose keys point along that head's query group."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(HKV, num_chunks * C, D, generator=gen)                 # keys: [Hkv, N, D]
    u = torch.nn.functional.normalize(torch.randn(HKV, D, generator=gen), dim=-1)  # u: [Hkv, D]
    query = (6 * u.repeat_interleave(G, dim=0) + 0.3 * torch.randn(HQ, D, generator=gen))  # query: [Hq, D]
    prefill = 6 * u.repeat_interleave(G, 0)[:, None] + torch.randn(HQ, 64, D, generator=gen)  # [Hq, 64, D]
    planted = [torch.randperm(num_chunks, generator=gen)[:plant].tolist() for _ in range(HKV)]
    for h, ids in enumerate(planted):
        for c in ids:
            keys[h, c * C:(c + 1) * C] = 10 * u[h] + 0.3 * torch.randn(C, D, generator=gen)
    return keys, query, prefill, planted, u


def check_ids(ids: torch.Tensor, budget: int, num_chunks: int) -> None:
    """The shape/range/uniqueness contract of select()."""
    assert ids.dtype == torch.int64
    assert tuple(ids.shape) == (HKV, min(budget, num_chunks))
    assert ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < num_chunks)
    for row in ids.tolist():
        assert len(set(row)) == len(row)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_index_contract(name):
    keys, query, prefill, planted, u = planted_layer()
    index = new_index(name)
    assert isinstance(index, ChunkIndex)

    # empty index, then a single chunk
    index.build(keys[:, :0], prefill if "queries" in name else None)
    assert index.num_chunks == 0
    check_ids(index.select(query, 4), 4, 0)
    index.extend(keys[:, :C])
    assert index.num_chunks == 1
    assert index.select(query, 5).tolist() == [[0]] * HKV

    # planted chunks are recalled at a budget of exactly their number
    index.build(keys, prefill)
    assert index.num_chunks == 64
    ids = index.select(query, 3)
    check_ids(ids, 3, 64)
    assert [sorted(row) for row in ids.tolist()] == [sorted(p) for p in planted]
    for budget in (1, 7, 20):
        check_ids(index.select(query, budget), budget, 64)

    # extend: a new planted chunk (id 65) is selectable next to the old ones
    gen = torch.Generator().manual_seed(1)
    extra = torch.randn(HKV, 2 * C, D, generator=gen)                          # extra: [Hkv, 2C, D]
    extra[:, C:] = 10 * u[:, None] + 0.3 * torch.randn(HKV, C, D, generator=gen)
    index.extend(extra)
    assert index.num_chunks == 66
    ids = index.select(query, 4)
    assert [sorted(row) for row in ids.tolist()] == [sorted(p + [65]) for p in planted]

    # budget >= num_chunks selects every chunk exactly once
    for budget in (66, 1000):
        ids = index.select(query, budget)
        check_ids(ids, budget, 66)
        assert all(sorted(row) == list(range(66)) for row in ids.tolist())

    sizes = index.nbytes
    assert set(sizes) == {"gpu", "host"} and sum(sizes.values()) > 0


# ---- exact references --------------------------------------------------------------------------
def quest_reference(query, keys, reduce):
    """Quest bound per chunk from the definition, then the group reduce -> [Hkv, n]."""
    ch = keys.reshape(HKV, -1, C, D)
    lo, hi = ch.amin(dim=2), ch.amax(dim=2)                                   # lo, hi: [Hkv, n, D]
    qg = query.reshape(HKV, G, 1, D)                                          # qg: [Hkv, G, 1, D]
    bound = torch.maximum(qg * lo[:, None], qg * hi[:, None]).sum(-1)         # bound: [Hkv, G, n]
    return bound.amax(1) if reduce == "max" else bound.sum(1)


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_summary_matches_exact_quest_topk(reduce):
    keys, query, *_ = planted_layer(seed=3)
    torch.manual_seed(0)
    query = torch.randn(HQ, D)                                                # unplanted: a real ranking
    ref = torch.topk(quest_reference(query, keys, reduce), 10, dim=1).indices
    one = new_index("summary", group_reduce=reduce)
    one.build(keys)
    # two levels whose candidates cover every chunk must give the same answer as one level
    two = new_index("summary-2level", group_reduce=reduce, candidate_factor=100.0)
    two.build(keys)
    for index in (one, two):
        got = index.select(query, 10)
        assert [sorted(r) for r in got.tolist()] == [sorted(r) for r in ref.tolist()]


def test_int8_bounds_round_outward():
    torch.manual_seed(0)
    x = torch.randn(HKV, 50, C, D) * torch.logspace(-3, 2, 50)[None, :, None, None]  # x: [Hkv, n, C, D]
    lo, hi = x.amin(2), x.amax(2)
    qmin, qmax, scale = quantize_bounds(lo, hi)
    dlo, dhi = dequantize_bounds(qmin, qmax, scale)
    assert bool((dlo <= lo).all()) and bool((dhi >= hi).all())
    assert bool(((lo - dlo) <= 2 * scale[..., None]).all()) and bool(((dhi - hi) <= 2 * scale[..., None]).all())


def test_shadow_full_rank_matches_exact_token_max():
    keys, *_ = planted_layer(seed=4)
    query = torch.randn(HQ, D, generator=torch.Generator().manual_seed(2))
    index = make_index("shadow", num_kv_heads=HKV, num_q_heads=HQ, head_dim=D, chunk_tokens=C,
                       rank=D, candidate_factor=100.0, fine_reduce="max")
    index.build(keys)
    s = torch.einsum("hgd,hnd->hgn", query.reshape(HKV, G, D), keys)          # s: [Hkv, G, N]
    ref = torch.topk(s.reshape(HKV, G, -1, C).amax(3).amax(1), 8, dim=1).indices
    got = index.select(query, 8)
    assert [sorted(r) for r in got.tolist()] == [sorted(r) for r in ref.tolist()]


def test_ann_exhaustive_matches_exact_mass_topk():
    keys, *_ = planted_layer(seed=5)
    query = torch.randn(HQ, D, generator=torch.Generator().manual_seed(3)) * 2
    index = make_index("ann", num_kv_heads=HKV, num_q_heads=HQ, head_dim=D, chunk_tokens=C,
                       min_ivf_tokens=10**9, retrieve_factor=1000.0, chunk_score="expsum")
    index.build(keys)
    ref = torch.topk(chunk_attention_mass(query, keys, C), 8, dim=1).indices
    got = index.select(query, 8)
    assert [sorted(r) for r in got.tolist()] == [sorted(r) for r in ref.tolist()]


# ---- recall of attention mass on synthetic data ------------------------------------------------
# Layer with topic segments (offload.indexes.synthetic): 2048 tokens, 128 chunks, budget 10% = 13.
# Random selection recalls 0.15-0.21 of the best chunks' mass here (asserted < 0.3 below, so the data
# stays hard). Measured over seeds 11-13: summary 0.80-0.84 (all variants), shadow 0.89-0.95,
# ann 0.92-0.93, ann sq8+count 0.81-0.87, ann trained on queries 0.55-0.81 (weak on this data; it is
# kept as an option for real queries), ann on the device (search gpu: keys at their centroids, 8 keys a list here)
# 0.84-0.89, space l2aug 0.84-0.88. Each floor is the lowest measured value minus ~0.1: losing a
# tenth of the mass fails, seed noise does not.
RECALL_FLOOR = {"summary": 0.70, "summary-sum-int8": 0.70, "summary-2level": 0.70,
                "summary-2level-int8": 0.70, "shadow": 0.79, "shadow-mass-summary-host": 0.82,
                "ann": 0.82, "ann-ip-queries": 0.45, "ann-sq8-count": 0.70, "ann-gpu": 0.74, "ann-gpu-l2aug": 0.74}


@pytest.fixture(scope="module")
def synthetic():
    keys, decode, prefill = synthetic_layer(2048, HKV, HQ, 64, num_queries=6, num_prefill_queries=256,
                                            num_topics=24, seed=11)
    masses = [chunk_attention_mass(decode[:, i], keys, C) for i in range(decode.shape[1])]
    return keys, decode, prefill, masses


def test_synthetic_data_is_not_trivial(synthetic):
    keys, decode, _, masses = synthetic
    gen = torch.Generator().manual_seed(0)
    rand = [mass_recall(m, torch.stack([torch.randperm(128, generator=gen)[:13] for _ in range(HKV)]))
            for m in masses]
    assert float(torch.stack(rand).mean()) < 0.3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_recall_of_attention_mass(name, synthetic):
    keys, decode, prefill, masses = synthetic
    index = new_index(name, d=64)
    index.build(keys, prefill)
    budget = math.ceil(0.10 * index.num_chunks)
    recall = torch.stack([mass_recall(m, index.select(decode[:, i], budget))
                          for i, m in enumerate(masses)])
    assert float(recall.mean()) >= RECALL_FLOOR[name], f"{name}: {recall.mean():.3f}"


# ---- budgets and configuration errors ----------------------------------------------------------
def test_budget_parsing_and_chunks():
    assert Budget.parse(2048).chunks(100_000, 64) == 32
    assert Budget.parse("2048").chunks(100_000, 64) == 32
    assert Budget.parse("2K").chunks(100_000, 64) == 32
    assert Budget.parse("5%").chunks(8192, 64) == 7            # ceil(409.6 / 64)
    assert Budget.parse(0.05).chunks(8192, 64) == 7
    assert Budget.parse(1).chunks(8192, 64) == 1               # never rounds to 0
    per_layer = Budget.parse(["1K", "10%"])
    assert per_layer.chunks(8192, 64, layer=0) == 16 and per_layer.chunks(8192, 64, layer=1) == 13
    duo = Budget.parse("1K", streaming_heads={1: [0, 2]})
    assert duo.head_chunks(1, 4, 8192, 64) == [0, 16, 0, 16]
    assert duo.head_chunks(0, 4, 8192, 64) == [16] * 4


@pytest.mark.parametrize("bad", [0, -5, "0", "0%", "-2K", 0.0, "abc", "150%", [], True])
def test_budget_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        Budget.parse(bad)


@pytest.mark.parametrize("name", ["summary", "shadow", "ann", "ann-gpu"])
def test_select_rejects_nonpositive_budget(name):
    keys, query, prefill, *_ = planted_layer(num_chunks=8)
    index = new_index(name)
    index.build(keys, prefill)
    for bad in (0, -1):
        with pytest.raises(ConfigError):
            index.select(query, bad)


def test_config_errors():
    shape = dict(num_kv_heads=HKV, num_q_heads=HQ, head_dim=D, chunk_tokens=C)
    with pytest.raises(ConfigError, match="rank"):
        make_index("shadow", rank=D + 1, **shape)
    with pytest.raises(ConfigError, match="'summary', 'shadow', 'ann'"):
        make_index("hnsw", **shape)
    with pytest.raises(ConfigError, match="no option"):
        make_index("summary", rank=4, **shape)
    with pytest.raises(ConfigError):
        make_index("summary", group_reduce="mean", **shape)
    with pytest.raises(ConfigError):
        make_index("summary", **{**shape, "num_q_heads": HQ + 1})
    with pytest.raises(ConfigError, match="queries"):
        make_index("ann", train_on="queries", **shape).build(torch.randn(HKV, 4 * C, D))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gpu_bytes_predicts_what_the_index_allocates(name):
    """The planner reserves gpu_bytes(ctx chunks) before any KV is placed; buffers stop growing there."""
    keys, _, prefill, _, _ = planted_layer(num_chunks=37)                      # keys: [Hkv, 37*C, D]
    index = new_index(name, max_chunks=40)
    index.build(keys[:, :30 * C], prefill)
    for _ in range(10):                                   # decode appends past 30: doubling stops at 40
        index.extend(keys[:, :C])
    assert index.nbytes["gpu"] <= index.gpu_bytes(40)
    full = new_index(name, max_chunks=40)
    full.build(torch.cat([keys, keys[:, :3 * C]], dim=1), prefill)             # exactly 40 chunks
    # gpu_bytes = the buffers + the build's scratch (one slab's temporaries, see test_gpu_bytes_cover_the_build_peak)
    assert full.nbytes["gpu"] == full.gpu_bytes(40) - getattr(full, "scratch_bytes", lambda: 0)()


@pytest.mark.parametrize("name", ["summary", "summary-2level-int8", "shadow", "shadow-mass-summary-host", "ann-gpu"])
def test_reserve_keeps_buffers_in_place_while_appending(name):
    """A captured decode step reads the index buffers by address: reserved rows mean no regrowth."""
    keys = planted_layer(num_chunks=40)[0]                                     # keys: [Hkv, 40*C, D]
    index = new_index(name)
    index.build(keys[:, :20 * C])
    index.reserve(40)
    key_before = index.graph_key() if hasattr(index, "graph_key") else None
    ptrs = [t.data_ptr() for t in _buffers(index)]
    for i in range(20, 40):
        index.extend(keys[:, i * C:(i + 1) * C])
    assert [t.data_ptr() for t in _buffers(index)] == ptrs
    assert index.num_chunks == 40
    if key_before is not None:
        assert index.graph_key() == key_before


def _buffers(index):
    from offload.indexes._common import ChunkBuffer
    seen, out = set(), []
    def walk(obj, depth=0):
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        if isinstance(obj, ChunkBuffer):
            out.append(obj.data)
        elif isinstance(obj, torch.Tensor) and obj.numel() > 1:     # ann-gpu keeps plain tensors
            out.append(obj)
        elif hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                walk(v, depth + 1)
    walk(index)
    return out


# ---- the planner's reservation covers each index's real peak (issue 13, deliverable 5) --------------
class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the mode: a CPU stand-in for max_memory_allocated."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: dict[int, int] = {}

    def _free(self, key: int, n: int) -> None:
        if self._seen.pop(key, None) is not None:
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref
        from torch.utils._pytree import tree_flatten
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if n and key not in self._seen and key not in inputs:   # new storage, not a view of an input
                    self._seen[key] = n
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, key, n)
        return out


MEMORY_CONFIGS = {"summary": {}, "summary-int8": {"bounds": "int8"}, "shadow": {},
                  "shadow-summary-int8": {"coarse": "summary", "summary_options": {"bounds": "int8"}},
                  "ann-gpu": {"search": "gpu"}}


@pytest.mark.parametrize("name", list(MEMORY_CONFIGS))
@pytest.mark.parametrize("prompt_chunks, max_chunks", [(64, 64), (64, 256), (100, 128), (300, 320)])
def test_gpu_bytes_cover_the_build_peak(name, prompt_chunks, max_chunks):
    """Build (the prefill) then reserve (what the selector does) never holds more than gpu_bytes(ctx chunks).

    Llama-like head shapes in bf16; prompts that fill the context, half of it, and just under it (the case
    where a reserve() after build used to hold the old and the new buffer at once)."""
    method = name.split("-")[0]
    shape = dict(num_kv_heads=8, num_q_heads=32, head_dim=128, chunk_tokens=32)
    keys = torch.randn(8, prompt_chunks * 32, 128).bfloat16()                  # keys: [Hkv, N, D]
    index = make_index(method, dtype=torch.bfloat16, max_chunks=max_chunks, **shape, **MEMORY_CONFIGS[name])
    with _LiveBytes() as mem:
        index.build(keys)
        index.reserve(2 * prompt_chunks)
        index.extend(torch.randn(8, 32, 128).bfloat16())                     # a decode chunk: no regrowth
    budget = index.gpu_bytes(max_chunks)
    assert index.nbytes["gpu"] <= budget
    assert mem.peak <= budget, f"{name}: peak {mem.peak / 2**20:.2f} MiB > gpu_bytes {budget / 2**20:.2f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MEMORY_CONFIGS) + ["summary-2level-int8", "ann"])
@pytest.mark.parametrize("prompt_chunks, max_chunks", [(256, 256), (1024, 4096), (4000, 4096)])
def test_gpu_peak_within_gpu_bytes_on_cuda(name, prompt_chunks, max_chunks):
    """The real allocator's peak during build + reserve + one extend stays within gpu_bytes (up to 128K tokens)."""
    opts = {"summary-2level-int8": {"bounds": "int8", "coarse_group": 4, "host_bounds": "int8"},
            "ann": {}}.get(name, MEMORY_CONFIGS.get(name))
    method = name.split("-")[0]
    shape = dict(num_kv_heads=8, num_q_heads=32, head_dim=128, chunk_tokens=32)
    keys = torch.randn(8, prompt_chunks * 32, 128, device="cuda").bfloat16()  # keys: [Hkv, N, D]
    more = torch.randn(8, 32, 128, device="cuda").bfloat16()
    torch.bmm(keys[:, :64].float(), keys[:, :64].float().transpose(1, 2))      # cuBLAS workspace: not the index's
    index = make_index(method, device="cuda", dtype=torch.bfloat16, max_chunks=max_chunks, **shape, **opts)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    index.build(keys)
    index.reserve(2 * prompt_chunks)
    if prompt_chunks < max_chunks:     # a context of max_chunks is full: nothing is appended past it
        index.extend(more)
    if hasattr(index, "wait"):
        index.wait()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= index.gpu_bytes(max_chunks), f"{name}: {peak / 2**20:.1f} MiB > {index.gpu_bytes(max_chunks) / 2**20:.1f}"


# ---- ANN at scale: sampled k-means, background build (issue 13, deliverable 4) ----------------------
def test_ann_build_returns_before_the_index_exists(monkeypatch):
    """build() hands the faiss work to a background thread (the GPU prefills the next layers meanwhile);
    select() waits for it and then answers exactly as a build done in the foreground."""
    import threading
    from offload.indexes.ann import FaissANNIndex
    keys, query, prefill, _, _ = planted_layer(num_chunks=40)
    gate, started = threading.Event(), threading.Event()
    real = FaissANNIndex._build_all

    def gated(self, *args):
        started.set()
        assert gate.wait(timeout=60), "the test never opened the gate"
        return real(self, *args)

    monkeypatch.setattr(FaissANNIndex, "_build_all", gated)
    index = new_index("ann")
    index.build(keys)                  # returns although the build is held at the gate
    assert started.wait(timeout=60) and index._pending is not None and not index._pending.done()
    assert index.num_chunks == 40      # known without waiting
    gate.set()
    ids = index.select(query, 5)       # waits for the build
    monkeypatch.setattr(FaissANNIndex, "_build_all", real)
    eager = new_index("ann", background=False)
    eager.build(keys)
    assert torch.equal(ids, eager.select(query, 5))


def test_ann_sampled_kmeans_keeps_recall_of_exact_search():
    """A 16K-token layer (IVF with k-means on 32 points per centroid, 2 sqrt(N) lists, 5% probed): the mass of
    the chosen chunks stays close to what exact search (a flat index) chooses."""
    keys, decode, _ = synthetic_layer(16384, HKV, HQ, 64, num_queries=6, seed=5)
    shape = dict(num_kv_heads=HKV, num_q_heads=HQ, head_dim=64, chunk_tokens=32)
    ivf = make_index("ann", background=False, **shape)
    exact = make_index("ann", background=False, min_ivf_tokens=1 << 40, **shape)
    ivf.build(keys)
    exact.build(keys)
    assert ivf._centroids.shape[1] == round(2 * math.sqrt(16384)) and ivf._ivf.nlist == HKV * ivf._centroids.shape[1]
    rec_ivf, rec_exact = [], []
    for i in range(decode.shape[1]):
        mass = chunk_attention_mass(decode[:, i], keys, 32)                  # mass: [Hkv, n]
        rec_ivf.append(mass_recall(mass, ivf.select(decode[:, i], 26)))     # 5% budget
        rec_exact.append(mass_recall(mass, exact.select(decode[:, i], 26)))
    got, ref = float(torch.cat(rec_ivf).mean()), float(torch.cat(rec_exact).mean())
    assert got >= 0.95 and got >= ref - 0.03, (got, ref)


def test_ann_lists_from_torch_kmeans_are_each_keys_nearest_centroid():
    """The IVF lists come from kmeans.ivf_lists (torch, on the keys' device) and are handed to faiss pre-assigned:
    every key must sit in the list faiss itself would choose (its nearest centroid in the search space)."""
    import faiss
    keys, _, _ = synthetic_layer(8192, HKV, HQ, 64, num_queries=1, seed=7)     # keys: [Hkv, N, D]
    index = make_index("ann", background=False, num_kv_heads=HKV, num_q_heads=HQ, head_dim=64, chunk_tokens=32)
    norms, cents, lists = index._train_keys(keys.bfloat16())
    index._max_norm = norms
    assert cents.shape == (HKV, round(2 * math.sqrt(8192)), 65) and lists.shape == (HKV, 8192)
    for h in range(HKV):
        flat = faiss.IndexFlatL2(cents.shape[2])
        flat.add(cents[h])
        _, nearest = flat.search(index._keys_space(h, keys[h].bfloat16().float().numpy()), 1)  # nearest: [N, 1]
        assert (nearest[:, 0] == lists[h]).mean() > 0.999
        assert len(set(lists[h].tolist())) > 0.9 * cents.shape[1]               # lists are used, none left empty
