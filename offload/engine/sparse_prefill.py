"""Sparse prefill (`prefill="sparse"`, lossy, off by default): block-sparse attention over a chunk's history.

A prefill chunk of T queries at positions q_offset.. attends:
  - its own causal square and the local band (the last `local_blocks` key blocks before it, plus any partial
    block) exactly, always;
  - the sink blocks (the first `sink_blocks`), always;
  - of the remaining history key blocks, per query head, the fewest blocks whose estimated attention mass
    reaches `threshold` for some query block of the chunk (union over query blocks, so a question's few
    tokens keep the blocks they need even when the rest of the chunk looks elsewhere).
Block mass is estimated XAttention-style: the sum of each `stride` x `stride` sub-block's antidiagonal of
q.k (one row per `stride` queries against one column per `stride` keys, so 1/stride^2 of the score matrix
at stride x the inner dimension: 1/stride of the QK^T FLOPs), softmaxed per row, summed per block.
Every query head then attends its top-c blocks, c = the most any head of its call group needs: heads that
need fewer get their next-best blocks (a superset, so the threshold still holds), and the group is one
fused attention call over gathered K/V (cuDNN on CUDA, float32 math on the CPU), merged by log-sum-exp.
Threshold 1.0 keeps every block: the result equals exact prefill.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from offload.engine.ops import attend_lse, causal_attend, causal_attend_lse, merge_lse


@dataclass(frozen=True)
class SparsePrefill:
    threshold: float = 0.95       # cumulative estimated mass each query block keeps (1.0 = exact)
    block: int = 128              # key and query block tokens
    stride: int = 16              # antidiagonal stride of the mass estimate (divides block)
    sink_blocks: int = 1          # first key blocks, always attended
    local_blocks: int = 8         # key blocks just before the chunk, always attended (the local band)
    heads_per_call: int = 8       # query heads gathered into one attention call (bounds the gathered K/V)
    # history past a tiered session's prefill window (engine/staging.py) is not scored block by block: the layer's
    # sparse-decode index picks `stream_tokens` per KV head for each query block's mean query, and the union over
    # heads and query blocks (plus the sinks) is attended. 0 = streamed history is attended exactly
    stream_tokens: int = 512
    stream_last: int = 64         # ... and for each of the chunk's last queries alone (a prompt's question is there)

    def __post_init__(self):
        if not 0 < self.threshold <= 1 or self.block % self.stride or self.stride < 1 or self.stream_tokens < 0:
            raise ValueError("sparse prefill: threshold in (0, 1], block a multiple of stride, stream_tokens >= 0")


class PrefillStats:
    """Key blocks attended vs. available over all sparse chunks (density); mutable counters, read by stats()."""

    def __init__(self):
        self.kept, self.total, self.chunks = 0, 0, 0
        self.streamed_kept, self.streamed_total = 0, 0      # chunks of streamed history attended vs. available

    def as_dict(self) -> dict:
        out = {"sparse_prefill_chunks": self.chunks,
               "sparse_prefill_density": round(self.kept / self.total, 4) if self.total else 1.0}
        if self.streamed_total:
            out["sparse_prefill_streamed_density"] = round(self.streamed_kept / self.streamed_total, 4)
        return out


def sparse_causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int,
                         cfg: SparsePrefill, stats: PrefillStats | None = None) -> torch.Tensor:
    """Like ops.causal_attend (q: [Hq, T, D], k/v: [Hkv, q_offset + T, D] -> [Hq, T, D]) with block-sparse history."""
    n_full = q_offset // cfg.block
    if max(cfg.sink_blocks, n_full - cfg.local_blocks) <= cfg.sink_blocks:
        return causal_attend(q, k, v, q_offset)  # nothing to skip
    return sparse_causal_attend_lse(q, k, v, q_offset, cfg, stats)[0].to(q.dtype)  # [Hq, T, D]


def sparse_causal_attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int,
                             cfg: SparsePrefill, stats: PrefillStats | None = None):
    """sparse_causal_attend with its log-sum-exp: float32 (o [Hq, T, D], lse [Hq, T])."""
    B = cfg.block
    n_full = q_offset // B                       # whole key blocks of history
    first_local = max(cfg.sink_blocks, n_full - cfg.local_blocks)
    if first_local <= cfg.sink_blocks:
        return causal_attend_lse(q, k, v, q_offset)  # nothing to skip
    # exact: local band (+ partial block) and the causal square
    dense_k, dense_v = k[:, first_local * B:], v[:, first_local * B:]  # [Hkv, q_offset + T - first_local*B, D]
    o, lse = causal_attend_lse(q, dense_k, dense_v, q_offset - first_local * B)
    idx = select_blocks(q, k[:, :first_local * B], cfg)  # idx: [Hq, c] block ids in [0, first_local)
    if stats is not None:
        stats.kept += int((idx >= 0).sum()) + q.shape[0] * (n_full - first_local)
        stats.total += q.shape[0] * n_full
        stats.chunks += 1
    o2, lse2 = attend_blocks(q, k, v, idx, cfg)
    return merge_lse(o, lse, o2, lse2)  # f32 o: [Hq, T, D], lse: [Hq, T]


def block_mass(q: torch.Tensor, k: torch.Tensor, cfg: SparsePrefill) -> torch.Tensor:
    """Estimated attention mass of each whole key block for each query block and head.

    q: [Hq, T, D], k: [Hkv, nK*B, D] -> mass: [Hq, nQ, nK] float32, each (head, query block) summing to 1.
    """
    Hq, T, D = q.shape
    Hkv, S, _ = k.shape
    G, s, B = Hq // Hkv, cfg.stride, cfg.block
    nQ, nK = -(-T // B), S // B
    Tp = nQ * B
    qp = torch.zeros(Hq, Tp, D, device=q.device, dtype=q.dtype)  # qp: [Hq, nQ*B, D], zero rows past T
    qp[:, :T] = q
    # row r of qa holds queries r*s + s-1, ..., r*s (reversed); column c of ka keys c*s, ..., c*s + s-1:
    # qa[r] . ka[c] = the antidiagonal sum of the s x s sub-block (r, c)
    qa = qp.view(Hq, Tp // s, s, D).flip(2).reshape(Hkv, G * (Tp // s), s * D)  # qa: [Hkv, G*Tp/s, s*D]
    ka = k.reshape(Hkv, S // s, s * D)  # ka: [Hkv, S/s, s*D]
    rows_valid = (torch.arange(Tp // s, device=q.device) * s < T).float()  # [Tp/s] rows with a real query
    out = torch.empty(Hq, nQ, nK, device=q.device, dtype=torch.float32)  # out: [Hq, nQ, nK]
    for h in range(Hkv):   # one KV head's group at a time bounds the score buffer (256 x S/16 per head)
        sc = torch.matmul(qa[h], ka[h].transpose(0, 1)).float() * (D ** -0.5 / s)  # sc: [G*Tp/s, S/s]
        p = torch.softmax(sc, dim=-1).view(G, nQ, B // s, nK, B // s)  # p: [G, nQ, B/s, nK, B/s]
        w = rows_valid.view(1, nQ, B // s, 1)  # w: [1, nQ, B/s, 1]
        m = (p.sum(-1) * w).sum(2)  # m: [G, nQ, nK]
        out[h * G:(h + 1) * G] = m / w.sum(2).clamp_min(1)
    return out


def select_blocks(q: torch.Tensor, k_hist: torch.Tensor, cfg: SparsePrefill) -> torch.Tensor:
    """Block ids each query head attends among k_hist's nK whole blocks: idx [Hq, c], c equal for a call group.

    q: [Hq, T, D], k_hist: [Hkv, nK*B, D]. Sinks are always in; the rest by per-query-block threshold (union
    over query blocks, of the estimated mass renormalised without the sinks), padded per call group with each
    head's next-best blocks.
    """
    mass = block_mass(q, k_hist, cfg)  # mass: [Hq, nQ, nK]
    # sinks are always attended and usually hold most of the mass: the threshold applies to the rest
    mass[..., :cfg.sink_blocks] = 0
    mass = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
    keep = threshold_keep(mass, cfg.threshold).any(1)  # keep: [Hq, nK]
    keep[:, :cfg.sink_blocks] = True
    # rank: chosen blocks first (priority >= 2), then the rest by their largest mass over query blocks
    prio = keep.float() * 2 + mass.amax(1)  # prio: [Hq, nK]
    Hq, nK = keep.shape
    counts = keep.sum(1)  # counts: [Hq]
    n = cfg.heads_per_call
    cols = []
    for g in range(0, Hq, n):
        c = int(counts[g:g + n].max())
        cols.append(torch.topk(prio[g:g + n], c, dim=1).indices.sort(1).values)  # [n, c]
    width = max(x.shape[1] for x in cols)
    # groups of unequal c are padded with -1 (skipped by attend_blocks) so the ids fit one tensor
    return torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1]), value=-1) for x in cols])  # [Hq, c]


def threshold_keep(mass: torch.Tensor, threshold: float) -> torch.Tensor:
    """mass [..., nK] summing to 1 -> bool [..., nK]: the fewest largest blocks whose mass reaches threshold."""
    if threshold >= 1.0:
        return torch.ones_like(mass, dtype=torch.bool)
    srt, order = torch.sort(mass, dim=-1, descending=True)  # srt: [..., nK]
    before = torch.cumsum(srt, dim=-1) - srt  # mass of the blocks ranked above each one
    take = before < threshold  # take: [..., nK] (the block that crosses the threshold is taken too)
    return torch.zeros_like(take).scatter(-1, order, take)


def attend_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, cfg: SparsePrefill):
    """Attention of each query head over its own key blocks idx [Hq, c] (-1 = none) of k/v [Hkv, >= nK*B, D].

    Heads are gathered `heads_per_call` at a time into [n, c*B, D] K/V and attended in one call (no GQA
    there: each head has its own keys). Returns float32 o [Hq, T, D] and lse [Hq, T] (-inf where no block).
    """
    Hq, T, D = q.shape
    Hkv, B = k.shape[0], cfg.block
    G, n = Hq // Hkv, cfg.heads_per_call
    nK = idx.clamp_min(0).max().item() + 1 if idx.numel() else 0
    kb = k[:, :nK * B].reshape(Hkv, nK, B, D)  # kb: [Hkv, nK, B, D]
    vb = v[:, :nK * B].reshape(Hkv, nK, B, D)  # vb: [Hkv, nK, B, D]
    o = torch.zeros(Hq, T, D, device=q.device, dtype=torch.float32)  # o: [Hq, T, D]
    lse = torch.full((Hq, T), float("-inf"), device=q.device)  # lse: [Hq, T]
    for g in range(0, Hq, n):
        ids = idx[g:g + n]  # ids: [n', c]
        c = int((ids[0] >= 0).sum())   # one call group shares its count
        if c == 0:
            continue
        heads = torch.arange(g, g + ids.shape[0], device=q.device) // G  # KV head of each query head: [n']
        kg = kb[heads[:, None], ids[:, :c]].reshape(-1, c * B, D)  # kg: [n', c*B, D]
        vg = vb[heads[:, None], ids[:, :c]].reshape(-1, c * B, D)  # vg: [n', c*B, D]
        og, lg = attend_lse(q[g:g + n], kg, vg, causal=False)  # og: [n', T, D]
        o[g:g + n], lse[g:g + n] = og.float(), lg
    return o, lse


def streamed_chunks(q: torch.Tensor, index, n: int, chunk_tokens: int, sink_chunks: int,
                    cfg: SparsePrefill) -> torch.Tensor:
    """Chunk ids among the first n stored ones that a chunk's queries attend from streamed history: the union, over
    KV heads and queries, of the index's best `stream_tokens` per head for each query block's mean query and for
    each of the last `stream_last` queries, plus the sinks. q: [Hq, T, D] -> int64 [K] sorted, on the CPU (the store looks them up there)."""
    per = max(1, -(-cfg.stream_tokens // chunk_tokens))                  # chunks per head and query block
    hit = torch.zeros(n + 1, dtype=torch.int32, device=q.device)         # hit: [n + 1], column n = "not streamed"
    T = q.shape[1]
    # a block's mean query finds what the block as a whole attends; a single token's need (the question at
    # the end of a prompt asking for a fact far back) is diluted there, so the last queries also ask alone
    reps = [q[:, a:a + cfg.block].float().mean(1).to(q.dtype) for a in range(0, T, cfg.block)]
    reps += [q[:, t] for t in range(max(0, T - cfg.stream_last), T)]   # each [Hq, D]
    for rep in reps:
        ids = index.select(rep, per)                                     # ids: [Hkv, per] best first
        ids = ids.to(q.device).reshape(-1).clamp(0, n)                   # ids in the window count as column n
        hit.scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
    hit[:min(sink_chunks, n)] += 1
    return torch.nonzero(hit[:n]).flatten().cpu()                       # [K]
