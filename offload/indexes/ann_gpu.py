"""DeviceANNIndex: the ANN index's IVF lists scored on the compute device (`--index ann`, option search="gpu").

The host mode (ann.py, ann_search.py) scans the probed lists' float32 keys with faiss: ~3.6 GB of cold lists a token
at 128K, and one host round trip per layer, which keeps the decode step from being one CUDA graph (bench/RESULTS.md,
"ANN at 128K"). Here decode reads no key: every token keeps the id of its IVF list on the device (int16 [Hkv, N]:
2 MiB a layer at 128K) and a chunk is scored through its tokens' centroids,

    score[h, c] = sum over the query group g of h of  sum_{t in c} exp(scale q_g.cent[list t]) / sum_{all t} (same)

i.e. each query head's softmax over the keys with every key replaced by its list's centroid (the host mode's
"expsum" votes, as if every token were retrieved, at centroid resolution), summed over the group; then the top-k
chunks, ranked by the log of that sum (no underflow ties). Per layer: one matmul against the centroids, exp of the
[Hq, nlist] logits, and one embedding_bag that sums each chunk's C entries (a gather of 2-byte list ids: ~2 MiB read
a layer at 128K). Fixed shapes, a device-side chunk count and no host sync: the decode step is one CUDA graph.
Measured and dropped (bench/RESULTS.md): a per-token residual term (Gaussian mean or Cauchy-Schwarz bound of
q.(k - centroid)), a second residual codebook.

Lists: sampled k-means in torch on the keys' device (kmeans.py, as the host mode; space "l2" on the keys, or "l2aug"
[k, sqrt(M^2 - |k|^2)]), trained by build() and kept: extend() files new keys under their nearest centroid. The
estimate is only as fine as the lists, so there are many more than the host mode's 2 sqrt(N): N/8 a head (8 keys a
list), at most MAX_LISTS (on SmolLM2 at 8K, 181 / 512 / 1024 lists: recall of the selectable mass 0.76 / 0.85 / 0.89,
teacher-forced KL 0.091 / 0.072 / 0.037; bench/RESULTS.md). The cap bounds the centroids (8 MiB a layer) and the
prefill's k-means (~0.5 TFLOP a head at 128K). Below min_ivf_tokens a layer is exact (every key is its own centroid) until an extend()
crosses it. Buffers are sized once for max_chunks (the planner counts them: gpu_bytes). faiss is not used.
"""
from __future__ import annotations

import math

import torch

from offload import kernels
from offload.errors import ConfigError
from offload.indexes import kmeans
from offload.indexes._common import check_budget, check_choice, check_shape_args, split_chunks

MAX_LISTS = 2048       # lists a head by default: N/8 up to this

