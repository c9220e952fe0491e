"""FaissANNIndex: a faiss-cpu index over each KV head's keys in host RAM (after RetrievalAttention).

Decode queries come from another distribution than the keys (different mean and norm), so an index
laid out by the keys alone sends a query to the wrong neighbourhoods. Two remedies, both options:
  * train_on="queries" (build() must get prefill queries): the IVF centroids are
    spherical k-means centroids of the prefill queries of the KV head's query group, and every key
    is filed under the query centroid with the largest inner product with it. A decode query is
    near prefill queries, so its nearest centroids are the lists holding the keys it attends to.
    (On the synthetic keys of bench/index_recall.py it recalled 0.91 against 0.99 for the default;
    kept to be measured on real queries.)
  * space="l2aug" (default, with train_on="keys"): the standard IP -> L2 reduction: keys become
    [k, sqrt(M^2 - |k|^2)] and queries [q, 0], so that |q' - k'|^2 = |q|^2 + M^2 - 2 q.k and the L2
    neighbours are the IP maxima (M = norm_headroom x the build keys' largest norm, so that
    extended keys usually fit under it). The IVF lists are L2 k-means cells of the augmented keys.
Plain HNSW with inner product is not offered (it is known to fail on this mismatch).
A head with fewer than `min_ivf_tokens` build keys gets an exact flat index (IVF needs data to train).

Chunk score: each retrieved token votes for its chunk, with weight 1 ("count") or its share of the
softmax mass among the tokens retrieved for that query head ("expsum"); a query group's votes are
summed, so with every token retrieved "expsum" ranks chunks by their exact attention mass. Chunks
with no vote are filled in newest-first so that `select` always returns min(budget, N) ids.

Build cost (the 128K problem: k-means over every key with one thread took minutes per layer): k-means
trains on a sample of `train_points` keys per centroid (faiss subsamples), nlist defaults to 2 sqrt(N),
and build() only copies the layer's keys to the host and hands the work to one background thread, so
the GPU prefills the next layers meanwhile; select/extend wait for it (faiss releases the GIL).
Threads: faiss-cpu and torch each ship their own libgomp, i.e. two OpenMP thread pools. The index
sets faiss's pool before every faiss call (`threads`, default 0 = every core this process may use: on
a GPU host torch's CPU pool is idle during prefill and decode). Set OMP_WAIT_POLICY=PASSIVE in the
environment so that an idle pool does not spin; on a CPU-only run give `threads` what torch leaves.
Memory: host only; "flat" codes keep float32 keys (D*4 B per head-token) + 8 B ids, "sq8" D B + 8 B.
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
from faiss.contrib.ivf_tools import add_preassigned  # noqa: E402

from offload.indexes import kmeans  # noqa: E402
from offload.indexes._common import check_budget, check_choice, check_shape_args, split_chunks

_BUILDER: ThreadPoolExecutor | None = None     # one background builder per process: layers queue in order


def _builder() -> ThreadPoolExecutor:
    global _BUILDER
    if _BUILDER is None:
        _BUILDER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offload-ann-build")
    return _BUILDER


def all_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class FaissANNIndex:
    """One faiss IVF (or flat) index per KV head over its keys, inner-product search."""

    def __init__(self, num_kv_heads: int, num_q_heads: int, head_dim: int, chunk_tokens: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                 space: str = "l2aug", train_on: str = "keys", codec: str = "flat", nlist: int = 0,
                 nprobe: int = 0, probe_fraction: float = 0.05, retrieve_factor: float = 0.25,
                 chunk_score: str = "expsum", threads: int = 0, min_ivf_tokens: int = 2048,
                 norm_headroom: float = 1.2, scale: float | None = None, seed: int = 0, max_chunks: int = 0,
                 train_points: int = 32, background: bool = True):
        self.group_size = check_shape_args(num_kv_heads, num_q_heads, head_dim, chunk_tokens)
        check_choice("space", space, ("ip", "l2aug"))
        check_choice("train_on", train_on, ("keys", "queries"))
        check_choice("codec", codec, ("flat", "sq8"))
        check_choice("chunk_score", chunk_score, ("count", "expsum"))
        if not 0 < probe_fraction <= 1 or retrieve_factor <= 0 or threads < 0 or train_points < 4:
            raise ConfigError(f"ann options out of range (probe_fraction={probe_fraction}, retrieve_factor="
                              f"{retrieve_factor}, threads={threads}, train_points={train_points}); use "
                              "0 < probe_fraction <= 1, retrieve_factor > 0, threads >= 0 (0 = all cores), "
                              "train_points >= 4 in index_options")
        self.num_kv_heads, self.num_q_heads, self.head_dim = num_kv_heads, num_q_heads, head_dim
        self.chunk_tokens = chunk_tokens
        self.device, self.dtype = torch.device(device), dtype
        self.space, self.train_on, self.codec, self.chunk_score = space, train_on, codec, chunk_score
        self.nlist, self.nprobe, self.probe_fraction = int(nlist), int(nprobe), float(probe_fraction)
        self.retrieve_factor, self.threads = float(retrieve_factor), int(threads) or all_cores()
        self.train_points, self.background = int(train_points), bool(background)
        self._pending: Future | None = None       # the background build of this layer, if running
        self._pool: ThreadPoolExecutor | None = None  # searches heads side by side (select)
        self.min_ivf_tokens, self.seed = int(min_ivf_tokens), seed
        self.max_chunks = max(0, int(max_chunks))    # the context: what the planner sizes the build scratch for
        self.norm_headroom = max(1.0, float(norm_headroom))
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        self._reset()

    def _reset(self) -> None:
        self._heads: list[faiss.Index] = []       # per KV head: IVF (trained) or exact flat IP
        self._quantizers: list[faiss.Index] = []  # the IVF indexes borrow them: keep them alive
        self._max_norm: list[float] = []          # M of the l2aug transform, per head (0: no transform)
        self._means = np.zeros((self.num_kv_heads, 0, self.head_dim), np.float32)  # chunk mean keys [Hkv, n, D]
        self._num_tokens = 0

    def wait(self) -> None:
        """Block until the background build is done (re-raises its error)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

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
        self._num_tokens = keys.shape[1]
        trained = None
        if keys.is_cuda and self.train_on == "keys":
            # the IVF lists on the GPU while the keys are there (ms per layer): the host only files the keys
            trained = [self._train(keys[h]) for h in range(self.num_kv_heads)]
            trained = [(m, c.cpu().numpy(), a.cpu().numpy()) if c is not None else (m, None, None)
                       for m, c, a in trained]
        host = keys.detach().to("cpu")                                         # host: [Hkv, N, D] (its dtype)
        if self.background:
            self._pending = _builder().submit(self._build_all, host, q_np, trained)
        else:
            self._build_all(host, q_np, trained)

    def _build_all(self, keys: torch.Tensor, q_np: np.ndarray | None, trained: list | None = None) -> None:
        """Every head's index over host keys [Hkv, N, D] (runs on the background builder); trained: per head
        (M, centroids, lists) from the device, else trained here (torch on the host, sampled)."""
        faiss.omp_set_num_threads(self.threads)
        # head by head: a float32 copy of a whole 1M-token layer would be 4 GiB of host RAM
        means = [keys[h].float().reshape(-1, self.chunk_tokens, self.head_dim).mean(dim=1) for h in range(len(keys))]
        self._means = torch.stack(means).numpy()                                # means: [Hkv, n, D]
        for h in range(self.num_kv_heads):
            self._heads.append(None)
            self._quantizers.append(None)
            self._max_norm.append(0.0)
            # one head at a time: a float32 copy of a whole 1M-token layer would be 4 GiB
            k_h = keys[h].float().numpy()                                      # k_h: [N, D]
            self._build_head(h, k_h, q_np[h] if q_np is not None else None,
                             trained[h] if trained is not None else None)

    def _nlist(self, n: int, train_len: int) -> int:
        nlist = self.nlist or int(round(2 * math.sqrt(max(n, 1))))
        return min(nlist, n // 8, train_len // 8)             # k-means needs a few points per centroid

    def _train(self, k: torch.Tensor) -> tuple[float, torch.Tensor | None, torch.Tensor | None]:
        """One head's keys k [N, D] (any device) -> (M of the l2aug transform, centroids [nlist, D'], list of
        every key [N]); (0, None, None) when the head gets an exact flat index."""
        n = k.shape[0]
        nlist = self._nlist(n, n)
        if n < self.min_ivf_tokens or nlist < 2:
            return 0.0, None, None
        norm = self.norm_headroom * kmeans.max_norm(k) if self.space == "l2aug" else 0.0
        c, lists = kmeans.ivf_lists(k, nlist, max_norm=norm, spherical=self.space == "ip",
                                    points_per_list=self.train_points, seed=self.seed)
        return norm, c, lists

    def _build_head(self, h: int, k: np.ndarray, q: np.ndarray | None, trained=None) -> None:
        """(Re)build head h over keys k [N, D], IVF when there are enough of them, else exact flat.

        Lists from keys: sampled k-means in torch (trained: done on the device already), then faiss only files
        every key in its list. Lists from queries: faiss k-means over the prefill queries."""
        n, d = k.shape
        train = k if q is None else q
        nlist = self._nlist(n, len(train))
        if q is None and trained is None:
            trained = self._train(torch.from_numpy(k))
        if n < self.min_ivf_tokens or nlist < 2 or (q is None and trained[1] is None):
            # exact search needs no transform: flat inner product
            self._heads[h], self._quantizers[h], self._max_norm[h] = faiss.IndexFlatIP(d), None, 0.0
            self._heads[h].add(np.ascontiguousarray(k, dtype=np.float32))
            return
        ip = self.space == "ip"
        if q is None:
            self._max_norm[h], centroids, lists = trained[0], np.ascontiguousarray(trained[1]), trained[2]
            nlist = centroids.shape[0]
        else:
            if self.space == "l2aug":
                # M above the build's largest norm leaves room for the keys extend() brings later
                self._max_norm[h] = self.norm_headroom * float(np.linalg.norm(k, axis=1).max())
            qx = self._queries_space(h, q)
            km = faiss.Kmeans(qx.shape[1], nlist, niter=12, seed=self.seed, spherical=ip,
                              max_points_per_centroid=self.train_points, min_points_per_centroid=1, verbose=False)
            km.train(qx)
            centroids, lists = km.centroids, None
        k_x = self._keys_space(h, k)                                           # k_x: [N, D']
        dim = k_x.shape[1]
        quantizer = faiss.IndexFlatIP(dim) if ip else faiss.IndexFlatL2(dim)
        quantizer.add(centroids)                              # trained quantizer: IVF.train skips k-means
        metric = faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2
        if self.codec == "flat":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
        else:
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, metric)
            sample = k_x[:: max(1, n // (self.train_points * nlist))]
            index.train(sample)                               # codec only: the 8-bit ranges from a sample of keys
        index.nprobe = self.nprobe or max(1, math.ceil(self.probe_fraction * nlist))
        if lists is None:
            index.add(k_x)                                    # faiss assigns (queries' lists: inner product)
        else:
            add_preassigned(index, k_x, np.ascontiguousarray(lists, dtype=np.int64))
        self._heads[h], self._quantizers[h] = index, quantizer

    def _keys_space(self, h: int, k: np.ndarray) -> np.ndarray:
        if not self._max_norm[h]:
            return np.ascontiguousarray(k, dtype=np.float32)
        # a later key beyond M clamps to 0 and ranks as if its norm were M: lower than it should
        extra = np.sqrt(np.maximum(self._max_norm[h] ** 2 - (k * k).sum(axis=1), 0.0))  # extra: [N]
        return np.ascontiguousarray(np.concatenate([k, extra[:, None]], axis=1), dtype=np.float32)

    def _queries_space(self, h: int, q: np.ndarray) -> np.ndarray:
        if not self._max_norm[h]:
            return np.ascontiguousarray(q, dtype=np.float32)
        return np.ascontiguousarray(np.concatenate([q, np.zeros((len(q), 1), q.dtype)], axis=1),
                                    dtype=np.float32)

    def extend(self, keys: torch.Tensor) -> None:
        """Append full chunks keys [Hkv, n*C, D] to every head's index (existing lists, no retraining).

        A head that is still exact-flat is rebuilt as IVF once it reaches `min_ivf_tokens` (from its
        keys: prefill queries are not kept).
        """
        chunks = split_chunks(keys, self.num_kv_heads, self.head_dim, self.chunk_tokens)  # [Hkv, n, C, D]
        if keys.shape[1] == 0:
            return
        self.wait()
        if not self._heads:
            self._reset()
            self._heads, self._quantizers = [None] * self.num_kv_heads, [None] * self.num_kv_heads
            self._max_norm = [0.0] * self.num_kv_heads
            for h in range(self.num_kv_heads):
                self._build_head(h, np.zeros((0, self.head_dim), np.float32), None)
        # to the host before widening: a float32 copy on the GPU would be memory the planner never reserved
        new_means = chunks.detach().cpu().float().mean(dim=2).numpy()            # new_means: [Hkv, n, D]
        self._means = np.concatenate([self._means, new_means], axis=1)
        faiss.omp_set_num_threads(self.threads)
        keys_np = keys.detach().cpu().float().numpy()                           # keys_np: [Hkv, n*C, D]
        total = self._num_tokens + keys.shape[1]
        for h, index in enumerate(self._heads):
            if not isinstance(index, faiss.IndexIVF) and total >= self.min_ivf_tokens:
                old = index.reconstruct_n(0, index.ntotal) if index.ntotal else keys_np[h][:0]  # [N, D]
                self._build_head(h, np.concatenate([old, keys_np[h]]), None)
            else:
                # faiss numbers added vectors ntotal, ntotal+1, ...: the token positions
                index.add(self._keys_space(h, keys_np[h]))                      # [n*C, D']
        self._num_tokens = total

    # -- selection -------------------------------------------------------------------------------
    def gpu_bytes(self, num_chunks: int) -> int:
        """The faiss index and its keys live in host RAM; the compute device holds only the build's k-means
        temporaries (one head at a time, on the GPU during prefill: scratch_bytes)."""
        return self.scratch_bytes(num_chunks)

    def scratch_bytes(self, num_chunks: int | None = None, budget: int = 0) -> int:
        """Device temporaries of one head's sampled k-means and key assignment at num_chunks (default: the
        context's max_chunks); 0 when lists come from prefill queries (faiss k-means on the host). Selection
        runs on the host (budget: unused)."""
        n = (self.max_chunks if num_chunks is None else num_chunks) * self.chunk_tokens
        nlist = self._nlist(n, n)
        if self.train_on != "keys" or n < self.min_ivf_tokens or nlist < 2:
            return 0
        return kmeans.scratch_bytes(n, nlist, self.head_dim, self.train_points)

    def reserve(self, num_chunks: int) -> None:
        """Nothing to reserve: faiss grows on the host, and a step with this index is never captured."""

    def graph_key(self):
        """None: faiss searches on the host, so a decode step with this index cannot be captured whole."""
        return None

    def select(self, query: torch.Tensor, budget: int) -> torch.Tensor:
        """query [Hq, D] -> best-first chunk ids int64 [Hkv, min(budget, num_chunks)] on the device."""
        check_budget(budget)
        self.wait()
        n = self.num_chunks
        k = min(int(budget), n)
        out = np.empty((self.num_kv_heads, k), dtype=np.int64)                  # out: [Hkv, k]
        if k == 0:
            return torch.from_numpy(out).to(self.device)
        q_np = query.detach().cpu().float().reshape(self.num_kv_heads, self.group_size, -1).numpy()  # [Hkv, G, D]
        k_tok = min(self._num_tokens, max(1, math.ceil(self.retrieve_factor * k * self.chunk_tokens)))
        recency = -np.arange(n, dtype=np.int64)                                 # newer chunks sort first
        for h, (dist, tok) in enumerate(self._search(q_np, k_tok)):             # dist, tok: [G, k_tok]
            votes = self._votes(h, q_np[h], dist, tok)                          # votes: [G, k_tok]
            hit = tok >= 0
            chunk_score = np.bincount(tok[hit] // self.chunk_tokens, weights=votes[hit], minlength=n)  # [n]
            out[h] = np.lexsort((recency, -chunk_score))[:k]
        return torch.from_numpy(out).to(self.device)                            # ids: [Hkv, k]

    def chunk_log_mass(self, query: torch.Tensor, cap: int) -> torch.Tensor:
        """Estimated log attention mass per chunk and query head -> float32 [Hkv, G, n] on the device.

        The retrieve_factor x cap x C nearest tokens of each query head give their chunks the logsumexp of
        their exact scaled q.k; every chunk also has log C + scale * q.mean (a lower bound by Jensen), and
        the larger of the two is kept. Runs on the host (the index syncs anyway).
        """
        self.wait()
        hkv, g, n = self.num_kv_heads, self.group_size, self.num_chunks
        q_np = query.detach().cpu().float().reshape(hkv, g, -1).numpy()          # q_np: [Hkv, G, D]
        lm = np.einsum("hgd,hnd->hgn", q_np, self._means[:, :n]) * self.scale + math.log(self.chunk_tokens)
        k_tok = min(self._num_tokens, max(1, math.ceil(self.retrieve_factor * int(cap) * self.chunk_tokens)))
        for h, (dist, tok) in enumerate(self._search(q_np, k_tok)):             # dist, tok: [G, k_tok]
            logit = self.scale * self._inner_products(h, q_np[h], dist)        # logit: [G, k_tok]
            for gi in range(g):
                hit = tok[gi] >= 0
                chunk = tok[gi][hit] // self.chunk_tokens                       # chunk: [hits]
                top = np.full(n, -np.inf)
                np.maximum.at(top, chunk, logit[gi][hit])
                shifted = np.exp(logit[gi][hit] - top[chunk])                  # stable per-chunk logsumexp
                lse = top + np.log(np.maximum(np.bincount(chunk, weights=shifted, minlength=n), 1e-300))
                lm[h, gi] = np.maximum(lm[h, gi], np.where(np.isfinite(top), lse, -np.inf))
        return torch.from_numpy(lm.astype(np.float32)).to(self.device)        # lm: [Hkv, G, n]

    def _search(self, q_np: np.ndarray, k_tok: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every head's k_tok nearest tokens for its query group q_np [Hkv, G, D] -> [(dist, tok) [G, k_tok]].

        A search is small (G queries), so heads run side by side on a thread pool (faiss releases the GIL),
        one OpenMP thread each, instead of one head at a time with OpenMP inside (measured 1 ms per head at
        32K keys, k = 2048, one core: the per-step cost is heads x layers of these)."""
        def one(h: int):
            faiss.omp_set_num_threads(1)                                        # per calling thread
            return self._heads[h].search(self._queries_space(h, q_np[h]), k_tok)
        workers = min(self.threads, self.num_kv_heads)
        if workers <= 1:
            return [one(h) for h in range(self.num_kv_heads)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="offload-ann-search")
        return list(self._pool.map(one, range(self.num_kv_heads)))

    def _inner_products(self, h: int, q: np.ndarray, dist: np.ndarray) -> np.ndarray:
        """faiss distances of q [G, D] -> exact q.k [G, k] (l2aug: |q'-k'|^2 = |q|^2 + M^2 - 2 q.k)."""
        ip = dist.astype(np.float64)
        if self._max_norm[h]:
            ip = ((q.astype(np.float64) ** 2).sum(axis=1, keepdims=True) + self._max_norm[h] ** 2 - ip) / 2
        return ip

    def _votes(self, h: int, q: np.ndarray, dist: np.ndarray, tok: np.ndarray) -> np.ndarray:
        if self.chunk_score == "count":
            return np.ones_like(dist, dtype=np.float64)
        ip = self._inner_products(h, q, dist)                                   # ip: [G, k_tok]
        ip = np.where(tok >= 0, ip, -np.inf)
        top = ip.max(axis=1, keepdims=True)                                     # top: [G, 1]
        w = np.exp(self.scale * (ip - np.where(np.isfinite(top), top, 0.0)))    # w: [G, k_tok]
        # each query head's share of the softmax mass among its retrieved tokens: with every token
        # retrieved, the group sum per chunk is exactly the chunk's attention mass
        total = w.sum(axis=1, keepdims=True)                                    # total: [G, 1]
        return w / np.where(total > 0, total, 1.0)

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return self._num_tokens // self.chunk_tokens

    @property
    def nbytes(self) -> dict[str, int]:
        self.wait()
        host = self._means.nbytes
        for index in self._heads:
            if isinstance(index, faiss.IndexIVF):
                host += index.ntotal * (index.code_size + 8) + index.nlist * index.d * 4
            else:
                host += index.ntotal * index.d * 4
        return {"gpu": 0, "host": host}
