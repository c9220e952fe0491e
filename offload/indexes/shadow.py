"""ShadowKeyIndex: low-rank key shadows (after ShadowKV) behind a coarse chunk stage.

Per KV head, the build keys give a rank-r orthonormal basis U [D, r] (top eigenvectors of K^T K,
uncentred, so q.(U U^T k) approximates q.k). Every key is stored as its shadow k U [r]. Selection:
  1. coarse: score every chunk by its landmark (coarse="mean": q.mean key, through
     `offload.kernels.score_chunks` with kmin = kmax = mean) or by an inner ChunkSummaryIndex
     (coarse="summary", with `summary_options`, e.g. int8 / two-level bounds); keep
     ceil(max(budget * candidate_factor, min_candidates)) candidates per KV head;
  2. fine: approximate q.k for every token of the candidates from the shadows ((q U) . shadow), reduce
     to a chunk score (token max, or softmax mass over the candidates) and the query group, top budget.

RoPE: the indexes only see post-RoPE keys (DESIGN.md), so the basis is fitted to post-RoPE keys.
RoPE rotates each dim pair by a position-dependent angle, which spreads the energy of the
high-frequency pairs over both dims of the pair, so post-RoPE keys are expected to need a higher rank
than ShadowKV's pre-RoPE factor for the same error (on the synthetic keys, rank 32 holds 0.63 of the
energy post-RoPE against 0.66 without RoPE; measure on real keys). In exchange the approximation stays
exact at r = D, needs no position bookkeeping and extends to new chunks with the same basis.
(Fitting pre-RoPE keys would need the model to hand over pre-RoPE keys and positions; the
`rebuild_keys` variant is not done here.)

Memory per KV head and token: r * itemsize (shadows) + landmark D * itemsize / C (or the summary's).
Llama-3-8B at 1M tokens, r=32, bf16: 16 GiB of shadows, so at that scale shadows belong on the host
(`shadows_on="host"`: only the candidates' shadows are copied per step) and only the coarse stage
(landmarks, or better an int8 two-level summary) stays on the GPU.
"""
from __future__ import annotations

import math

import torch

from offload import kernels
from offload.errors import ConfigError
from offload.indexes._common import (ChunkBuffer, check_budget, check_choice, check_shape_args,
                                     group_reduce, split_chunks)
from offload.indexes.summary import ChunkSummaryIndex


BUILD_SLAB = 1024   # tokens per step of build(): bounds its float32 temporaries (ShadowKeyIndex.scratch_bytes)


def key_basis(keys: torch.Tensor, rank: int, slab: int = BUILD_SLAB) -> torch.Tensor:
    """keys [Hkv, N, D] -> orthonormal basis [Hkv, D, rank] of the top `rank` directions (float32).

    K^T K is summed in float32 over slabs of `slab` tokens and accumulated in float64 across slabs, so the
    temporaries stay at one float32 slab (a 16K-token float64 slab was 128 MiB for Llama-3-8B at build).
    """
    hkv, n, d = keys.shape
    gram = torch.zeros(hkv, d, d, dtype=torch.float64, device=keys.device)    # gram: [Hkv, D, D]
    for start in range(0, n, slab):
        k = keys[:, start:start + slab].float()                                # k: [Hkv, s, D]
        gram += torch.bmm(k.transpose(1, 2), k)                                # [Hkv, D, D] f32 -> f64
    # a few 128x128 matrices: solved on the host, so no solver workspace lands on the GPU at build
    _, vecs = torch.linalg.eigh(gram.cpu())                                    # vecs: [Hkv, D, D] ascending
    return vecs.flip(-1)[..., :rank].float().contiguous().to(keys.device)      # basis: [Hkv, D, r]


