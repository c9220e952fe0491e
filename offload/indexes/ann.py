"""FaissANNIndex: a faiss-cpu IVF index over a layer's keys in host RAM (after RetrievalAttention).

Decode queries come from another distribution than the keys (different mean and norm), so an index
laid out by the keys alone sends a query to the wrong neighbourhoods. Two remedies, both options:
  * train_on="queries" (build() must get prefill queries): the IVF centroids are k-means centroids of
    the prefill queries of the KV head's query group (faiss, spherical for space="ip"), and every key is
    filed under its nearest query centroid. A decode query is near prefill queries, so its nearest
    centroids are the lists holding the keys it attends to. (On the synthetic keys of
    bench/index_recall.py it recalled 0.91 against 0.99 for the default; kept for real queries.)
  * space="l2aug" (default, with train_on="keys"): the standard IP -> L2 reduction: keys become
    [k, sqrt(M^2 - |k|^2)] and queries [q, 0], so that |q' - k'|^2 = |q|^2 + M^2 - 2 q.k and the L2
    neighbours are the IP maxima (M = norm_headroom x the build keys' largest norm per head, so that
    extended keys usually fit under it). The IVF lists are L2 k-means cells of the augmented keys.
Plain HNSW with inner product is not offered (it is known to fail on this mismatch). A layer with fewer
than `min_ivf_tokens` keys gets exact flat indexes (IVF needs data to train).

Layout: ONE faiss IVF per layer; KV head h owns lists h*nlist .. (h+1)*nlist - 1 and the ids are token
positions. A decode step probes each query head's nearest lists of its own KV head (one small matmul against the
centroids, on the query's GPU or in numpy, nearest lists first) and searches all query heads in one `search_preassigned` call:
one faiss call per layer instead of one per head (~0.3 ms fixed each). That call is serial in faiss's default
parallel_mode 0, which kept a 16-core host at 26 ms per layer at 128K (issue 13); mode 3 spreads the query heads
over faiss's pool. That decode half (probe, scan, chunk votes) is offload/indexes/ann_search.py.

Chunk score: each retrieved token votes for its chunk, with weight 1 ("count") or its share of the
softmax mass among the tokens retrieved for that query head ("expsum"); a query group's votes are
summed, so with every token retrieved "expsum" ranks chunks by their exact attention mass. Chunks
with no vote are filled in newest-first so that `select` always returns min(budget, N) ids.

Build (the 128K problem: faiss k-means over every key with one thread took minutes per layer): the lists
come from a sampled k-means in torch on the keys' device (offload/indexes/kmeans.py; on a GPU during prefill,
milliseconds per layer); build() then copies the keys to the host and a background thread files them into
the lists (heads converted side by side on a worker pool) while the GPU prefills the next layers;
select/extend wait for it. Threads: faiss-cpu and torch each ship their own libgomp; the index sets faiss's
pool (`threads`, default 0 = every core this process may use: on a GPU host torch's CPU pool is idle during
prefill and decode; `search_threads` sets the decode search's pool apart, default the same). Set
OMP_WAIT_POLICY=PASSIVE so that an idle pool does not spin.
Memory: host, besides the build's k-means temporaries and the coarse step's centroids on the device (gpu_bytes);
"flat" codes keep float32 keys (D'*4 B per head-token) + 8 B ids, "sq8" D' B + 8 B.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from offload.errors import ConfigError

try:
    import faiss
except ImportError:   # an extra since issue 15: only --index ann needs it (offload.indexes imports us lazily)
    raise ConfigError("--index ann needs faiss-cpu, which is not installed; pip install 'offload[ann]' "
                      "(or use --index summary / shadow)") from None
from offload.indexes import kmeans  # noqa: E402
from offload.indexes.ann_search import IVFSearch  # noqa: E402
from offload.indexes._common import check_choice, check_shape_args, split_chunks  # noqa: E402

_POOLS: dict[str, ThreadPoolExecutor] = {}


def _pool(name: str, workers: int) -> ThreadPoolExecutor:
    """"build": one background builder per process (layers queue in order); "heads": per-head host work."""
    if name not in _POOLS:
        _POOLS[name] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"offload-ann-{name}")
    return _POOLS[name]


def all_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class FaissANNIndex(IVFSearch):
    """A layer's keys in one faiss IVF (lists per KV head) or exact flat indexes; inner-product search."""

    def __init__(self, num_kv_heads: int, num_q_heads: int, head_dim: int, chunk_tokens: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                 space: str = "l2aug", train_on: str = "keys", codec: str = "flat", nlist: int = 0,
                 nprobe: int = 0, probe_fraction: float = 0.05, retrieve_factor: float = 0.25,
                 chunk_score: str = "expsum", threads: int = 0, search_threads: int = 0, min_ivf_tokens: int = 2048,
                 norm_headroom: float = 1.2, scale: float | None = None, seed: int = 0, max_chunks: int = 0,
                 train_points: int = 32, background: bool = True, search: str = "host"):
        self.group_size = check_shape_args(num_kv_heads, num_q_heads, head_dim, chunk_tokens)
        check_choice("search", search, ("host",))    # "gpu": make_index builds ann_gpu.DeviceANNIndex instead
        check_choice("space", space, ("ip", "l2aug"))
        check_choice("train_on", train_on, ("keys", "queries"))
        check_choice("codec", codec, ("flat", "sq8"))
        check_choice("chunk_score", chunk_score, ("count", "expsum"))
        if (not 0 < probe_fraction <= 1 or retrieve_factor <= 0 or threads < 0 or search_threads < 0
                or train_points < 4):
            raise ConfigError(f"ann options out of range (probe_fraction={probe_fraction}, retrieve_factor="
                              f"{retrieve_factor}, threads={threads}, search_threads={search_threads}, "
                              f"train_points={train_points}); use 0 < probe_fraction <= 1, retrieve_factor > 0, "
                              "threads >= 0 and search_threads >= 0 (0 = all cores / as threads), "
                              "train_points >= 4 in index_options")
        self.num_kv_heads, self.num_q_heads, self.head_dim = num_kv_heads, num_q_heads, head_dim
        self.chunk_tokens = chunk_tokens
        self.device, self.dtype = torch.device(device), dtype
        self.space, self.train_on, self.codec, self.chunk_score = space, train_on, codec, chunk_score
        self.nlist, self.nprobe, self.probe_fraction = int(nlist), int(nprobe), float(probe_fraction)
        self.retrieve_factor, self.threads = float(retrieve_factor), int(threads) or all_cores()
        self.search_threads = int(search_threads) or self.threads   # faiss's pool during a decode search
        self.train_points, self.background = int(train_points), bool(background)
        self.min_ivf_tokens, self.seed = int(min_ivf_tokens), seed
        self.max_chunks = max(0, int(max_chunks))    # the context: what the planner sizes the build scratch for
        self.norm_headroom = max(1.0, float(norm_headroom))
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        self._pending: Future | None = None        # the background build of this layer, if running
        self._host_bufs: dict[str, torch.Tensor] = {}  # pinned buffers of a GPU select, reused (ann_search.py)
        self._copied = None                        # the CUDA event after the last select's copies out of _host_bufs
        self.select_split = {"to_host": 0.0, "search": 0.0, "rank": 0.0}   # select's wall seconds by part (stats)
        self._reset()

    def _reset(self) -> None:
        hkv = self.num_kv_heads
        self._ivf: faiss.IndexIVF | None = None    # every head's lists; None while flat
        self._quantizer: faiss.Index | None = None  # the IVF borrows it: keep it alive
        self._set_centroids(np.zeros((hkv, 0, self.head_dim), np.float32))   # [Hkv, nlist, D'] search space
        self._flat: list[faiss.Index] = []         # per head, exact inner product, while there are few keys
        self._max_norm = np.zeros(hkv)             # M of the l2aug transform per head (0: none)
        self._means = np.zeros((hkv, 0, self.head_dim), np.float32)  # chunk mean keys [Hkv, n, D]
        self._num_tokens = 0

    def wait(self) -> None:
        """Block until the background build is done (re-raises its error)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _nlist(self, n: int, train_len: int) -> int:
        nlist = self.nlist or int(round(2 * math.sqrt(max(n, 1))))
        return min(nlist, n // 8, train_len // 8)             # k-means needs a few points per centroid

    # -- building --------------------------------------------------------------------------------
    def build(self, keys: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        """Index keys [Hkv, N, D]; prefill queries [Hq, Nq, D] are needed for train_on="queries"."""
        split_chunks(keys, self.num_kv_heads, self.head_dim, self.chunk_tokens)  # shape check only
        if self.train_on == "queries" and (queries is None or queries.shape[1] == 0):
            raise ConfigError("train_on='queries' needs prefill queries: pass queries to build(), "
                              "or use train_on='keys'")
        self.wait()
        self._reset()
        q_np = None
        if self.train_on == "queries":
            # heads h*G .. h*G+G-1 are contiguous, so the reshape gathers each KV head's query group
            q_all = queries.detach().cpu().float()                              # q_all: [Hq, Nq, D]
            q_np = q_all.reshape(self.num_kv_heads, -1, self.head_dim).numpy()  # q_np: [Hkv, G*Nq, D]
        self._num_tokens = n = keys.shape[1]
        trained = None
        if keys.is_cuda and q_np is None and self._ivf_size(n, n):
            trained = self._train_keys(keys)     # the lists on the GPU while the keys are there (ms per layer)
        host = keys.detach().to("cpu")                                         # host: [Hkv, N, D] (its dtype)
        if self.background:
            self._pending = _pool("build", 1).submit(self._build_all, host, q_np, trained)
        else:
            self._build_all(host, q_np, trained)

    def _ivf_size(self, n: int, train_len: int) -> int:
        """Lists per head for n keys, 0 when the layer stays exact flat."""
        nlist = self._nlist(n, train_len)
        return nlist if n >= self.min_ivf_tokens and nlist >= 2 else 0

    def _train_keys(self, keys: torch.Tensor):
        """keys [Hkv, N, D] (any device) -> (M [Hkv], centroids [Hkv, nlist, D'], lists [Hkv, N]) in numpy."""
        nlist = self._ivf_size(keys.shape[1], keys.shape[1])
        out = []
        for h in range(self.num_kv_heads):
            norm = self.norm_headroom * kmeans.max_norm(keys[h]) if self.space == "l2aug" else 0.0
            c, lists = kmeans.ivf_lists(keys[h], nlist, max_norm=norm, spherical=self.space == "ip",
                                        points_per_list=self.train_points, seed=self.seed)
            out.append((norm, c.cpu().numpy(), lists.cpu().numpy()))
        return np.array([o[0] for o in out]), np.stack([o[1] for o in out]), np.stack([o[2] for o in out])

    def _build_all(self, keys: torch.Tensor, q_np: np.ndarray | None, trained=None) -> None:
        """The layer's index over host keys [Hkv, N, D] (runs on the background builder)."""
        faiss.omp_set_num_threads(self.threads)
        n = keys.shape[1]
        nlist = self._ivf_size(n, n if q_np is None else q_np.shape[1])
        if not nlist:
            self._flat = [faiss.IndexFlatIP(self.head_dim) for _ in range(self.num_kv_heads)]
            self._file(keys, None, 0)
            return
        if trained is None and q_np is None:
            trained = self._train_keys(keys)                                   # torch on the host, sampled
        if trained is None:     # lists of the prefill queries: faiss k-means in the search space
            self._max_norm = np.array([self.norm_headroom * kmeans.max_norm(keys[h]) if self.space == "l2aug"
                                       else 0.0 for h in range(self.num_kv_heads)])
            cents = []
            for h in range(self.num_kv_heads):
                qx = self._queries_space(q_np[h][None])[0]                     # qx: [G*Nq, D']
                km = faiss.Kmeans(qx.shape[1], nlist, niter=12, seed=self.seed, spherical=self.space == "ip",
                                  max_points_per_centroid=self.train_points, min_points_per_centroid=1)
                km.train(qx)
                cents.append(km.centroids)
            trained = (self._max_norm, np.stack(cents), None)
        self._max_norm, lists = trained[0], trained[2]
        self._set_centroids(np.ascontiguousarray(trained[1], dtype=np.float32))
        self._make_ivf(keys)
        self._file(keys, lists, 0)

    def _set_centroids(self, cents: np.ndarray) -> None:
        """Centroids [Hkv, nlist, D'] plus what each search's coarse step needs, computed once: their first D
        dims transposed for one batched BLAS matmul (an l2aug query's extra coordinate is 0) and |c|^2."""
        self._centroids = cents
        self._dev_cents = None       # their copy on the compute device, made by the first GPU select
        self._cents_t = np.ascontiguousarray(cents[:, :, :self.head_dim].transpose(0, 2, 1))  # [Hkv, D, nlist]
        self._cents_sq = (cents.astype(np.float32) ** 2).sum(axis=2)[:, None, :]              # [Hkv, 1, nlist]

    def _make_ivf(self, keys: torch.Tensor) -> None:
        hkv, nlist, dim = self._centroids.shape
        ip = self.space == "ip"
        self._quantizer = faiss.IndexFlatIP(dim) if ip else faiss.IndexFlatL2(dim)
        self._quantizer.add(self._centroids.reshape(hkv * nlist, dim))          # trained: IVF.train skips k-means
        metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
        if self.codec == "flat":
            self._ivf = faiss.IndexIVFFlat(self._quantizer, dim, hkv * nlist, metric)
        else:
            self._ivf = faiss.IndexIVFScalarQuantizer(self._quantizer, dim, hkv * nlist,
                                                      faiss.ScalarQuantizer.QT_8bit, metric)
            step = max(1, keys.shape[1] // (self.train_points * nlist))
            self._ivf.train(np.concatenate([self._keys_space(h, keys[h, ::step].float().numpy())
                                            for h in range(hkv)]))             # the 8-bit ranges from a sample
        # search_preassigned is serial in faiss's default mode 0 (IndexIVF.search splits the queries over threads
        # itself, search_preassigned does not): mode 3 spreads a layer's query heads over the OpenMP pool
        self._ivf.parallel_mode = 3

    def _file(self, keys: torch.Tensor, lists: np.ndarray | None, first: int) -> None:
        """Append host keys [Hkv, n, D] at positions first..: into their lists (given [Hkv, n], or the nearest
        centroid), or the flat indexes; heads are converted side by side, added one after another."""
        def prep(h: int):
            k = keys[h].float().numpy()                                        # k: [n, D]
            if self._ivf is None:
                return k, None, k.reshape(-1, self.chunk_tokens, self.head_dim).mean(axis=1)
            x = self._keys_space(h, k)                                         # x: [n, D']
            a = lists[h] if lists is not None else self._nearest(h, x)         # a: [n]
            return x, a + h * self._centroids.shape[1], k.reshape(-1, self.chunk_tokens, self.head_dim).mean(axis=1)
        ids = np.arange(first, first + keys.shape[1], dtype=np.int64)           # ids: token positions
        means = []
        for h, (x, a, mean) in enumerate(_pool("heads", all_cores()).map(prep, range(self.num_kv_heads))):
            if a is None:
                self._flat[h].add(np.ascontiguousarray(x))
            else:
                self._ivf.add_core(len(x), faiss.swig_ptr(np.ascontiguousarray(x)), faiss.swig_ptr(ids),
                                   faiss.swig_ptr(np.ascontiguousarray(a, dtype=np.int64)))
            means.append(mean)
        self._means = np.concatenate([self._means, np.stack(means)], axis=1)

    def _nearest(self, h: int, x: np.ndarray) -> np.ndarray:
        """Head h's nearest list of every row of x [n, D'] -> [n]."""
        c = self._centroids[h]                                                 # c: [nlist, D']
        s = x @ c.T                                                            # s: [n, nlist]
        if self.space != "ip":
            s -= 0.5 * (c * c).sum(axis=1)
        return s.argmax(axis=1)

    def _keys_space(self, h: int, k: np.ndarray) -> np.ndarray:
        if not self._max_norm[h]:
            return np.ascontiguousarray(k, dtype=np.float32)
        # a later key beyond M clamps to 0 and ranks as if its norm were M: lower than it should
        extra = np.sqrt(np.maximum(self._max_norm[h] ** 2 - (k * k).sum(axis=1), 0.0))  # extra: [N]
        return np.ascontiguousarray(np.concatenate([k, extra[:, None]], axis=1), dtype=np.float32)

    def _queries_space(self, q: np.ndarray) -> np.ndarray:
        """q [Hkv, m, D] -> [Hkv, m, D'] (a zero column for l2aug)."""
        if self.space != "l2aug":
            return np.ascontiguousarray(q, dtype=np.float32)
        return np.ascontiguousarray(np.concatenate([q, np.zeros((*q.shape[:2], 1), q.dtype)], axis=2),
                                    dtype=np.float32)

    def extend(self, keys: torch.Tensor) -> None:
        """Append full chunks keys [Hkv, n*C, D] (existing lists, no retraining). A flat layer becomes IVF once
        it reaches `min_ivf_tokens` (lists from its keys: prefill queries are not kept)."""
        split_chunks(keys, self.num_kv_heads, self.head_dim, self.chunk_tokens)  # [Hkv, n, C, D] check
        if keys.shape[1] == 0:
            return
        self.wait()
        host = keys.detach().cpu()                     # widened on the host: no unreserved GPU float32 copy
        faiss.omp_set_num_threads(self.threads)
        total = self._num_tokens + keys.shape[1]
        if self._ivf is None and self._ivf_size(total, total):
            old = [torch.from_numpy(f.reconstruct_n(0, f.ntotal)) for f in self._flat] if self._flat else None
            self._reset()
            self._num_tokens = total
            every = host if old is None else torch.cat([torch.stack(old), host.float()], dim=1)  # [Hkv, total, D]
            self._build_all(every, None)
            return
        if self._ivf is None and not self._flat:
            self._flat = [faiss.IndexFlatIP(self.head_dim) for _ in range(self.num_kv_heads)]
        self._file(host, None, self._num_tokens)
        self._num_tokens = total

    # -- selection -------------------------------------------------------------------------------
    def gpu_bytes(self, num_chunks: int) -> int:
        """The faiss index and its keys live in host RAM; the compute device holds the build's k-means temporaries
        (one head at a time, on the GPU during prefill: scratch_bytes) and, from the first decode select on a GPU,
        the float32 centroids of the coarse step (Hkv x nlist x (D + 1) x 4 B: 3 MiB per layer at 128K)."""
        n = num_chunks * self.chunk_tokens
        nlist = self._ivf_size(n, n)
        cents = self.num_kv_heads * nlist * (self.head_dim + 1) * 4 + self.num_q_heads * 8 if nlist else 0
        return self.scratch_bytes(num_chunks) + cents

    def scratch_bytes(self, num_chunks: int | None = None, budget: int = 0) -> int:
        """Device temporaries of one head's sampled k-means and key assignment at num_chunks (default: the
        context's max_chunks); 0 when lists come from prefill queries (faiss k-means on the host). Selection
        runs on the host (budget: unused)."""
        n = (self.max_chunks if num_chunks is None else num_chunks) * self.chunk_tokens
        nlist = self._ivf_size(n, n)
        if self.train_on != "keys" or not nlist:
            return 0
        return kmeans.scratch_bytes(n, nlist, self.head_dim, self.train_points)

    def reserve(self, num_chunks: int) -> None:
        """Nothing to reserve: faiss grows on the host, and a step with this index is never captured."""

    def graph_key(self):
        """None: faiss searches on the host, so a decode step with this index cannot be captured whole."""
        return None

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return self._num_tokens // self.chunk_tokens

    @property
    def nbytes(self) -> dict[str, int]:
        self.wait()
        host = self._means.nbytes + sum(f.ntotal * f.d * 4 for f in self._flat)
        if self._ivf is not None:
            host += self._ivf.ntotal * (self._ivf.code_size + 8) + self._centroids.nbytes * 2  # + the quantizer
        # what gpu_bytes reserves at this size for the coarse step's centroids, which a GPU select keeps on the
        # device from its first call on (lists of prefill queries may be fewer: then less is used)
        gpu = self.gpu_bytes(self.num_chunks) - self.scratch_bytes(self.num_chunks) if self._ivf is not None else 0
        return {"gpu": gpu, "host": host}
