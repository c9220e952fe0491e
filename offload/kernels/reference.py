"""Pure-torch references of the kernels: the CPU path, and the ground truth the CuPy kernels are tested against.

Shapes (one layer, batch 1, one decode step):
    q:     [Hq, D]                 decode query, post-RoPE
    pool:  [S, 2, Hkv, C, D]       chunk pool (K post-RoPE at index 0, V at 1)
    slots: [Hkv, K]                per KV head, the pool slots to attend; -1 = padding
GQA: query head h reads KV head h // (Hq // Hkv). Outputs are float32 whatever the input dtype;
an attention over nothing gives o = 0 and lse = -inf, so that `merge_attn` can ignore it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ALT_SLOT = 1 << 30   # a slot flagged with this bit lives in gather_attend's alt_pool (OFL_ALT_SLOT in the .cu)
MASS_UNIT = 1 << 40  # token mass in fixed point (OFL_MASS_SHIFT in common.cuh): integer sums are exact in any order

__all__ = ["ALT_SLOT", "gather_attend", "merge_attn", "dense_attend", "score_chunks", "chunk_bounds", "combine_selection",
           "slot_lookup", "plan_slots", "SlotLists", "merge_slot_lists", "topk_rows", "select_top",
           "mass_fixed", "mass_need", "mass_keep", "gather_rows"]


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # float64 inputs stay float64 (tests use them as ground truth); everything else runs in float32
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of a query group per KV head over keys marked valid."""
    hq, d = q.shape
    hkv, n, _ = k.shape
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    dt = _compute_dtype(q, k, v)
    qg = q.to(dt).reshape(hkv, hq // hkv, d)                        # qg: [Hkv, G, D]
    s = torch.einsum("hgd,hnd->hgn", qg, k.to(dt)) * scale          # s: [Hkv, G, N]
    if valid is not None:
        s = s.masked_fill(~valid[:, None, :], float("-inf"))        # s: [Hkv, G, N]
    lse = torch.logsumexp(s, dim=-1) if n else s.new_full((hkv, hq // hkv), float("-inf"))  # lse: [Hkv, G]
    # a group with no valid key has lse = -inf; subtracting 0 instead keeps its p = exp(-inf) = 0, not NaN
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])  # p: [Hkv, G, N]
    o = torch.einsum("hgn,hnd->hgd", p, v.to(dt))                  # o: [Hkv, G, D]
    return o.reshape(hq, d).float(), lse.reshape(hq).float()


def gather_attend(q: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor, scale: float,
                  alt_pool: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the chunks `slots` of `pool`, per KV head -> (o [Hq, D] f32, lse [Hq] f32).

    With alt_pool (same chunk layout), slots flagged ALT_SLOT are read from it instead.
    """
    if alt_pool is not None:
        flagged = (slots >= 0) & (slots & ALT_SLOT != 0)                  # flagged: [Hkv, K]
        none = torch.full_like(slots, -1)                                 # none: [Hkv, K]
        own = gather_attend(q, pool, torch.where(flagged, none, slots), scale)
        alt = gather_attend(q, alt_pool, torch.where(flagged, slots & ~ALT_SLOT, none), scale)
        return merge_attn(*own, *alt)
    _, two, hkv, c, d = pool.shape
    if two != 2 or slots.dim() != 2 or slots.shape[0] != hkv:
        raise ValueError(f"pool {tuple(pool.shape)} / slots {tuple(slots.shape)} do not match "
                         "[S, 2, Hkv, C, D] / [Hkv, K]")
    slots_p = slots.to(device=pool.device, dtype=torch.long)          # slots_p: [Hkv, K]
    valid = slots_p >= 0                                              # valid: [Hkv, K]
    heads = torch.arange(hkv, device=pool.device)[:, None]            # heads: [Hkv, 1]
    # advanced indices split by a slice put their broadcast dims first
    kv = pool[slots_p.clamp(min=0), :, heads]                         # kv: [Hkv, K, 2, C, D]
    kv = kv.to(q.device)                                              # a host pool is gathered on the host
    k = kv[:, :, 0].reshape(hkv, -1, d)                               # k: [Hkv, K*C, D]
    v = kv[:, :, 1].reshape(hkv, -1, d)                               # v: [Hkv, K*C, D]
    valid = valid.to(q.device).repeat_interleave(c, dim=1)            # valid: [Hkv, K*C]
    return _attend(q, k, v, valid, scale)


def dense_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 n_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over k, v: [Hkv, N, D] (sinks + local window) -> (o [Hq, D] f32, lse [Hq] f32).

    n_valid (int64 [1], may live on the device): attend to the first n_valid keys only, without a host sync.
    """
    if n_valid is None:
        return _attend(q, k, v, None, scale)
    hkv, n, _ = k.shape
    valid = (torch.arange(n, device=k.device) < n_valid.to(k.device)).expand(hkv, n)  # valid: [Hkv, N]
    return _attend(q, k, v, valid, scale)


def merge_attn(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
               lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two attentions over disjoint key sets: o [..., D], lse [...] -> float32."""
    lse1, lse2 = lse1.float(), lse2.float()                             # lse: [...]
    m = torch.maximum(lse1, lse2)                                      # m: [...]
    m = torch.where(torch.isinf(m), 0.0, m)                            # both empty: weights exp(-inf) = 0
    w1, w2 = torch.exp(lse1 - m), torch.exp(lse2 - m)                  # w: [...]
    total = w1 + w2                                                    # total: [...]
    lse = m + torch.log(total)                                         # lse: [...] (-inf when both empty)
    inv = torch.where(total > 0, 1.0 / total, 0.0)                     # inv: [...]
    o = (o1.float() * (w1 * inv)[..., None] + o2.float() * (w2 * inv)[..., None])  # o: [..., D]
    return o, lse


def chunk_bounds(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, n_valid: int,
                 group_reduce: str = "max") -> torch.Tensor:
    """Quest upper bounds of q.k per KV head and chunk, combined over the query group -> [Hkv, n_valid] f32.

    sum_d max(q_d*kmin_d, q_d*kmax_d) equals q+ . kmax + q- . kmin whenever kmin <= kmax (true for
    per-chunk min/max), which turns the bound into two batched matmuls.
    """
    if group_reduce not in ("max", "sum"):
        raise ValueError(f"group_reduce must be 'max' or 'sum', not {group_reduce!r}")
    hq, d = q.shape
    hkv = kmin.shape[0]
    dt = _compute_dtype(q, kmin, kmax)
    qg = q.to(dt).reshape(hkv, hq // hkv, d)                           # qg: [Hkv, G, D]
    lo = kmin[:, :n_valid].to(device=q.device, dtype=dt)               # lo: [Hkv, N, D]
    hi = kmax[:, :n_valid].to(device=q.device, dtype=dt)               # hi: [Hkv, N, D]
    bound = (torch.einsum("hgd,hnd->hgn", qg.clamp(min=0), hi)
             + torch.einsum("hgd,hnd->hgn", qg.clamp(max=0), lo))      # bound: [Hkv, G, N]
    out = bound.amax(dim=1) if group_reduce == "max" else bound.sum(dim=1)  # out: [Hkv, N]
    return out.float()


def score_chunks(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, n_valid: int, k: int,
                 group_reduce: str = "max") -> torch.Tensor:
    """Top-k chunk ids per KV head by Quest bound, best first -> int64 [Hkv, min(k, n_valid)]."""
    bounds = chunk_bounds(q, kmin, kmax, n_valid, group_reduce)       # bounds: [Hkv, n_valid]
    return torch.topk(bounds, min(k, n_valid), dim=1).indices          # ids: [Hkv, k']


def combine_selection(sel: torch.Tensor, n_valid: torch.Tensor, n_sink: int, n_window: int, budget: int,
                      streaming: torch.Tensor) -> torch.Tensor:
    """Chunk ids one decode query attends per KV head -> int64 [Hkv, F + M], -1 = nothing.

    sel: [Hkv, M] an index's best-first ids; n_valid: int64 [1] full chunks (may live on the device);
    streaming: [Hkv] bool. Sinks and the window come first (F = n_sink + n_window), then the first
    `budget` ids of sel outside them (none for a streaming head).
    """
    hkv = sel.shape[0]
    n_valid = n_valid.to(sel.device)
    keep = (sel >= n_sink) & (sel < n_valid - n_window)                      # keep: [Hkv, M]
    keep &= torch.cumsum(keep.int(), dim=1) <= budget
    keep &= ~streaming.to(sel.device)[:, None]
    picked = torch.where(keep, sel, torch.full_like(sel, -1))                 # picked: [Hkv, M]
    window = n_valid - n_window + torch.arange(n_window, device=sel.device)   # window: [n_window]
    fixed = torch.cat([torch.arange(n_sink, device=sel.device), window])      # fixed: [F]
    return torch.cat([fixed.expand(hkv, -1), picked], dim=1)                  # [Hkv, F + M]


def slot_lookup(ids: torch.Tensor, tier: torch.Tensor, slot: torch.Tensor, hits: torch.Tensor,
                chunk_hits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool slots of ids [Hkv, K] (-1 = nothing) -> (gpu_slots, host_slots) int32 [Hkv, K], -1 elsewhere.

    tier: int8 [max chunks] (0 gpu, 1 host, 2 disk), slot: int64 [max chunks]. Counts in place:
    hits[1 + tier] += 1 per id (hits[0] per -1), chunk_hits[id] += 1.
    """
    valid = ids >= 0                                                         # valid: [Hkv, K]
    safe = ids.clamp(min=0)                                                  # safe: [Hkv, K]
    t = torch.where(valid, tier[safe].long(), -1)                            # t: [Hkv, K]
    s = slot[safe]                                                           # s: [Hkv, K]
    hits.index_add_(0, (t + 1).flatten(), torch.ones_like(t).flatten())
    chunk_hits.index_add_(0, safe.flatten(), valid.flatten().to(chunk_hits.dtype))
    none = torch.full_like(s, -1)                                            # none: [Hkv, K]
    return torch.where(t == 0, s, none).int(), torch.where(t == 1, s, none).int()


@dataclass(frozen=True)
class SlotLists:
    """plan_slots' result for one layer: per KV head and column, where each attended chunk is read.

    gpu:  int32 [Hkv, K] GPU-pool slots (-1 elsewhere), or, merged, every slot with host-slab ones flagged ALT_SLOT
    host: int32 [Hkv, K] host-slab slots (-1 elsewhere); None when merged
    ids:  int64 [Hkv, K] the attended chunk ids (-1 = nothing); only when asked for (with_ids)
    """
    gpu: torch.Tensor
    host: torch.Tensor | None = None
    ids: torch.Tensor | None = None


def plan_slots(sel, table, merged: bool = False, with_ids: bool = False) -> SlotLists:
    """combine_selection then slot_lookup: the slot lists of one layer's decode step (see both).

    sel: a Selection (ids, take, n_sink, n_window, streaming, token_k); table: a ChunkTable (count, tier, slot
    and the counters attended [4], candidates [4], chunk_hits). With sel.token_k the selection columns count
    into table.candidates, sinks + window into table.attended; otherwise everything into table.attended.
    merged: one list where host-slab slots carry ALT_SLOT, for a two-pool gather_attend.
    """
    ids = combine_selection(sel.ids, table.count, sel.n_sink, sel.n_window, sel.take, sel.streaming)  # [Hkv, F + M]
    f = sel.n_sink + sel.n_window if sel.token_k else ids.shape[1]
    lists = [slot_lookup(part, table.tier, table.slot, h, table.chunk_hits)
             for part, h in ((ids[:, :f], table.attended), (ids[:, f:], table.candidates))]
    gpu, host = (torch.cat(pair, dim=1) for pair in zip(*lists))          # [Hkv, F + M] x2
    out_ids = ids if with_ids else None
    return SlotLists(merge_slot_lists(gpu, host), None, out_ids) if merged else SlotLists(gpu, host, out_ids)


def merge_slot_lists(gpu: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
    """One slot list from the GPU-pool and host-slab lists [Hkv, K] (-1 elsewhere): host slots flagged ALT_SLOT."""
    return torch.where(host >= 0, host | ALT_SLOT, gpu)                       # [Hkv, K]


def topk_rows(scores: torch.Tensor, count: torch.Tensor, k: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k row ids per head of scores [Hkv, N] among the first `count` rows (int64 [1], may live on the
    device), best first -> int64 [Hkv, k]; with ids [Hkv, N], ids of those rows. Scoring every allocated row and
    masking the rest keeps shapes static, so a captured decode step stays valid while chunks are appended."""
    rows = torch.arange(scores.shape[1], device=scores.device)                # rows: [N]
    masked = scores.float().masked_fill(rows >= count.to(scores.device), float("-inf"))  # masked: [Hkv, N]
    top = torch.topk(masked, k, dim=1).indices                                # top: [Hkv, k]
    return top if ids is None else ids.gather(1, top)                         # [Hkv, k]


def select_top(r: torch.Tensor, k: int) -> torch.Tensor:
    """The top k of r [Hkv, M] per row, ties to the lower position, in position order -> int64 [Hkv, k]: the set the
    select kernels (select.cu) pick, position for position. A stable descending sort keeps tied positions in order."""
    order = torch.sort(r.float(), dim=1, descending=True, stable=True).indices   # order: [Hkv, M]
    return order[:, :k].sort(dim=1).values                                     # [Hkv, k]


def mass_fixed(r: torch.Tensor) -> torch.Tensor:
    """Softmax shares as int64 multiples of 2^-40 (round half to even, as __double2ll_rn): sums of these are exact in
    any order, so the kernels (which add in a tree) and torch (cumsum) keep the same tokens."""
    return torch.round(r.double() * MASS_UNIT).long()


def mass_need(mass: float, g: int) -> int:
    """The token mass p in mass_fixed units of a group-summed share (a query group of g heads sums to g)."""
    return round(mass * g * MASS_UNIT)


def mass_keep(idx: torch.Tensor, r: torch.Tensor, ok: torch.Tensor, total: torch.Tensor, g: int, mass: float,
              floor: int) -> torch.Tensor:
    """Which top-k picks a token mass threshold keeps -> bool [Hkv, k] in the picks' order (mass.cu's reference).

    idx [Hkv, k]: the picks' candidate positions (distinct per head, any order); r [Hkv, k]: their group-summed
    softmax shares (normalised with what is attended anyway); ok [Hkv, k]: held; total int64 [Hkv]: mass_fixed(r)
    summed over every held candidate of the head. Best first = r descending, ties to the lower position, not held
    last. Kept: held picks among the fewest leading ones whose shares plus the base share (g - total: sinks, window,
    tail) reach g * mass, and at least `floor` leading ones; in mass_fixed units."""
    pos = idx.argsort(dim=1)                                                  # pos: [Hkv, k] position order
    key = r.masked_fill(~ok, float("-inf")).gather(1, pos)                    # key: [Hkv, k]
    best = pos.gather(1, torch.sort(key, dim=1, descending=True, stable=True).indices)   # best: [Hkv, k] columns
    fx = mass_fixed(r.masked_fill(~ok, 0.0)).gather(1, best)                   # fx: [Hkv, k] best first
    before = torch.cumsum(fx, dim=1) - fx                                     # before: [Hkv, k] mass ahead of it
    base = g * MASS_UNIT - total.to(fx.device)[:, None]                       # base: [Hkv, 1]
    rank = torch.arange(fx.shape[1], device=fx.device)                        # rank: [k]
    keep = (base + before < mass_need(mass, g)) | (rank < floor)[None, :]     # keep: [Hkv, k] best first
    return torch.empty_like(keep).scatter_(1, best, keep) & ok                # [Hkv, k] the picks' order


def gather_rows(pool: torch.Tensor, slots: torch.Tensor, which: int, rows: torch.Tensor | None = None,
                alt_pool: torch.Tensor | None = None) -> torch.Tensor:
    """Single K (which=0) or V (which=1) rows of chunk slots [Hkv, K] of pool [S, 2, Hkv, C, D] -> [Hkv, R, D].

    Row r of head h is position p = rows[h, r] (int64 [Hkv, R]; None: p = r, R = K*C) in the concatenation
    of the head's chunks: slot slots[h, p // C], token p % C. Zeros where p < 0, p >= K*C or the slot is -1.
    With alt_pool (same chunk layout), slots flagged ALT_SLOT are read from it. Output on slots' device.
    """
    check_rows_args(pool, slots, which, rows)
    _, _, hkv, c, d = pool.shape
    dev, k = slots.device, slots.shape[1]
    p = (torch.arange(k * c, device=dev).expand(hkv, -1) if rows is None else rows.to(dev).long())  # p: [Hkv, R]
    inside = (p >= 0) & (p < k * c)                                           # inside: [Hkv, R]
    col = (p.clamp(min=0) // c).clamp(max=max(k - 1, 0))                     # col: [Hkv, R]
    s = slots.to(dev).long().gather(1, col) if k else torch.full_like(p, -1)  # s: [Hkv, R]
    ok = inside & (s >= 0)                                                    # ok: [Hkv, R]
    flagged = ok & (s & ALT_SLOT != 0)                                        # flagged: [Hkv, R] (no alt: zeros)
    s = s & ~ALT_SLOT                                                         # s: [Hkv, R]
    off = p.clamp(min=0) % c                                                  # off: [Hkv, R]
    out = torch.zeros(hkv, p.shape[1], d, dtype=pool.dtype, device=dev)       # out: [Hkv, R, D]
    for src, mask in ((pool, ok & ~flagged), (alt_pool, flagged)):
        if src is None or src.shape[0] == 0:
            continue
        heads = torch.arange(hkv, device=src.device)[:, None]                 # heads: [Hkv, 1]
        si = s.clamp(0, src.shape[0] - 1).to(src.device)                     # si: [Hkv, R]
        got = src[:, which][si, heads, off.to(src.device)].to(dev)            # got: [Hkv, R, D]
        out = torch.where(mask[..., None], got, out)                          # out: [Hkv, R, D]
    return out


def check_rows_args(pool: torch.Tensor, slots: torch.Tensor, which: int, rows: torch.Tensor | None) -> None:
    """gather_rows' shape contract, checked before either path runs (the kernel would read out of bounds)."""
    if (pool.dim() != 5 or pool.shape[1] != 2 or slots.dim() != 2 or slots.shape[0] != pool.shape[2]
            or which not in (0, 1) or (rows is not None and (rows.dim() != 2 or rows.shape[0] != slots.shape[0]))):
        raise ValueError(f"pool {tuple(pool.shape)} / slots {tuple(slots.shape)} / rows "
                         f"{None if rows is None else tuple(rows.shape)} / which={which} do not match "
                         "[S, 2, Hkv, C, D] / [Hkv, K] / [Hkv, R] / 0 (keys) or 1 (values)")
