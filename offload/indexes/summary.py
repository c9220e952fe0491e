"""ChunkSummaryIndex: Quest-style per-chunk min/max key bounds ("KV abstracts").

Score of a chunk for query head h: sum_d max(q_d*kmin_d, q_d*kmax_d), an upper bound of q.k over the
chunk's keys; a KV head's query group is combined by max or sum (`group_reduce`). Scoring goes
through `offload.kernels.score_chunks` (CuPy on the GPU, torch reference elsewhere).

Memory (Llama-3-8B, 32 layers x 8 KV heads x D=128, 1M tokens, 64-token chunks):
    bounds="native" (bf16):               2 GiB on the GPU
    bounds="int8":                        1 GiB + scales (4 B per head-chunk) on the GPU
    coarse_group=G (two levels):          coarse bounds of G chunks on the GPU (1/G of the above),
                                          fine bounds in (pinned) host RAM: 2 GiB bf16,
                                          1 GiB with host_bounds="int8"
int8 bounds are rounded outward (min down, max up) against a per-(head, chunk) scale, so after
dequantisation (in float32) they still bound every key of the chunk.

Two levels: the coarse stage picks ceil(max(budget * candidate_factor, min_candidates) / G) groups of
G chunks per KV head (the floor matters at small budgets: 8 candidates for a 2-chunk budget lose mass);
their fine bounds (plus those of the still-incomplete last group, always candidates) are gathered on
the host, copied to the device and scored again; the top `budget` of those are returned.
"""
from __future__ import annotations

import math

import torch

from offload import kernels
from offload.errors import ConfigError
from offload.indexes._common import (ChunkBuffer, check_budget, check_choice, check_shape_args,
                                     split_chunks)

MASS_RADIUS = 0.25     # chunk_log_mass: share of the box's radius counted (1 = Quest upper bound; see there)
_INT8_LEVELS = 126.0   # one level of slack below 127 so that the outward fix-up step cannot overflow
_BUILD_SLAB = 1024     # tokens per build() step: bounds the temporaries (scratch_bytes)


def quantize_bounds(kmin: torch.Tensor, kmax: torch.Tensor):
    """kmin/kmax [Hkv, n, D] -> (qmin, qmax int8 [Hkv, n, D], scale f32 [Hkv, n]) with q*scale outside [kmin, kmax]."""
    lo, hi = kmin.float(), kmax.float()                                          # lo, hi: [Hkv, n, D]
    amax = torch.maximum(lo.abs().amax(dim=2), hi.abs().amax(dim=2))             # amax: [Hkv, n]
    scale = torch.where(amax > 0, amax / _INT8_LEVELS, torch.ones_like(amax))    # scale: [Hkv, n]
    s = scale[..., None]                                                         # s: [Hkv, n, 1]
    qmin = torch.floor(lo / s)                                                   # qmin: [Hkv, n, D]
    qmax = torch.ceil(hi / s)                                                    # qmax: [Hkv, n, D]
    # the division rounds; one more step where the float32 product lands on the wrong side
    qmin = torch.where(qmin * s > lo, qmin - 1, qmin)                            # qmin: [Hkv, n, D]
    qmax = torch.where(qmax * s < hi, qmax + 1, qmax)                            # qmax: [Hkv, n, D]
    return qmin.to(torch.int8), qmax.to(torch.int8), scale


def dequantize_bounds(qmin: torch.Tensor, qmax: torch.Tensor, scale: torch.Tensor):
    """int8 [Hkv, n, D] x f32 [Hkv, n] -> float32 kmin, kmax [Hkv, n, D]."""
    s = scale[..., None]                                                          # s: [Hkv, n, 1]
    return qmin.float() * s, qmax.float() * s


