"""The decode half of FaissANNIndex (offload/indexes/ann.py): probe, scan and chunk votes.

Each query head probes the nearest IVF lists of its own KV head (on the GPU when the query is there: the centroids
are a few MiB, and only the query and the probed list ids cross to the host, through reused pinned buffers), one
faiss `search_preassigned` call scans them for every query head (parallel_mode 3 spreads the heads over faiss's
pool), and the retrieved tokens vote for their chunks on the host; the ids go back without a host sync. The build
half (k-means, filing, extend) stays in ann.py; this mixin reads the attributes it sets (_ivf, _flat, _centroids,
_cents_t, _cents_sq, _dev_cents, _host_bufs, _copied, select_split, _means, _max_norm, _num_tokens) and its
options (scale, chunk_score, retrieve_factor, nprobe, probe_fraction, space, search_threads).
"""
from __future__ import annotations

import math
import time

import faiss
import numpy as np
import torch

from offload.indexes._common import check_budget


def best_first(score: np.ndarray, k: int) -> np.ndarray:
    """Per row of score [H, n] (>= 0), the columns of the k largest best first, ties newest (largest column) first
    -> int64 [H, k]; the same as np.lexsort((-col, -score), axis=1)[:, :k]. Only the positive entries (the chunks
    that got votes: a few hundred of 4K per head at 128K) are sorted, and a row with fewer than k of them is
    filled with its newest zero columns (a full sort of 8 x 4K chunks took ~1.2 ms, more than the rest of a
    128K select's host work; np.partition on the mostly-zero rows was slower still)."""
    h, n = score.shape
    k = min(int(k), n)
    flat = np.flatnonzero(score > 0)                                           # flat: [V] = row * n + col
    row, col = flat // n, flat % n                                             # row, col: [V]
    order = np.lexsort((-col, -score.ravel()[flat], row))                      # by row, score desc, col desc
    row, col = row[order], col[order]
    voted = np.bincount(row, minlength=h)                                      # voted: [H]
    rank = np.arange(len(row)) - (np.cumsum(voted) - voted)[row]               # rank: [V] within its row
    if (voted >= k).all():
        return np.ascontiguousarray(col[rank < k].reshape(h, k), dtype=np.int64)
    out = np.empty((h, k), np.int64)
    keep = rank < k
    out[row[keep], rank[keep]] = col[keep]
    # rows with fewer than k votes (common: a query group's 4 x 592 tokens often sit in < 74 chunks): the newest
    # zero columns follow; the last min(n, 2k) columns hold enough of them, since such a row has < k votes
    took = np.minimum(voted, k)                                                # took: [H]
    w = min(n, 2 * k)
    zero = score[:, n - w:][:, ::-1] <= 0                                      # zero: [H, w] newest first
    nth = np.cumsum(zero, axis=1)                                              # nth: [H, w] 1-based
    r, c = np.nonzero(zero & (nth <= (k - took)[:, None]))
    out[r, took[r] + nth[r, c] - 1] = n - 1 - c
    return out


