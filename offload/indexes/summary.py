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
dequantisation (in float32) they still bound every key of the chunk (offload/indexes/bounds.py).

export_rows / import_rows move each chunk's fine row as raw bytes: the prompt cache stores them, since a
session whose KV is stored quantized cannot rebuild the bounds of the original keys from it.

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
from offload.indexes._common import check_budget, check_choice, check_shape_args, split_chunks
from offload.indexes.bounds import BoundStore, dequantize_bounds, quantize_bounds

__all__ = ["ChunkSummaryIndex", "dequantize_bounds", "quantize_bounds"]   # the bound codec, re-exported

MASS_RADIUS = 0.25     # chunk_log_mass: share of the box's radius counted (1 = Quest upper bound; see there)
_BUILD_SLAB = 1024     # tokens per build() step: bounds the temporaries (scratch_bytes)


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
        self._host_tier: BoundStore | None = None
        lim = self.max_chunks
        if g == 1:
            self._device_tier = BoundStore(hkv, d, self.device, self.dtype, self.int8, capacity_chunks, limit=lim)
            return
        self._device_tier = BoundStore(hkv, d, self.device, self.dtype, self.int8,
                                       math.ceil(capacity_chunks / g), limit=math.ceil(lim / g))
        self._host_tier = BoundStore(hkv, d, "cpu", self.dtype, self.host_int8, capacity_chunks,
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
        self._fine.append(chunks.amin(dim=2), chunks.amax(dim=2))             # kmin, kmax: [Hkv, n, D]
        self._fine_appended()

    def import_rows(self, first: int, rows: torch.Tensor) -> None:
        """Append fine rows uint8 [count, row_bytes] (from export_rows) as chunks first..; first == num_chunks.

        The result equals extend() over the original keys, bit for bit: the fine rows are stored as they
        were, the coarse groups derived from them the same way, and an empty index is sized like build().
        """
        if first != self.num_chunks:
            raise ValueError(f"rows start at chunk {first} but the index holds {self.num_chunks} chunks; "
                             f"import chunks in order, starting at {self.num_chunks}")
        if rows.dtype != torch.uint8 or rows.dim() != 2 or rows.shape[1] != self.row_bytes:
            raise ValueError(f"rows {rows.dtype} {tuple(rows.shape)} must be uint8 [count, {self.row_bytes}]; "
                             "pass what export_rows of an index of the same configuration returned")
        if first == 0:
            self._reset(self.max_chunks or rows.shape[0])   # the whole context at once, as build() does
        if rows.shape[0]:
            self._fine.append_rows(rows)
            self._fine_appended()

    def export_rows(self, first: int, count: int) -> torch.Tensor:
        """Stored fine rows of chunks first..first+count-1 -> uint8 [count, row_bytes] on the CPU, bit-exact."""
        if first < 0 or count < 0 or first + count > self.num_chunks:
            raise ValueError(f"chunks {first}..{first + count - 1} are not all indexed ({self.num_chunks} are); "
                             "export only indexed chunks")
        return self._fine.export_rows(first, count)                          # rows: [count, R]

    @property
    def row_bytes(self) -> int:
        """Bytes of one chunk's fine row (lo + hi, + int8 scales, of every KV head)."""
        return BoundStore.row_bytes(self.num_kv_heads, self.head_dim, self.dtype, self._fine.int8)

    @property
    def _fine(self) -> BoundStore:
        """One row per chunk: the host tier of two levels, else the device tier."""
        return self._device_tier if self._host_tier is None else self._host_tier

    def _fine_appended(self) -> None:
        """After fine rows were appended: the device-side count (one level), or the coarse groups completed."""
        if self._host_tier is None:
            self._count.fill_(self._device_tier.size)
            return
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
        buffers = rows * BoundStore.row_bytes(self.num_kv_heads, self.head_dim, self.dtype, self.int8)
        return buffers + self.scratch_bytes()

    def scratch_bytes(self, num_chunks: int = 0, budget: int = 0) -> int:
        """Temporaries of one build slab: its min/max bounds, and float32 copies while int8 rounds them; with
        num_chunks and budget (select width) also one select's or mass estimate's: float32 scores of every chunk
        (4 passes over [Hq, n]) and, for two levels, the candidates' dequantised fine bounds."""
        chunks = max(1, _BUILD_SLAB // self.chunk_tokens)
        item = torch.empty((), dtype=self.dtype).element_size()
        per_value = 2 * (item + 4) + (8 * 4 + 2 if self.int8 else 0)            # (+ float32 reduction results)
        build = chunks * self.num_kv_heads * self.head_dim * per_value + chunks * self.num_kv_heads * 4 * 4
        if not num_chunks or not budget:
            return build
        select = 4 * self.num_q_heads * num_chunks * 4 + 2 * self.num_kv_heads * num_chunks * 4
        if self.coarse_group > 1:
            cand = min(num_chunks, math.ceil(max(budget * self.candidate_factor, self.min_candidates)) + self.coarse_group)
            select += 2 * self.num_kv_heads * cand * self.head_dim * (item + 4)
        return max(build, select)

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