class _BoundStore:
    """Min/max bounds of one tier, native dtype or int8, in growable buffers."""

    def __init__(self, hkv: int, d: int, device, dtype, int8: bool, capacity: int, pin: bool = False,
                 limit: int = 0):
        self.int8 = int8
        store_dtype = torch.int8 if int8 else dtype
        self.lo = ChunkBuffer(hkv, (d,), device, store_dtype, capacity, pin, limit)     # lo: [Hkv, cap, D]
        self.hi = ChunkBuffer(hkv, (d,), device, store_dtype, capacity, pin, limit)     # hi: [Hkv, cap, D]
        self.scale = ChunkBuffer(hkv, (), device, torch.float32, capacity if int8 else 0, pin, limit)

    @staticmethod
    def row_bytes(hkv: int, d: int, dtype: torch.dtype, int8: bool) -> int:
        """Bytes per stored row (one chunk or group, every KV head)."""
        return hkv * (2 * d + 4) if int8 else hkv * 2 * d * torch.empty((), dtype=dtype).element_size()

    def append(self, kmin: torch.Tensor, kmax: torch.Tensor) -> None:
        if self.int8:
            qmin, qmax, scale = quantize_bounds(kmin, kmax)
            self.lo.append(qmin), self.hi.append(qmax), self.scale.append(scale)
        else:
            self.lo.append(kmin), self.hi.append(kmax)

    def bounds(self, ids: torch.Tensor | None = None, device: torch.device | None = None,
               allocated: bool = False):
        """Bounds of all stored rows, or of ids [Hkv, M] -> [Hkv, M, D] on `device` (float32 when int8).

        Rows are gathered where they are stored and dequantised after the copy, so an int8 tier moves
        1 byte per value. `allocated`: every allocated row, written or not (static shapes for graphs).
        """
        lo, hi = (self.lo.data, self.hi.data) if allocated else (self.lo.valid, self.hi.valid)  # [Hkv, n, D]
        scale = (self.scale.data if allocated else self.scale.valid) if self.int8 else None     # [Hkv, n]
        if ids is not None:
            heads = torch.arange(lo.shape[0], device=lo.device)[:, None]         # heads: [Hkv, 1]
            ids = ids.to(lo.device)                                              # ids: [Hkv, M]
            lo, hi = lo[heads, ids], hi[heads, ids]                              # lo, hi: [Hkv, M, D]
            scale = scale[heads, ids] if self.int8 else None                     # scale: [Hkv, M]
        if device is not None:
            lo, hi = lo.to(device, non_blocking=True), hi.to(device, non_blocking=True)
            scale = scale.to(device, non_blocking=True) if self.int8 else None
        return dequantize_bounds(lo, hi, scale) if self.int8 else (lo, hi)

    @property
    def size(self) -> int:
        return self.lo.size

    @property
    def nbytes(self) -> int:
        return self.lo.nbytes + self.hi.nbytes + self.scale.nbytes