class IVFSearch:
    """select / chunk_log_mass of FaissANNIndex (see the module docstring)."""

    def select(self, query: torch.Tensor, budget: int) -> torch.Tensor:
        """query [Hq, D] -> best-first chunk ids int64 [Hkv, min(budget, num_chunks)] on the device."""
        check_budget(budget)
        self.wait()
        hkv, n = self.num_kv_heads, self.num_chunks
        k = min(int(budget), n)
        if k == 0:
            return torch.empty((hkv, 0), dtype=torch.long, device=self.device)
        t0 = time.perf_counter()
        if self._ivf is not None and query.is_cuda:
            # the coarse step where the query already is: only the probed lists cross to the host, and no numpy
            # BLAS call (whose spinning pool competed with faiss's) runs on the host per layer
            q_np, lists, dis = self._probe_on_device(query)                    # [Hkv, G, D], [Hq, probe] x2
            t1 = time.perf_counter()
            ip, tok = self._scan(q_np, lists, dis, self._tokens_for(k))        # ip, tok: [Hkv, G, k_tok]
            t2 = time.perf_counter()
            # votes and ranking on the GPU too: the retrieved tokens go up (no host sync), the host ranks nothing
            ids = self._rank_torch(*self._upload(ip=ip, tok=tok), k)           # ids: [Hkv, k]
        else:
            q_np = self._host_query(query)                                     # q_np: [Hkv, G, D]
            t1 = time.perf_counter()
            ip, tok = self._search(q_np, self._tokens_for(k))
            t2 = time.perf_counter()
            score = self._chunk_votes(ip, tok)                                 # score: [Hkv, n]
            ids = self._upload(ids=best_first(score, k))[0]                   # ids: [Hkv, k]
        split = self.select_split       # wall seconds: to_host (GPU probe, copies and the wait for the GPU's
        split["to_host"] += t1 - t0     # queue, or the query's copy), search (faiss; + the numpy probe on the
        split["search"] += t2 - t1      # host path), rank (votes + ranking queued on the GPU, or run here)
        split["rank"] += time.perf_counter() - t2
        return ids

    def _upload(self, **arrays: np.ndarray) -> list[torch.Tensor]:
        """Host arrays -> fresh tensors on the compute device; on a GPU through pinned buffers reused across steps,
        queued without a host sync (the buffers are rewritten once the previous call's copies are done)."""
        if self.device.type != "cuda":
            return [torch.from_numpy(a).to(self.device) for a in arrays.values()]
        if self._copied is not None:
            self._copied.synchronize()              # the previous call's copies out of the buffers (long done)
        out = []
        for name, a in arrays.items():
            buf = self._pinned(name, a.shape, torch.from_numpy(np.empty(0, a.dtype)).dtype)
            buf.numpy()[...] = a
            out.append(buf.to(self.device, non_blocking=True))
        self._copied = self._copied or torch.cuda.Event()                     # one event, recorded again each call
        self._copied.record()
        return out

    def _rank_torch(self, ip: torch.Tensor, tok: torch.Tensor, k: int) -> torch.Tensor:
        """_chunk_votes + best_first in torch on ip's device: retrieved q.k float64 and positions int64 [Hkv, G,
        k_tok] -> chunk ids int64 [Hkv, k], score descending, ties and unvoted chunks newest first. The same float64
        arithmetic as the numpy path (exp and sums may round the last bit differently: only chunks whose scores tie
        to that bit could swap)."""
        hkv, n = self.num_kv_heads, self.num_chunks
        hit = tok >= 0
        if self.chunk_score == "count":
            votes = hit.double()                                               # votes: [Hkv, G, k_tok]
        else:
            logit = torch.where(hit, self.scale * ip, float("-inf"))           # logit: [Hkv, G, k_tok]
            top = logit.amax(dim=2, keepdim=True)                              # top: [Hkv, G, 1]
            votes = torch.exp(logit - torch.where(torch.isfinite(top), top, 0.0))
            votes = votes / votes.sum(dim=2, keepdim=True).clamp(min=1e-300)
        where = torch.arange(hkv, device=ip.device)[:, None, None] * n + tok.clamp(min=0) // self.chunk_tokens
        score = torch.zeros(hkv * n, dtype=torch.float64, device=ip.device)
        score.index_add_(0, where.reshape(-1), torch.where(hit, votes, 0.0).reshape(-1))   # score: [Hkv * n]
        # newest first among equals: a stable descending sort of the columns reversed (unvoted chunks score 0, last)
        order = torch.sort(score.reshape(hkv, n).flip(1), dim=1, descending=True, stable=True).indices[:, :k]
        return n - 1 - order                                                   # ids: [Hkv, k]

    def _pinned(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """A page-locked host buffer of this index, reused across steps (reallocated when its shape changes)."""
        bufs = self._host_bufs
        if name not in bufs or tuple(bufs[name].shape) != tuple(shape):
            bufs[name] = torch.empty(tuple(shape), dtype=dtype, pin_memory=True)
        return bufs[name]

    def _device_centroids(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """_cents_t [Hkv, D, nlist], _cents_sq [Hkv, 1, nlist] (float32) and each query head's first list id
        [Hq, 1] on the device, made once per build."""
        if self._dev_cents is None or self._dev_cents[0].device != device:
            hkv, nlist = self._cents_t.shape[0], self._cents_t.shape[2]
            first = (torch.arange(hkv, device=device) * nlist).repeat_interleave(self.group_size)[:, None]  # [Hq, 1]
            self._dev_cents = (torch.from_numpy(self._cents_t).to(device), torch.from_numpy(self._cents_sq).to(device),
                               first)
        return self._dev_cents

    def _probe_count(self, nlist: int) -> int:
        return min(nlist, self.nprobe or max(1, math.ceil(self.probe_fraction * nlist)))

    def _probe_torch(self, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """_probe in torch on the query's device: query [Hq, D] -> (lists int64, coarse distances float32), both
        [Hq, probe], nearest first. The same float32 arithmetic as _probe (BLAS vs cuBLAS may round the last bit
        of a distance differently: a list tied with the probe-th to that bit may swap)."""
        hkv, g = self.num_kv_heads, self.group_size
        nlist = self._centroids.shape[1]
        cents_t, cents_sq, first = self._device_centroids(query.device)        # [Hkv, D, nlist], [Hkv, 1, nlist], [Hq, 1]
        q = query.detach().float().reshape(hkv, g, -1)                         # q: [Hkv, G, D]
        s = torch.bmm(q, cents_t)                                              # s: [Hkv, G, nlist]
        ip = self.space == "ip"
        order = -s if ip else (q * q).sum(dim=2, keepdim=True) - 2 * s + cents_sq  # order: [Hkv, G, nlist]
        near, lists = torch.topk(order.reshape(hkv * g, nlist), self._probe_count(nlist), dim=1, largest=False)
        return lists + first, (-near if ip else near)                          # [Hq, probe] each

    def _probe_on_device(self, query: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """query [Hq, D] on a GPU -> host (query float32 [Hkv, G, D], lists int64 [Hq, probe], distances float32
        [Hq, probe]): the probe on the GPU, three small copies into pinned buffers, one wait."""
        lists, dis = self._probe_torch(query)                                  # lists, dis: [Hq, probe]
        q = self._pinned("q", query.shape, torch.float32)                      # q: [Hq, D]
        host_lists = self._pinned("lists", lists.shape, torch.int64)
        host_dis = self._pinned("dis", dis.shape, torch.float32)
        q.copy_(query.detach().float(), non_blocking=True)      # widened on the GPU, as _host_query
        host_lists.copy_(lists, non_blocking=True)
        host_dis.copy_(dis, non_blocking=True)
        torch.cuda.current_stream(query.device).synchronize()
        return q.numpy().reshape(self.num_kv_heads, self.group_size, -1), host_lists.numpy(), host_dis.numpy()

    def _host_query(self, query: torch.Tensor) -> np.ndarray:
        """query [Hq, D] (any device) -> float32 [Hkv, G, D] on the host (heads h*G.. form KV head h's group)."""
        return query.detach().float().cpu().reshape(self.num_kv_heads, self.group_size, -1).numpy()

    def _chunk_votes(self, ip: np.ndarray, tok: np.ndarray) -> np.ndarray:
        """Retrieved tokens' q.k and positions [Hkv, G, k_tok] -> float64 chunk scores [Hkv, n] (>= 0)."""
        hkv, n = self.num_kv_heads, self.num_chunks
        hit = tok >= 0
        every = bool(hit.all())          # the usual case: no -1 padding, so no masking copies
        if self.chunk_score == "count":
            votes = hit.astype(np.float64)
        else:
            # each query head's share of the softmax mass among its retrieved tokens: with every token
            # retrieved, the group sum per chunk is exactly the chunk's attention mass
            logit = self.scale * ip if every else np.where(hit, self.scale * ip, -np.inf)  # logit: [Hkv, G, k_tok]
            top = logit.max(axis=2, keepdims=True)                             # top: [Hkv, G, 1]
            votes = np.exp(logit - (top if every else np.where(np.isfinite(top), top, 0.0)))
            votes /= np.maximum(votes.sum(axis=2, keepdims=True), 1e-300)
        where = np.arange(hkv)[:, None, None] * n + tok // self.chunk_tokens   # where: [Hkv, G, k_tok]
        if every:
            return np.bincount(where.ravel(), weights=votes.ravel(), minlength=hkv * n).reshape(hkv, n)
        return np.bincount(where[hit], weights=votes[hit], minlength=hkv * n).reshape(hkv, n)

    def _tokens_for(self, chunks: int) -> int:
        return min(self._num_tokens, max(1, math.ceil(self.retrieve_factor * chunks * self.chunk_tokens)))

    def chunk_log_mass(self, query: torch.Tensor, cap: int) -> torch.Tensor:
        """Estimated log attention mass per chunk and query head -> float32 [Hkv, G, n] on the device.

        The retrieve_factor x cap x C nearest tokens of each query head give their chunks the logsumexp of
        their exact scaled q.k; every chunk also has log C + scale * q.mean (a lower bound by Jensen), and
        the larger of the two is kept. Runs on the host (the index syncs anyway).
        """
        self.wait()
        hkv, g, n = self.num_kv_heads, self.group_size, self.num_chunks
        q_np = self._host_query(query)                                         # q_np: [Hkv, G, D]
        means_t = self._means[:, :n].transpose(0, 2, 1)                        # means_t: [Hkv, D, n] (a view)
        lm = np.matmul(q_np, means_t) * self.scale + math.log(self.chunk_tokens)  # lm: [Hkv, G, n] (BLAS)
        if n == 0:
            return torch.from_numpy(lm.astype(np.float32)).to(self.device)
        ip, tok = self._search(q_np, self._tokens_for(int(cap)))               # ip, tok: [Hkv, G, k_tok]
        hit = tok >= 0
        # shifted by each query head's best retrieved logit (one max per row, not np.maximum.at per chunk, which
        # cost milliseconds): a chunk whose tokens all sit > ~700 below it underflows to -inf, i.e. a share
        # below e^-700, and keeps its Jensen bound from the mean below
        logit = np.where(hit, self.scale * ip, -np.inf)                        # logit: [Hkv, G, k_tok]
        top = logit.max(axis=2, keepdims=True)                                 # top: [Hkv, G, 1]
        top = np.where(np.isfinite(top), top, 0.0)
        row = (np.arange(hkv * g).reshape(hkv, g, 1) * n + tok // self.chunk_tokens)[hit]  # row: [hits]
        total = np.bincount(row, weights=np.exp(logit - top)[hit], minlength=hkv * g * n).reshape(hkv, g, n)
        with np.errstate(divide="ignore"):
            lse = top + np.log(total)                                          # lse: [Hkv, G, n], -inf: no hit
        return torch.from_numpy(np.maximum(lm, lse).astype(np.float32)).to(self.device)  # lm: [Hkv, G, n]

    def _search(self, q_np: np.ndarray, k_tok: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query head's k_tok nearest tokens within its KV head: q_np [Hkv, G, D] -> (exact q.k float64,
        token positions int64, -1 where fewer were found), both [Hkv, G, k_tok]."""
        faiss.omp_set_num_threads(self.search_threads)
        if self._ivf is None:      # exact flat: a few thousand keys at most per head
            found = [f.search(np.ascontiguousarray(q_np[h], dtype=np.float32), k_tok) for h, f in enumerate(self._flat)]
            return (np.stack([d for d, _ in found]).astype(np.float64), np.stack([t for _, t in found]))
        return self._scan(q_np, *self._probe(q_np), k_tok)

    def _probe(self, q_np: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The coarse step: each query head's nearest lists of its own KV head -> (lists int64, their coarse
        distances float32), both [Hq, probe] as faiss takes them (one batched matmul, one partition)."""
        hkv, g = q_np.shape[:2]
        nlist = self._centroids.shape[1]
        probe = self._probe_count(nlist)
        s = np.matmul(q_np, self._cents_t)                                     # s: [Hkv, G, nlist] (BLAS)
        if self.space == "ip":
            coarse = s
        else:
            coarse = (q_np * q_np).sum(axis=2, keepdims=True) - 2 * s + self._cents_sq  # |q' - c|^2
        order = (-coarse if self.space == "ip" else coarse).reshape(hkv * g, nlist)  # order: [Hq, nlist]
        # the probe-th smallest per row, then every list at or below it: np.partition + a mask took ~0.15 ms where
        # np.argpartition on the same 32 rows took ~0.45 ms; a tie at the threshold falls back to argpartition
        kth = np.partition(order, probe - 1, axis=1)[:, probe - 1, None]       # kth: [Hq, 1]
        near = order <= kth                                                    # near: [Hq, nlist]
        if near.sum() == hkv * g * probe:
            lists = np.nonzero(near)[1].reshape(hkv * g, probe)                # lists: [Hq, probe]
        else:
            lists = np.argpartition(order, probe - 1, axis=1)[:, :probe]
        dis = np.take_along_axis(coarse.reshape(hkv * g, nlist), lists, axis=1)  # dis: [Hq, probe]
        # nearest lists first: the result heap fills with good tokens early and later ones rarely enter it (the
        # heap of 592 tokens, not the distances, is most of faiss's time; ~10% less than an arbitrary order)
        first = np.argsort(np.take_along_axis(order, lists, axis=1), axis=1)   # first: [Hq, probe] (ip: -s)
        dis = np.take_along_axis(dis, first, axis=1)
        lists = np.take_along_axis(lists, first, axis=1) + np.repeat(np.arange(hkv) * nlist, g)[:, None]
        return lists.astype(np.int64), np.ascontiguousarray(dis, dtype=np.float32)

    def _scan(self, q_np: np.ndarray, lists: np.ndarray, dis: np.ndarray, k_tok: int) -> tuple[np.ndarray, np.ndarray]:
        """One faiss search_preassigned over the probed lists of every query head (parallel_mode 3: the query
        heads spread over faiss's pool) -> (q.k float64, positions int64), both [Hkv, G, k_tok]."""
        hkv, g = q_np.shape[:2]
        faiss.omp_set_num_threads(self.search_threads)
        xq = self._queries_space(q_np)                                         # xq: [Hkv, G, D']
        self._ivf.nprobe = lists.shape[1]
        d, tok = self._ivf.search_preassigned(xq.reshape(hkv * g, -1), k_tok, lists, dis)  # d, tok: [Hq, k_tok]
        d, tok = d.reshape(hkv, g, k_tok).astype(np.float64), tok.reshape(hkv, g, k_tok)
        if self.space == "ip":
            return d, tok
        # l2aug: |q'-k'|^2 = |q|^2 + M^2 - 2 q.k
        q2 = (q_np.astype(np.float64) ** 2).sum(axis=2, keepdims=True)         # q2: [Hkv, G, 1]
        return (q2 + self._max_norm[:, None, None] ** 2 - d) / 2, tok