class ShadowKeyIndex:
    """Landmarks (or a summary index) per chunk on the device, rank-r key shadows on device or host."""

    def __init__(self, num_kv_heads: int, num_q_heads: int, head_dim: int, chunk_tokens: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                 rank: int = 32, coarse: str = "mean", candidate_factor: float = 4.0, min_candidates: int = 32,
                 fine_reduce: str = "mass", group_reduce: str = "max", shadows_on: str = "device",
                 summary_options: dict | None = None, scale: float | None = None, capacity_chunks: int = 0,
                 max_chunks: int = 0):
        self.group_size = check_shape_args(num_kv_heads, num_q_heads, head_dim, chunk_tokens)
        if not 1 <= int(rank) <= head_dim:
            raise ConfigError(f"shadow rank={rank} must be between 1 and head_dim={head_dim}; "
                              f"lower the rank (e.g. {min(32, head_dim)})")
        if not float(candidate_factor) >= 1.0:
            raise ConfigError(f"candidate_factor={candidate_factor} must be >= 1.0 (candidates per selected chunk)")
        check_choice("coarse", coarse, ("mean", "summary"))
        check_choice("fine_reduce", fine_reduce, ("max", "mass"))
        check_choice("group_reduce", group_reduce, ("max", "sum"))
        check_choice("shadows_on", shadows_on, ("device", "host"))
        self.num_kv_heads, self.num_q_heads, self.head_dim = num_kv_heads, num_q_heads, head_dim
        self.chunk_tokens, self.rank = chunk_tokens, int(rank)
        self.device, self.dtype = torch.device(device), dtype
        self.shadows_on = shadows_on
        self.shadow_device = self.device if shadows_on == "device" else torch.device("cpu")
        self.coarse, self.fine_reduce, self.group_reduce = coarse, fine_reduce, group_reduce
        self.candidate_factor, self.min_candidates = float(candidate_factor), max(0, int(min_candidates))
        self.summary_options = dict(summary_options or {})
        self.max_chunks = max(0, int(max_chunks))     # buffers never grow past the context's chunk count
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        self._count = torch.zeros(1, dtype=torch.long, device=self.device)    # _count: [1] chunks, on the device
        self._every_row = torch.full((1,), 2 ** 62, dtype=torch.long, device=self.device)  # topk_rows over all rows
        self._reset(capacity_chunks)

    def _reset(self, capacity_chunks: int) -> None:
        hkv, c, d = self.num_kv_heads, self.chunk_tokens, self.head_dim
        self.basis: torch.Tensor | None = None                                 # basis: [Hkv, D, r]
        pin = self.shadow_device.type == "cpu" and self.device.type == "cuda"
        lim = self.max_chunks
        self._shadows = ChunkBuffer(hkv, (c, self.rank), self.shadow_device, self.dtype, capacity_chunks, pin, lim)
        mean_cap = capacity_chunks if self.coarse == "mean" else 0
        self._means = ChunkBuffer(hkv, (d,), self.device, self.dtype, mean_cap, limit=lim)  # means: [Hkv, cap, D]
        self._summary = None
        if self.coarse == "summary":
            opts = {"group_reduce": self.group_reduce, "scale": self.scale, **self.summary_options,
                    "capacity_chunks": capacity_chunks,
                    "max_chunks": lim}
            self._summary = ChunkSummaryIndex(hkv, self.num_q_heads, d, c, self.device, self.dtype, **opts)
        self._num_chunks = 0
        self._count.zero_()

    def build(self, keys: torch.Tensor, queries: torch.Tensor | None = None) -> None:
        """Fit the basis to keys [Hkv, N, D] and index their chunks (queries unused).

        Buffers are allocated once, at twice the prefill (capped by max_chunks), before anything else: a later
        reserve() then copies nothing, so the peak is the final size plus one slab's temporaries (scratch_bytes).
        """
        n = keys.shape[1] // self.chunk_tokens
        self._reset(self.max_chunks or n)      # the whole context at once: appends never regrow (see selector)
        split_chunks(keys, self.num_kv_heads, self.head_dim, self.chunk_tokens)   # shape check
        if keys.shape[1]:
            self.basis = key_basis(keys, self.rank).to(self.device)            # basis: [Hkv, D, r]
        # slabs bound the float32 temporaries of a long prefill
        slab = self.chunk_tokens * max(1, BUILD_SLAB // self.chunk_tokens)
        for start in range(0, keys.shape[1], slab):
            self.extend(keys[:, start:start + slab])

    def extend(self, keys: torch.Tensor) -> None:
        """Append full chunks keys [Hkv, n*C, D], projected on the existing basis (fitted here if none)."""
        chunks = split_chunks(keys, self.num_kv_heads, self.head_dim, self.chunk_tokens)  # [Hkv, n, C, D]
        if chunks.shape[1] == 0:
            return
        if self.basis is None:
            self.basis = key_basis(keys, self.rank).to(self.device)           # basis: [Hkv, D, r]
        basis = self.basis.to(keys.device)                                     # basis: [Hkv, D, r]
        flat = chunks.float()                                                  # flat: [Hkv, n, C, D] (one copy)
        self._shadows.append(torch.einsum("hncd,hdr->hncr", flat, basis))     # shadows: [Hkv, n, C, r]
        if self._summary is None:
            self._means.append(flat.mean(dim=2))                               # mean: [Hkv, n, D]
        else:
            self._summary.extend(keys)
        self._num_chunks += chunks.shape[1]
        self._count.fill_(self._num_chunks)

    def select(self, query: torch.Tensor, budget: int) -> torch.Tensor:
        """query [Hq, D] -> best-first chunk ids int64 [Hkv, min(budget, num_chunks)] on the device."""
        check_budget(budget)
        n = self.num_chunks
        if n == 0:
            return torch.empty((self.num_kv_heads, 0), dtype=torch.long, device=self.device)
        q = query.to(self.device)                                              # q: [Hq, D]
        k = min(int(budget), n)
        m = min(n, math.ceil(max(k * self.candidate_factor, self.min_candidates)))
        past_count = False
        if self._summary is None and q.is_cuda:
            means = self._means.data                                           # means: [Hkv, cap, D] (static shape)
            # the width follows the allocated rows, not the count, so a captured step does not keep the count it
            # was captured at while chunks are appended; rows past the count rank last and are masked below
            m = min(means.shape[1], math.ceil(max(k * self.candidate_factor, self.min_candidates)))
            b = kernels.chunk_bounds(q, means, means, means.shape[1], self.group_reduce)  # b: [Hkv, cap]
            cand = _coarse_rows(b, self._count, m)                             # cand: [Hkv, m]
            past_count = True
        elif self._summary is None:
            means = self._means.valid                                          # means: [Hkv, n, D]
            # with kmin = kmax = mean the Quest bound is exactly q.mean, so one kernel serves both
            cand = kernels.score_chunks(q, means, means, n, m, self.group_reduce)  # cand: [Hkv, m]
        else:
            cand = self._summary.select(q, m)                                  # cand: [Hkv, m]
        scores = self._fine_scores(q, cand, past_count)                        # scores: [Hkv, m]
        if scores.is_cuda and kernels.KERNELS_AVAILABLE:      # one launch, best first, the gather folded in
            return kernels.topk_rows(scores, self._every_row, k, cand.contiguous())   # ids: [Hkv, k]
        local = torch.topk(scores, k, dim=1).indices                           # local: [Hkv, k]
        return cand.gather(1, local)                                           # ids: [Hkv, k]

    def chunk_log_mass(self, query: torch.Tensor, cap: int) -> torch.Tensor:
        """Estimated log attention mass of every allocated chunk per query head -> float32 [Hkv, G, n_alloc].

        The ceil(max(cap * candidate_factor, min_candidates)) best chunks by the coarse estimate get the
        logsumexp of their tokens' low-rank scores; the others keep the coarse estimate (log C + scale * q.mean,
        a lower bound of the chunk's mass by Jensen; or the summary's box estimate). Unwritten rows are -inf.
        Fixed shapes and no host sync on the device path (cap is static per graph).
        """
        hkv, g, d = self.num_kv_heads, self.group_size, self.head_dim
        q = query.to(self.device).float()                                      # q: [Hq, D]
        if self._summary is not None:
            lm = self._summary.chunk_log_mass(q)                               # lm: [Hkv, G, n_alloc]
        else:
            means = self._means.data                                           # means: [Hkv, n_alloc, D]
            s = torch.bmm(q.reshape(hkv, g, d).to(means.dtype), means.transpose(1, 2)).float()  # s: [Hkv, G, n_alloc]
            lm = s * self.scale + math.log(self.chunk_tokens)
            written = torch.arange(lm.shape[2], device=lm.device) < self._count  # written: [n_alloc]
            lm = torch.where(written, lm, torch.full((), -math.inf, device=lm.device))
        width = min(lm.shape[2], math.ceil(max(int(cap) * self.candidate_factor, self.min_candidates)))
        if width == 0 or self.basis is None:
            return lm
        cand = torch.topk(lm.amax(dim=1), width, dim=1).indices               # cand: [Hkv, m]
        fine = torch.logsumexp(self._token_scores(q, cand), dim=3)             # fine: [Hkv, G, m]
        known = torch.gather(lm, 2, cand[:, None].expand(hkv, g, width))       # known: [Hkv, G, m]
        fine = torch.where(torch.isfinite(known), fine, known)                 # unwritten candidates stay -inf
        return lm.scatter(2, cand[:, None].expand(hkv, g, width), fine)       # lm: [Hkv, G, n_alloc]

    def _token_scores(self, q: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Low-rank scale * q.k of every token of the candidate chunks: q [Hq, D], cand [Hkv, m] -> [Hkv, G, m, C]."""
        hkv, g = self.num_kv_heads, self.group_size
        qp = torch.einsum("hgd,hdr->hgr", q.float().reshape(hkv, g, self.head_dim), self.basis)  # qp: [Hkv, G, r]
        heads = torch.arange(hkv, device=self.shadow_device)[:, None]          # heads: [Hkv, 1]
        sh = self._shadows.data[heads, cand.to(self.shadow_device)]            # sh: [Hkv, m, C, r]
        sh = sh.to(self.device, non_blocking=True)                             # sh: [Hkv, m, C, r]
        return torch.einsum("hgr,hmcr->hgmc", qp, sh.float()) * self.scale     # s: [Hkv, G, m, C]

    def token_logits(self, query: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        """Estimated scale * q.k of every token of the chunks cand [Hkv, m] (-1: none; masked by the caller) from
        their shadows -> float32 [Hkv, G, m*C]. The token stage ranks its candidates with these when
        token_scores is "shadow": only the picked tokens' exact K and V rows are then read."""
        s = self._token_scores(query.to(self.device), cand.clamp(min=0))       # s: [Hkv, G, m, C]
        return s.flatten(2)                                                    # [Hkv, G, m*C]

    def shadow_operands(self):
        """(basis float32 [Hkv, D, r], shadows [Hkv, cap, C, r], scale) for the token stage's fused GPU ranking
        (kernels.tokens.ranked_token_attend, the same estimate as token_logits); None when the shadows are not
        on a CUDA device or no chunk is indexed yet."""
        if self.shadows_on != "device" or self.device.type != "cuda" or self.basis is None:
            return None
        return self.basis, self._shadows.data, self.scale

    def reserve(self, num_chunks: int) -> None:
        """Room for num_chunks without regrowth (buffers keep their address, so captured steps stay valid)."""
        num_chunks = min(num_chunks, self.max_chunks) if self.max_chunks else num_chunks
        self._shadows.reserve(num_chunks)
        if self._summary is None:
            self._means.reserve(num_chunks)
        else:
            self._summary.reserve(num_chunks)

    def gpu_bytes(self, num_chunks: int) -> int:
        """Compute-device bytes of the index at num_chunks chunks, at its peak (the planner reserves them).

        The buffers at num_chunks, plus scratch_bytes(): the float32 temporaries of one build slab. The planner
        counts the buffers per layer and the largest temporaries once (backends.index_gpu_bytes: layers build
        and select one at a time). (Before, only the buffers were counted while build() held ~10x them in
        16K-token float64/float32 slabs.)
        """
        item = torch.empty((), dtype=self.dtype).element_size()
        hkv = self.num_kv_heads
        shadows = num_chunks * hkv * self.chunk_tokens * self.rank * item if self.shadows_on == "device" else 0
        shadows += hkv * self.head_dim * self.rank * 4 + self.scratch_bytes()  # the float32 basis + build scratch
        if self.coarse == "mean":
            return shadows + num_chunks * hkv * self.head_dim * item
        inner = self._inner_summary()
        return shadows + inner.gpu_bytes(num_chunks) - inner.scratch_bytes()   # its scratch is in ours

    def _inner_summary(self) -> ChunkSummaryIndex:
        return ChunkSummaryIndex(self.num_kv_heads, self.num_q_heads, self.head_dim, self.chunk_tokens, "cpu",
                                 self.dtype, **{"group_reduce": self.group_reduce, **self.summary_options})

    def scratch_bytes(self, num_chunks: int = 0, budget: int = 0) -> int:
        """Largest temporaries of build()/extend() (one slab): the float32 keys, their float32 shadows and
        their cast, the float32 means, the gram accumulators and eigh's output (see key_basis); with num_chunks
        and budget (the select width in chunks) also those of one select or mass estimate at that size."""
        item = torch.empty((), dtype=self.dtype).element_size()
        hkv, d, r = self.num_kv_heads, self.head_dim, self.rank
        s = self.chunk_tokens * max(1, BUILD_SLAB // self.chunk_tokens)       # tokens per slab
        extend = s * hkv * (4 * d + (8 + item) * r) + (s // self.chunk_tokens) * hkv * d * (4 + item)
        basis = 2 * s * hkv * d * 4 + hkv * d * d * (8 + 4)                   # slab (+ its transposed copy), gram, bmm out
        inner = self._inner_summary().scratch_bytes() if self.coarse == "summary" else 0  # runs while ours live
        return max(extend + inner, basis, self._select_bytes(num_chunks, budget))

    def _select_bytes(self, num_chunks: int, budget: int) -> int:
        """Temporaries of select/chunk_log_mass over num_chunks with a width of budget chunks: the candidates'
        gathered shadows (+ float32 copy and einsum operand), their per-token scores (3 float32 passes), and
        the coarse stage's per-chunk scores (4 float32 [Hq, n] passes of the mass estimate)."""
        if not num_chunks or not budget:
            return 0
        item = torch.empty((), dtype=self.dtype).element_size()
        m = min(num_chunks, math.ceil(max(budget * self.candidate_factor, self.min_candidates)))
        tokens = m * self.chunk_tokens
        coarse = 4 * self.num_q_heads * num_chunks * 4 + 2 * self.num_kv_heads * num_chunks * 4
        if self.coarse == "summary":
            coarse += self._inner_summary().scratch_bytes(num_chunks, m)
        return self.num_kv_heads * tokens * self.rank * (item + 8) + 3 * self.num_q_heads * tokens * 4 + coarse

    def graph_key(self):
        """What a captured `select` depends on besides the device-side count; None if it syncs the host."""
        if self.shadows_on != "device":
            return None                                                        # candidates' shadows via the host
        coarse = self._summary.graph_key() if self._summary is not None else self._means.data.data_ptr()
        if coarse is None:
            return None
        return (self._shadows.data.data_ptr(), self._shadows.data.shape[1], coarse)

    def _fine_scores(self, q: torch.Tensor, cand: torch.Tensor, past_count: bool = False) -> torch.Tensor:
        """Chunk scores of the candidates from their shadows -> [Hkv, m] float32 on the device (past_count: some
        candidates may lie past the chunk count, rows that hold no chunk; they score -inf).

        Host shadows are gathered on the host and only the candidates' rows are copied
        (m * C * r values per head), so the scoring itself runs on the compute device.
        """
        hkv, g = self.num_kv_heads, self.group_size
        fused = _chunk_scores_kernel(q, self.shadow_operands(), cand, self.fine_reduce, self.group_reduce, self._count)
        if fused is not None:
            return fused                                                       # scores: [Hkv, m], -inf past the count
        store = self.shadow_device
        qg = q.float().reshape(hkv, g, self.head_dim)                          # qg: [Hkv, G, D]
        qp = torch.einsum("hgd,hdr->hgr", qg, self.basis)                      # qp: [Hkv, G, r]
        heads = torch.arange(hkv, device=store)[:, None]                       # heads: [Hkv, 1]
        # allocated rows, not the valid prefix: a captured step must not bake in the count's bounds check
        sh = self._shadows.data[heads, cand.to(store)]                         # sh: [Hkv, m, C, r]
        sh = sh.to(self.device, non_blocking=True)                             # sh: [Hkv, m, C, r]
        s = torch.einsum("hgr,hmcr->hgmc", qp, sh.float()) * self.scale        # s: [Hkv, G, m, C]
        chunk = s.amax(dim=3) if self.fine_reduce == "max" else torch.logsumexp(s, dim=3)  # chunk: [Hkv, G, m]
        unwritten = cand >= self._count if past_count else None                # unwritten: [Hkv, m]
        if unwritten is not None:
            chunk = chunk.masked_fill(unwritten[:, None], -math.inf)           # chunk: [Hkv, G, m]
        if self.fine_reduce == "max":
            per_chunk = chunk                                                  # per_chunk: [Hkv, G, m]
        else:
            # softmax mass of each candidate chunk among all candidate tokens, per query head
            lse_chunk = chunk                                                  # lse_chunk: [Hkv, G, m]
            lse_all = torch.logsumexp(lse_chunk, dim=2, keepdim=True)          # lse_all: [Hkv, G, 1]
            per_chunk = torch.exp(lse_chunk - lse_all)                         # per_chunk: [Hkv, G, m]
        scores = group_reduce(per_chunk, self.group_reduce)                    # scores: [Hkv, m]
        return scores if unwritten is None else scores.masked_fill(unwritten, -math.inf)

    @property
    def num_chunks(self) -> int:
        return self._num_chunks

    @property
    def nbytes(self) -> dict[str, int]:
        inner = self._summary.nbytes if self._summary is not None else {"gpu": 0, "host": 0}
        basis = self.basis.numel() * self.basis.element_size() if self.basis is not None else 0
        gpu, host = self._means.nbytes + inner["gpu"] + basis, inner["host"]
        if self.shadows_on == "host":
            return {"gpu": gpu, "host": host + self._shadows.nbytes}
        return {"gpu": gpu + self._shadows.nbytes, "host": host}


def _chunk_scores_kernel(q: torch.Tensor, operands, cand: torch.Tensor, fine_reduce: str, how: str,
                         count: torch.Tensor):
    """ShadowKeyIndex._fine_scores in two launches (tokens.cu: per-chunk log-sum-exp or max of the tokens' low-rank
    logits, then the softmax share and the group reduce; -inf past the count) -> float32 [Hkv, m]; None where the
    kernels do not apply (the torch path in _fine_scores is their reference)."""
    if operands is None or not q.is_cuda or not kernels.KERNELS_AVAILABLE or kernels._backend() is None:
        return None
    from offload.kernels import _cupy_tokens as cp
    basis, shadows, scale = operands
    mode = cp.CHUNK_MAX if fine_reduce == "max" else cp.CHUNK_LSE
    cand = cand.contiguous()                                                   # cand: [Hkv, m]
    if not cp.supports_shadow_logits(q, basis, shadows, cand, mode):
        return None
    chunk = cp.shadow_logits(q, basis, shadows, cand, None, scale, mode)[0]    # chunk: [Hkv, G, m]
    return cp.chunk_reduce(chunk, cand, count, fine_reduce == "mass", how == "sum")   # [Hkv, m]


def _coarse_rows(bounds: torch.Tensor, count: torch.Tensor, m: int) -> torch.Tensor:
    """The m best rows of bounds [Hkv, cap] among the first `count` -> int64 [Hkv, m]: the fine stage re-ranks them,
    so their order does not matter and the sort of topk_rows is skipped where the CuPy select applies (the same
    set: ties go to the lower row in both)."""
    if kernels._backend() is not None:
        from offload.kernels import _cupy_tokens as cp
        if cp.supports_select_rows(bounds, count, m):
            return cp.select_rows(bounds, count, m)                            # [Hkv, m] in row order
    return kernels.topk_rows(bounds, count, m)                                 # [Hkv, m] best first