class ChunkSummaryIndex:
    """Per-chunk min/max key bounds; one or two levels (coarse on the device, fine on the host)."""

    def __init__(self, num_kv_heads: int, num_q_heads: int, head_dim: int, chunk_tokens: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                 group_reduce: str = "max", bounds: str = "native", host_bounds: str = "native",
                 coarse_group: int = 1,
                 candidate_factor: float = 4.0, min_candidates: int = 32, capacity_chunks: int = 0,
                 max_chunks: int = 0, mass_radius: float = MASS_RADIUS, scale: float | None = None):
        check_shape_args(num_kv_heads, num_q_heads, head_dim, chunk_tokens)
        check_choice("group_reduce", group_reduce, ("max", "sum"))
        check_choice("bounds", bounds, ("native", "int8"))
        check_choice("host_bounds", host_bounds, ("native", "int8"))
        if int(coarse_group) < 1 or not float(candidate_factor) >= 1.0:
            raise ConfigError(f"coarse_group={coarse_group} / candidate_factor={candidate_factor}: use "
                              "coarse_group >= 1 (1 = one level) and candidate_factor >= 1.0")
        self.num_kv_heads, self.num_q_heads, self.head_dim = num_kv_heads, num_q_heads, head_dim
        self.chunk_tokens = chunk_tokens
        self.device, self.dtype = torch.device(device), dtype
        self.group_reduce, self.coarse_group = group_reduce, int(coarse_group)
        self.candidate_factor, self.min_candidates = float(candidate_factor), max(0, int(min_candidates))
        self.int8, self.host_int8 = bounds == "int8", host_bounds == "int8"
        self.max_chunks = max(0, int(max_chunks))     # buffers never grow past the context's chunk count
        self.mass_radius = float(mass_radius)
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
        self._count = torch.zeros(1, dtype=torch.long, device=self.device)    # _count: [1] chunks, on the device
        self._reset(capacity_chunks)

    def _reset(self, capacity_chunks: int) -> None:
        hkv, d, g = self.num_kv_heads, self.head_dim, self.coarse_group
        self._count.zero_()
        self._host_tier: _BoundStore | None = None
        lim = self.max_chunks
        if g == 1:
            self._device_tier = _BoundStore(hkv, d, self.device, self.dtype, self.int8, capacity_chunks, limit=lim)
            return
        self._device_tier = _BoundStore(hkv, d, self.device, self.dtype, self.int8,
                                        math.ceil(capacity_chunks / g), limit=math.ceil(lim / g))
        self._host_tier = _BoundStore(hkv, d, "cpu", self.dtype, self.host_int8, capacity_chunks,
                                      pin=self.device.type == "cuda", limit=lim)

    # -- building --------------------------------------------------------------------------------
    def build(self, keys: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        """Index all chunks of keys [Hkv, N, D]; queries are not needed (bounds hold for any query).

        Buffers are sized once for max_chunks (the context; the planner counted them), so later appends and
        reserve() copy nothing, and the keys go in slabs: the peak is the final buffers plus scratch_bytes().
        """
        n = keys.shape[1] // self.chunk_tokens
        self._reset(self.max_chunks or n)      # the whole context at once: appends never regrow (see selector)
        slab = self.chunk_tokens * max(1, _BUILD_SLAB // self.chunk_tokens)
        for start in range(0, max(keys.shape[1], 1), slab):
            self.extend(keys[:, start:start + slab])

    def extend(self, keys: torch.Tensor) -> None:
        """Append full chunks: keys [Hkv, n*C, D]."""
        chunks = split_chunks(keys, self.num_kv_heads, self.head_dim, self.chunk_tokens)  # [Hkv, n, C, D]
        if chunks.shape[1] == 0:
            return
        kmin, kmax = chunks.amin(dim=2), chunks.amax(dim=2)                    # kmin, kmax: [Hkv, n, D]
        if self._host_tier is None:
            self._device_tier.append(kmin, kmax)
            self._count.fill_(self._device_tier.size)
            return
        self._host_tier.append(kmin, kmax)
        g = self.coarse_group
        done = self._device_tier.size                                          # coarse groups written
        full = self._host_tier.size // g                                       # groups now complete
        if full > done:
            rows = torch.arange(done * g, full * g).expand(self.num_kv_heads, -1)  # rows: [Hkv, m*G]
            lo, hi = self._host_tier.bounds(rows)                              # lo, hi: [Hkv, m*G, D]
            lo = lo.reshape(self.num_kv_heads, full - done, g, -1)             # lo: [Hkv, m, G, D]
            hi = hi.reshape(self.num_kv_heads, full - done, g, -1)             # hi: [Hkv, m, G, D]
            self._device_tier.append(lo.amin(dim=2), hi.amax(dim=2))

    # -- selection -------------------------------------------------------------------------------
    def select(self, query: torch.Tensor, budget: int) -> torch.Tensor:
        """query [Hq, D] -> best-first chunk ids int64 [Hkv, min(budget, num_chunks)] on the device."""
        check_budget(budget)
        n = self.num_chunks
        q = query.to(self.device)                                              # q: [Hq, D]
        if n == 0:
            return torch.empty((self.num_kv_heads, 0), dtype=torch.long, device=self.device)
        k = min(int(budget), n)
        if self._host_tier is None and q.is_cuda:
            # every allocated row is scored and the unwritten ones masked by the device-side count, so
            # a captured decode step stays valid as chunks are appended (until the buffer grows)
            lo, hi = self._device_tier.bounds(allocated=True)                  # lo, hi: [Hkv, cap, D]
            b = kernels.chunk_bounds(q, lo, hi, lo.shape[1], self.group_reduce)  # b: [Hkv, cap]
            return kernels.topk_rows(b, self._count, k)                        # ids: [Hkv, k]
        if self._host_tier is None:
            lo, hi = self._device_tier.bounds()                                # lo, hi: [Hkv, n, D]
            return kernels.score_chunks(q, lo, hi, n, k, self.group_reduce)    # ids: [Hkv, k]
        cand = self._candidates(q, k)                                          # cand: [Hkv, M]
        lo, hi = self._host_tier.bounds(cand.cpu(), self.device)               # lo, hi: [Hkv, M, D]
        local = kernels.score_chunks(q, lo, hi, cand.shape[1], k, self.group_reduce)  # local: [Hkv, k]
        return cand.gather(1, local)                                           # ids: [Hkv, k]

    def chunk_log_mass(self, query: torch.Tensor, cap: int = 0) -> torch.Tensor:
        """Estimated log attention mass of every allocated chunk per query head -> float32 [Hkv, G, cap].

        log(C) + scale * (q.centre + mass_radius * |q|.radius) of the chunk's box [kmin, kmax]: mass_radius = 1
        is the Quest upper bound of q.k (it overstates every chunk, most the widest); the default, calibrated on
        SmolLM2 against the exact mass (tests/test_budget_mass.py), is lower. Unwritten rows are -inf (masked by
        the device-side count: no host sync, fixed shape). Two-level: each chunk gets its coarse group's box.
        cap (the selection's width) is not needed here: every chunk's bounds are scored anyway.
        """
        q = query.to(self.device).float().reshape(self.num_kv_heads, -1, self.head_dim)  # q: [Hkv, G, D]
        if self._host_tier is None:
            lm = self._box_log_mass(q, *self._device_tier.bounds(allocated=True))  # lm: [Hkv, G, cap]
            written = torch.arange(lm.shape[2], device=lm.device) < self._count  # written: [cap]
            return torch.where(written, lm, torch.full((), -math.inf, device=lm.device))
        # two levels (syncs with the host anyway): complete groups from their coarse box, the rest exactly
        g, full = self.coarse_group, self._device_tier.size
        lm = self._box_log_mass(q, *self._device_tier.bounds())                # lm: [Hkv, G, full]
        lm = lm.repeat_interleave(g, dim=2)                                    # lm: [Hkv, G, full*Gc]
        rest = torch.arange(full * g, self.num_chunks).expand(self.num_kv_heads, -1)  # rest: [Hkv, r]
        if rest.shape[1]:
            lm = torch.cat([lm, self._box_log_mass(q, *self._host_tier.bounds(rest, self.device))], dim=2)
        return lm                                                              # lm: [Hkv, G, n]

    def _box_log_mass(self, q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """q [Hkv, G, D], boxes lo/hi [Hkv, R, D] -> log(C) + scale * (q.centre + mass_radius * |q|.radius) [Hkv, G, R]."""
        # q.centre + rho |q|.radius = a.lo + b.hi with a = (q - rho|q|)/2, b = (q + rho|q|)/2: two matmuls over
        # the stored bounds as they are (bf16 on the GPU), no [Hkv, R, D] temporaries
        r = self.mass_radius * q.abs()                                         # r: [Hkv, G, D]
        a, b = ((q - r) / 2).to(lo.dtype), ((q + r) / 2).to(hi.dtype)          # a, b: [Hkv, G, D]
        s = torch.bmm(a, lo.transpose(1, 2)).float() + torch.bmm(b, hi.transpose(1, 2)).float()  # s: [Hkv, G, R]
        return s * self.scale + math.log(self.chunk_tokens)                    # [Hkv, G, R]

    def _candidates(self, q: torch.Tensor, k: int) -> torch.Tensor:
        """Chunk ids of the best coarse groups plus the incomplete last group -> [Hkv, M], M >= k."""
        g, n = self.coarse_group, self.num_chunks
        full = self._device_tier.size
        picks = min(full, math.ceil(max(k * self.candidate_factor, self.min_candidates) / g))
        parts = []
        if picks:
            lo, hi = self._device_tier.bounds()                                # lo, hi: [Hkv, full, D]
            gid = kernels.score_chunks(q, lo, hi, full, picks, self.group_reduce)  # gid: [Hkv, picks]
            offs = torch.arange(g, device=gid.device)                          # offs: [G]
            parts.append((gid[..., None] * g + offs).reshape(self.num_kv_heads, -1))  # [Hkv, picks*G]
        if n > full * g:
            tail = torch.arange(full * g, n, device=self.device)               # tail: [r]
            parts.append(tail.expand(self.num_kv_heads, -1))                   # [Hkv, r]
        return torch.cat(parts, dim=1)                                         # cand: [Hkv, M]

    def reserve(self, num_chunks: int) -> None:
        """Room for num_chunks without regrowth (buffers keep their address, so captured steps stay valid)."""
        num_chunks = min(num_chunks, self.max_chunks) if self.max_chunks else num_chunks
        tiers = [(self._device_tier, math.ceil(num_chunks / self.coarse_group))]
        if self._host_tier is not None:
            tiers.append((self._host_tier, num_chunks))
        for tier, rows in tiers:
            for buf in (tier.lo, tier.hi, tier.scale) if tier.int8 else (tier.lo, tier.hi):
                buf.reserve(rows)

    def gpu_bytes(self, num_chunks: int) -> int:
        """Compute-device bytes at num_chunks chunks, at the peak: the bounds plus one build slab's scratch."""
        rows = math.ceil(num_chunks / self.coarse_group)
        buffers = rows * _BoundStore.row_bytes(self.num_kv_heads, self.head_dim, self.dtype, self.int8)
        return buffers + self.scratch_bytes()

    def scratch_bytes(self) -> int:
        """Temporaries of one build slab: its min/max bounds, and float32 copies while int8 rounds them."""
        chunks = max(1, _BUILD_SLAB // self.chunk_tokens)
        item = torch.empty((), dtype=self.dtype).element_size()
        per_value = 2 * (item + 4) + (8 * 4 + 2 if self.int8 else 0)            # (+ float32 reduction results)
        return chunks * self.num_kv_heads * self.head_dim * per_value + chunks * self.num_kv_heads * 4 * 4

    def graph_key(self):
        """What a captured `select` depends on besides the device-side count; None if it syncs the host."""
        if self._host_tier is not None:
            return None                                                        # fine bounds come via the host
        lo = self._device_tier.lo.data
        return (lo.data_ptr(), lo.shape[1])

    # -- sizes -----------------------------------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        if self._host_tier is None:
            return self._device_tier.size
        return self._host_tier.size

    @property
    def nbytes(self) -> dict[str, int]:
        # "gpu" names the compute-device tier (RAM on a CPU run, still reported apart from "host")
        host = self._host_tier.nbytes if self._host_tier is not None else 0
        return {"gpu": self._device_tier.nbytes, "host": host}
