"""Sampled k-means for the ANN index's IVF lists, in torch on the keys' device (issue 13, deliverable 4).

faiss-cpu's k-means over every key (one OpenMP thread in the background builder) took minutes per layer at 128K;
the index was unusable past ~8K. Here each KV head trains on a sample of `points_per_list` x nlist of its keys and
then assigns every key to its nearest centroid, both as matmuls in bounded slabs on the device that holds the keys:
on a GPU during prefill that is milliseconds per layer (~0.6 TFLOP for 8 heads at 128K), and faiss only files the
pre-assigned keys into its lists on the host (`faiss.contrib.ivf_tools.add_preassigned`), on a background thread.

Spaces: "l2aug" keys become [k, sqrt(M^2 - |k|^2)] (inner product -> L2, see ann.py) and centroids are L2 means;
"ip" is spherical k-means (unit centroids, nearest = largest inner product).
"""
from __future__ import annotations

import torch

SLAB_BYTES = 32 << 20          # scores of one slab of rows against every centroid: bounds the device temporaries


def augment(k: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Keys [n, D] -> float32 [n, D+1] = [k, sqrt(M^2 - |k|^2)] (max_norm M > 0), else float32 [n, D]."""
    k = k.float()                                                            # k: [n, D]
    if not max_norm:
        return k
    extra = (max_norm ** 2 - (k * k).sum(dim=1, keepdim=True)).clamp_min(0).sqrt()  # extra: [n, 1]
    return torch.cat([k, extra], dim=1)                                      # [n, D+1]


def max_norm(k: torch.Tensor) -> float:
    """Largest L2 norm of the rows of k [N, D], in slabs (no float32 copy of every key)."""
    rows = max(1, SLAB_BYTES // (4 * k.shape[1]))
    return max(float(k[a:a + rows].float().norm(dim=1).max()) for a in range(0, k.shape[0], rows))


def _slab_rows(nlist: int) -> int:
    return max(256, SLAB_BYTES // (4 * max(nlist, 1)))


def assign(x: torch.Tensor, centroids: torch.Tensor, spherical: bool) -> torch.Tensor:
    """Nearest centroid of every row: x [n, D'] float32, centroids [nlist, D'] -> int64 [n]."""
    half_norm = 0.5 * (centroids * centroids).sum(dim=1)                     # half_norm: [nlist]
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)         # out: [n]
    rows = _slab_rows(centroids.shape[0])
    for a in range(0, x.shape[0], rows):
        s = x[a:a + rows] @ centroids.T                                      # s: [rows, nlist]
        if not spherical:
            s -= half_norm                                                   # argmin |x-c|^2 = argmax x.c - |c|^2/2
        out[a:a + rows] = s.argmax(dim=1)
    return out


def _sums(x: torch.Tensor, a: torch.Tensor, nlist: int) -> torch.Tensor:
    """Sum of the rows of x [S, D'] per list a [S] -> [nlist, D']. On the CPU as one-hot matmuls in slabs:
    torch's multi-threaded index_add_ took ~90 ms where one thread took 0.4 ms (11K rows, 2 threads)."""
    if x.is_cuda:
        return torch.zeros(nlist, x.shape[1], device=x.device).index_add_(0, a, x)
    out = torch.zeros(nlist, x.shape[1])
    rows = _slab_rows(nlist)
    for s in range(0, x.shape[0], rows):
        hot = torch.nn.functional.one_hot(a[s:s + rows], nlist).float()      # hot: [rows, nlist]
        out += hot.T @ x[s:s + rows]                                         # [nlist, D']
    return out


def ivf_lists(keys: torch.Tensor, nlist: int, *, max_norm: float, spherical: bool, points_per_list: int,
              niter: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One head's keys [N, D] -> (centroids float32 [nlist, D'], list of every key int64 [N]), on keys' device.

    Lloyd's iterations over a random sample of points_per_list * nlist keys; a centroid left empty is re-seeded
    at a random sample point (no host sync, so the work stays queued on the device)."""
    n, dev = keys.shape[0], keys.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    pick = torch.randperm(n, generator=gen, device=dev)[:min(n, points_per_list * nlist)]  # pick: [S]
    x = augment(keys[pick], max_norm)                                        # x: [S, D']
    if spherical:
        x = torch.nn.functional.normalize(x, dim=1)
    c = x[torch.randperm(x.shape[0], generator=gen, device=dev)[:nlist]].clone()  # c: [nlist, D']
    for _ in range(niter):
        a = assign(x, c, spherical)                                          # a: [S]
        sums = _sums(x, a, nlist)                                            # sums: [nlist, D']
        count = torch.bincount(a, minlength=nlist)[:, None]                  # count: [nlist, 1]
        reseed = x[torch.randint(x.shape[0], (nlist,), generator=gen, device=dev)]  # reseed: [nlist, D']
        c = torch.where(count > 0, sums / count.clamp_min(1), reseed)        # c: [nlist, D']
        if spherical:
            c = torch.nn.functional.normalize(c, dim=1)
    lists = torch.empty(n, dtype=torch.long, device=dev)                     # lists: [N]
    rows = _slab_rows(nlist)
    for a in range(0, n, rows):                                              # every key, one slab at a time
        lists[a:a + rows] = assign(augment(keys[a:a + rows], max_norm), c, spherical)
    return c, lists


def scratch_bytes(num_tokens: int, nlist: int, dim: int, points_per_list: int) -> int:
    """Device temporaries of ivf_lists for one head: the sample and its permutation, centroids, one slab's scores
    and augmented keys, and the list of every key (int64)."""
    sample = min(num_tokens, points_per_list * nlist)
    d = dim + 1
    rows = _slab_rows(nlist)
    return (sample * (d * 4 * 3 + 8 * 2) + 8 * num_tokens * 2 + 5 * nlist * d * 4
            + rows * nlist * 4 + rows * d * 4 * 3 + rows * 8)