class DeviceANNIndex:
    """IVF list ids per token and centroids per KV head, on the compute device; chunks scored by centroid mass."""

    def __init__(self, num_kv_heads: int, num_q_heads: int, head_dim: int, chunk_tokens: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                 search: str = "gpu", space: str = "l2", nlist: int = 0,
                 min_ivf_tokens: int = 512, train_points: int = 32, norm_headroom: float = 1.2,
                 scale: float | None = None, seed: int = 0, max_chunks: int = 0):
        self.group_size = check_shape_args(num_kv_heads, num_q_heads, head_dim, chunk_tokens)
        check_choice("search", search, ("host", "gpu"))
        if search != "gpu":
            raise ConfigError("DeviceANNIndex is the search='gpu' mode; make_index('ann') builds the host one")
        check_choice("space", space, ("l2", "l2aug"))
        if nlist == 1 or train_points < 4:
            raise ConfigError(f"ann options out of range (nlist={nlist}, train_points={train_points}); use nlist 0 "
                              f"(N/8, at most {MAX_LISTS}) or >= 2 and train_points >= 4 in index_options")
        self.num_kv_heads, self.num_q_heads, self.head_dim = num_kv_heads, num_q_heads, head_dim
        self.chunk_tokens, self.device, self.dtype = chunk_tokens, torch.device(device), dtype
        self.space, self.nlist = space, int(nlist)
        self.min_ivf_tokens, self.train_points, self.seed = int(min_ivf_tokens), int(train_points), seed
        self.norm_headroom = max(1.0, float(norm_headroom))
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
        self.max_chunks = max(0, int(max_chunks))     # buffers never grow past the context's chunk count
        self.dim = head_dim + (space == "l2aug")      # D': the k-means space (l2aug: one extra coordinate)
        self._count = torch.zeros(1, dtype=torch.long, device=self.device)   # _count: [1] chunks, on the device
        self._used = torch.zeros(1, dtype=torch.long, device=self.device)    # _used: [1] centroid rows in use
        self._alloc(0)

    # -- sizes and buffers ------------------------------------------------------------------------------
    def _nlist_at(self, n: int) -> int:
        """Lists per head an IVF over n keys gets; 0 = exact (every key its own centroid)."""
        if n < max(self.min_ivf_tokens, 16):
            return 0
        return min(self.nlist or MAX_LISTS, n // 8)

    def _rows(self, tokens: int) -> int:
        """Centroid rows any state up to `tokens` keys needs: the exact state's keys, or the lists."""
        return max(min(tokens, max(self.min_ivf_tokens, 16) - 1), self._nlist_at(tokens), 1)

    def _list_dtype(self, rows: int) -> torch.dtype:
        return torch.int16 if rows <= torch.iinfo(torch.int16).max else torch.int32

    def _buffer_bytes(self, tokens: int) -> int:
        rows = self._rows(tokens)
        per_token = self._list_dtype(rows).itemsize
        return self.num_kv_heads * (tokens * per_token + rows * self.dim * 4) + 16   # + _count, _used

    def _alloc(self, tokens: int) -> None:
        """Empty buffers for `tokens` keys (zeros: an unwritten token points at list 0, a real row)."""
        hkv, dev, rows = self.num_kv_heads, self.device, self._rows(tokens)
        self._cents = torch.zeros(hkv, rows, self.dim, device=dev)                 # _cents: [Hkv, R, D']
        self._lists = torch.zeros(hkv, tokens, dtype=self._list_dtype(rows), device=dev)  # _lists: [Hkv, T]
        self._n, self._nl = 0, 0                   # keys filed; lists per head (0: exact)
        self._max_norm = [0.0] * hkv               # M of l2aug per head (0: none)
        self._count.zero_()
        self._used.zero_()

    def reserve(self, num_chunks: int) -> None:
        """Room for num_chunks without regrowth (buffers keep their address, so captured steps stay valid)."""
        if self.max_chunks:
            num_chunks = min(num_chunks, self.max_chunks)
        self._grow(num_chunks * self.chunk_tokens)

    def _grow(self, tokens: int) -> None:
        """Buffers for `tokens` keys, the filed ones copied over (nothing happens when they are large enough)."""
        if tokens <= self._lists.shape[1] and self._rows(tokens) <= self._cents.shape[1]:
            return
        old = (self._cents, self._lists, self._n, self._nl, self._max_norm)
        self._alloc(max(tokens, self._lists.shape[1]))
        cents, lists, n, nl, norms = old
        self._cents[:, :cents.shape[1]] = cents
        self._lists[:, :n] = lists[:, :n].to(self._lists.dtype)
        self._n, self._nl, self._max_norm = n, nl, norms
        self._count.fill_(n // self.chunk_tokens)
        self._used.fill_(nl or n)

    def gpu_bytes(self, num_chunks: int) -> int:
        """Compute-device bytes at num_chunks chunks: the list id of every key, the centroid rows,
        plus one build's k-means temporaries (scratch_bytes)."""
        return self._buffer_bytes(num_chunks * self.chunk_tokens) + self.scratch_bytes()

    def scratch_bytes(self, num_chunks: int | None = None, budget: int = 0) -> int:
        """Temporaries of one head's sampled k-means and filing at num_chunks (default max_chunks); with budget, also
        one select's: the centroid logits and exps, every key's int32 row of them (+ embedding_bag's per-key
        bookkeeping), the chunk sums and their logs."""
        tokens = (self.max_chunks if num_chunks is None else num_chunks) * self.chunk_tokens
        nl = self._nlist_at(tokens)
        build = kmeans.scratch_bytes(tokens, nl, self.head_dim, self.train_points) if nl else 0
        if nl and self.device.type != "cuda":      # k-means's cell sums on the CPU: an int64 one-hot slab + float copy
            build += min(tokens, kmeans._slab_rows(nl)) * nl * 12
        # + the exact state's keys widened when the lists are trained from them, and one extend's keys
        build += self.num_kv_heads * min(tokens, max(self.min_ivf_tokens, 16)) * self.dim * 4 * 2
        if not num_chunks or not budget:
            return build
        hkv, g, rows = self.num_kv_heads, self.group_size, self._rows(tokens)
        select = (3 * hkv * tokens * 4 + 5 * hkv * g * rows * 4
                  + 6 * hkv * num_chunks * g * 4 + 4 * hkv * num_chunks * 8)
        return max(build, select)

    def graph_key(self):
        """What a captured `select` depends on besides the device-side counts: the buffers' addresses and sizes."""
        return (self._cents.data_ptr(), self._cents.shape[1], self._lists.data_ptr(), self._lists.shape[1])

    @property
    def num_chunks(self) -> int:
        return self._n // self.chunk_tokens

    @property
    def nbytes(self) -> dict[str, int]:
        gpu = sum(t.numel() * t.element_size() for t in (self._cents, self._lists))
        return {"gpu": gpu + 16, "host": 0}

    # -- building --------------------------------------------------------------------------------------
    def build(self, keys: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        """Index keys [Hkv, N, D] (queries are not used); buffers sized once for max_chunks."""
        split_chunks(keys, self.num_kv_heads, self.head_dim, self.chunk_tokens)   # shape check
        self._alloc(max(self.max_chunks * self.chunk_tokens, keys.shape[1]))
        self._add(keys)

    def extend(self, keys: torch.Tensor) -> None:
        """Append full chunks keys [Hkv, n*C, D]: filed under their nearest centroid (no retraining); an exact
        layer that reaches min_ivf_tokens gets its lists then, from every key so far."""
        split_chunks(keys, self.num_kv_heads, self.head_dim, self.chunk_tokens)
        if keys.shape[1]:
            self._add(keys)

    def _add(self, keys: torch.Tensor) -> None:
        n, m = self._n, keys.shape[1]
        total = n + m
        if total > self._lists.shape[1]:
            self._grow(max(total, min(2 * self._lists.shape[1], self.max_chunks * self.chunk_tokens or 1 << 62)))
        keys = keys.detach().to(self.device)                                     # keys: [Hkv, m, D]
        if not self._nl and self._nlist_at(total):
            # the lists are trained now, on every key so far (an exact layer keeps its keys as centroids)
            every = keys if n == 0 else torch.cat([self._cents[:, :n, :self.head_dim], keys.float()], 1)
            self._train(every)                                                   # every: [Hkv, total, D]
        else:
            for h in range(self.num_kv_heads):
                if self._nl:
                    x = kmeans.augment(keys[h], self._max_norm[h])               # x: [m, D']
                    lists = kmeans.assign(x, self._cents[h, :self._nl], spherical=False)  # lists: [m]
                else:
                    self._cents[h, n:total, :self.head_dim] = keys[h].float()   # exact: each key its own row
                    lists = torch.arange(n, total, device=self.device)
                self._lists[h, n:total] = lists.to(self._lists.dtype)
        self._n = total
        self._count.fill_(total // self.chunk_tokens)
        self._used.fill_(self._nl or total)

    def _train(self, keys: torch.Tensor) -> None:
        """Lists of keys [Hkv, N, D] by sampled k-means, one head at a time, into the centroid buffer; every key
        filed under its nearest centroid."""
        nl = self._nlist_at(keys.shape[1])
        self._cents.zero_()
        for h in range(self.num_kv_heads):
            norm = self.norm_headroom * kmeans.max_norm(keys[h]) if self.space == "l2aug" else 0.0
            cents, lists = kmeans.ivf_lists(keys[h], nl, max_norm=norm, spherical=False,
                                            points_per_list=self.train_points, seed=self.seed)
            self._cents[h, :nl] = cents                                          # cents: [nl, D']
            self._max_norm[h] = norm
            self._nl = nl
            self._lists[h, :keys.shape[1]] = lists.to(self._lists.dtype)         # lists: [N]

    # -- selection -------------------------------------------------------------------------------------
    def select(self, query: torch.Tensor, budget: int) -> torch.Tensor:
        """query [Hq, D] -> best-first chunk ids int64 [Hkv, min(budget, num_chunks)] on the device."""
        check_budget(budget)
        k = min(int(budget), self.num_chunks)
        if k == 0:
            return torch.empty((self.num_kv_heads, 0), dtype=torch.long, device=self.device)
        return kernels.topk_rows(self.chunk_scores(query), self._count, k)        # ids: [Hkv, k]

    def chunk_scores(self, query: torch.Tensor) -> torch.Tensor:
        """Each allocated chunk's estimated attention mass, summed over the query group, as a log -> float32 [Hkv, cap]
        (-inf past the count): the share of each query head's softmax over every key, keys at their centroids."""
        lse = self.chunk_log_mass(query)                                         # lse: [Hkv, G, cap]
        share = lse - torch.logsumexp(lse, dim=2, keepdim=True)                  # share: [Hkv, G, cap] (log)
        return torch.logsumexp(share, dim=1)                                     # [Hkv, cap]

    def chunk_log_mass(self, query: torch.Tensor, cap: int = 0) -> torch.Tensor:
        """log of sum_{t in chunk} exp(scale q.centroid(t)) per chunk and query head -> float32 [Hkv, G, cap] (-inf
        past the device-side count; fixed shape, no host sync). cap: unused (every chunk is scored)."""
        hkv, g, c = self.num_kv_heads, self.group_size, self.chunk_tokens
        rows, n = self._cents.shape[1], self._lists.shape[1] // c
        q = query.detach().to(self.device).float().reshape(hkv, g, self.head_dim)  # q: [Hkv, G, D]
        qx = torch.nn.functional.pad(q, (0, self.dim - self.head_dim))           # qx: [Hkv, G, D']
        s = torch.bmm(qx, self._cents.transpose(1, 2)) * self.scale               # s: [Hkv, G, R]
        s = s.masked_fill(torch.arange(rows, device=s.device) >= self._used, float("-inf"))
        top = s.amax(dim=2, keepdim=True)                                         # top: [Hkv, G, 1]
        top = torch.where(torch.isfinite(top), top, 0.0)
        e = torch.exp(s - top).transpose(1, 2).reshape(hkv * rows, g)             # e: [Hkv * R, G] per list
        offsets = torch.arange(hkv, device=s.device, dtype=torch.int32)[:, None] * rows  # offsets: [Hkv, 1]
        bags = (self._lists + offsets).reshape(hkv * n, c)                        # bags: [Hkv * n, C] int32 rows of e
        sums = torch.nn.functional.embedding_bag(bags, e, mode="sum")             # sums: [Hkv * n, G]
        sums = sums.reshape(hkv, n, g).transpose(1, 2)                            # sums: [Hkv, G, n]
        written = torch.arange(n, device=s.device) < self._count                 # written: [n]
        return torch.where(written, torch.log(sums) + top, torch.full((), float("-inf"), device=s.device))
