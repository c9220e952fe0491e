"""Token-level second selection stage: torch ops around `gather_rows` (a CuPy kernel on the GPU).

The index proposes candidate chunks; this stage reads their keys only, scores every candidate token
exactly (q.k), keeps the top `k` tokens per KV head and attends over those K/V rows. Chunk selection
spends its budget on whole chunks whose attention mass is spread unevenly; tokens do not.

Shapes (one layer, batch 1, one decode step), as in `reference`:
    q:      [Hq, D]                 decode query, post-RoPE
    parts:  ((pool [S, 2, Hkv, C, D], slots [Hkv, K], alt pool or None), ...)   candidate chunks per pool,
            all parts in one column layout (that of `FetchPlan.parts`): -1 = padding or held by another
            part; slots flagged ALT_SLOT are read from the alt pool (the host slab next to the GPU pool)
On the GPU every step is a fixed-shape kernel with no host sync (host-slab rows are read in place under
UVA), so a decode step with this stage is captured in one CUDA graph like the chunk path.
Group reduce (how a KV head's query group ranks a token, as the summary index ranks chunks):
    max     max over the group of q.k
    sum     sum over the group of softmax probabilities, normalised with `base_lse` (the log-sum-exp of
            what is attended anyway: tail, sinks, window) so a head that looks mostly at sinks weighs less
"""
from __future__ import annotations

import torch

from .reference import _attend, _compute_dtype, mass_fixed, mass_keep

__all__ = ["token_scores", "rank_logits", "select_tokens", "mass_keep", "gather_candidate_keys", "gather_picked_rows",
           "candidate_valid", "token_attend", "ranked_token_attend", "GROUP_REDUCES"]

GROUP_REDUCES = ("max", "sum")


def token_scores(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scale: float,
                 group_reduce: str = "sum", base_lse: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of every candidate token per KV head: keys [Hkv, M, D], valid [Hkv, M] -> [Hkv, M] (-inf invalid)."""
    if group_reduce not in GROUP_REDUCES:
        raise ValueError(f"group_reduce must be one of {GROUP_REDUCES}, not {group_reduce!r}")
    hq, d = q.shape
    hkv = keys.shape[0]
    dt = _compute_dtype(q, keys)
    qg = q.to(dt).reshape(hkv, hq // hkv, d)                              # qg: [Hkv, G, D]
    s = torch.einsum("hgd,hmd->hgm", qg, keys.to(dt)) * scale             # s: [Hkv, G, M]
    return rank_logits(s, valid, group_reduce, base_lse)


def rank_logits(s: torch.Tensor, valid: torch.Tensor, group_reduce: str = "sum",
                base_lse: torch.Tensor | None = None) -> torch.Tensor:
    """token_scores from the logits s = scale * q.k [Hkv, G, M] (exact, or estimated from low-rank key shadows)
    -> [Hkv, M] (-inf invalid)."""
    if group_reduce not in GROUP_REDUCES:
        raise ValueError(f"group_reduce must be one of {GROUP_REDUCES}, not {group_reduce!r}")
    hkv, g, _ = s.shape
    dt = s.dtype
    s = s.masked_fill(~valid[:, None, :], float("-inf"))                  # s: [Hkv, G, M]
    if group_reduce == "max":
        r = s.amax(dim=1)                                                 # r: [Hkv, M]
    else:
        norm = torch.logsumexp(s, dim=-1)                                 # norm: [Hkv, G]
        if base_lse is not None:
            norm = torch.logaddexp(norm, base_lse.to(dt).reshape(hkv, g))   # norm: [Hkv, G]
        # a group with nothing valid has norm = -inf; subtracting 0 keeps its p = 0 instead of NaN
        p = torch.exp(s - torch.where(torch.isinf(norm), 0.0, norm)[..., None])  # p: [Hkv, G, M]
        r = p.sum(dim=1)                                                  # r: [Hkv, M]
    return r.masked_fill(~valid, float("-inf"))                           # r: [Hkv, M]


def select_tokens(q: torch.Tensor, keys: torch.Tensor | None, valid: torch.Tensor, k: int, scale: float,
                  group_reduce: str = "sum", base_lse: torch.Tensor | None = None, mass: float = 0.0,
                  floor: int = 0, logits: torch.Tensor | None = None):
    """Top-k candidate tokens per KV head -> (idx int64 [Hkv, k'], ok bool [Hkv, k']), k' = min(k, M).

    Static shapes (no host sync): when a head has fewer than k valid candidates, the extra picks are
    marked not ok. mass > 0 (group reduce "sum" only): k is a cap; per KV head only the fewest best tokens
    whose mass, with what base_lse covers, reaches `mass` stay ok (at least `floor` of them): reference.mass_keep
    (shares in fixed point, ties to the lower position). Shares are normalised over base + candidates (the tokens
    no candidate holds are unknown), so the estimate is an upper bound of the true mass.
    logits [Hkv, G, M]: rank by these (scale * q.k estimated without the keys) instead of keys [Hkv, M, D].
    """
    if logits is None:
        r = token_scores(q, keys, valid, scale, group_reduce, base_lse)  # r: [Hkv, M]
    else:
        r = rank_logits(logits, valid, group_reduce, base_lse)           # r: [Hkv, M]
    # unsorted: attention does not care about order, and the sort costs as much as the selection on the GPU
    top = torch.topk(r, min(k, r.shape[1]), dim=1, sorted=False)          # [Hkv, k']
    idx = top.indices                                                     # idx: [Hkv, k']
    ok = valid.gather(1, idx)                                             # ok: [Hkv, k']
    if mass > 0:
        if group_reduce != "sum":
            raise ValueError("a token mass threshold needs group_reduce 'sum' (softmax shares), not 'max'")
        total = mass_fixed(r.masked_fill(~valid, 0.0)).sum(1)             # total: [Hkv] candidates' share
        ok = mass_keep(idx, top.values, ok, total, q.shape[0] // valid.shape[0], mass, floor)   # ok: [Hkv, k']
    return idx, ok


def _rows(pool, slots, which: int, rows, alt, packed):
    """gather_rows, or quant.gather_rows_q when a pool holds packed (int8/int4) chunks of format `packed`."""
    if packed is not None:
        from .quant import gather_rows_q, is_packed
        if is_packed(pool) or is_packed(alt):
            return gather_rows_q(pool, slots, which, rows, alt, packed, packed.raw_dtype)
    from . import gather_rows
    return gather_rows(pool, slots, which, rows, alt)


def _chunk_tokens(parts, packed) -> int:
    return packed.chunk_tokens if packed is not None else parts[0][0].shape[3]


def candidate_valid(parts, chunk_tokens: int, device) -> torch.Tensor:
    """Which candidate token columns hold a chunk in some part -> bool [Hkv, K*C] (no key is read)."""
    held = None
    for _, slots, _ in parts:
        s = slots.to(device) >= 0                                         # s: [Hkv, K]
        held = s if held is None else held | s
    return held.repeat_interleave(chunk_tokens, dim=1)                    # [Hkv, K*C]


def gather_candidate_keys(parts, hkv: int, device, packed=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (only) of every candidate chunk -> (keys [Hkv, K*C, D], valid [Hkv, K*C]).

    The parts share one column layout (a chunk's slot is >= 0 in exactly one part), and gather_rows writes
    zeros where a part's slot is -1, so the parts add up: one buffer of K*C rows however many parts there are.
    """
    keys = None
    for pool, slots, alt in parts:
        k = _rows(pool, slots.to(device), 0, None, alt, packed)           # k: [Hkv, K*C, D] (V is not read)
        keys = k if keys is None else keys.add_(k)
    return keys, candidate_valid(parts, _chunk_tokens(parts, packed), device)


def gather_picked_rows(parts, idx: torch.Tensor, ok: torch.Tensor, which: int, dtype=None,
                       packed=None) -> torch.Tensor:
    """K (which=0) or V (which=1) rows of the picked candidates idx [Hkv, k] (positions in the parts' shared
    column layout; not ok: zeros) -> [Hkv, k, D], in `dtype` when given."""
    rows = torch.where(ok, idx, -1)                                       # rows: [Hkv, k]
    out = None
    for pool, slots, alt in parts:
        got = _rows(pool, slots.to(idx.device), which, rows, alt, packed)  # got: [Hkv, k, D], zeros elsewhere
        out = got if out is None else out.add_(got)
    return out if dtype is None else out.to(dtype)                       # [Hkv, k, D]


def token_attend(q: torch.Tensor, parts, k: int, scale: float, group_reduce: str = "sum",
                 base_lse: torch.Tensor | None = None, packed=None, mass: float = 0.0,
                 floor: int = 0, logits: torch.Tensor | None = None,
                 rows_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over the top-k tokens per KV head of the candidate chunks -> (o [Hq, D], lse [Hq]) f32.

    Merge the result with `merge_attn`: the picked tokens are disjoint from what base_lse covers. packed: the
    PackedFormat of parts whose pools hold int8/int4 chunks (their rows are dequantized as they are read).
    mass > 0: k is a cap and each KV head attends the fewest tokens reaching that mass (select_tokens).
    logits [Hkv, G, K*C]: the candidates ranked by these estimates (low-rank key shadows on the GPU) instead of
    their keys: only the picked tokens' K and V rows are read, so candidate keys never cross PCIe.
    rows_out (int64 [1], optional): += the token rows attended (summed over KV heads), on the device.
    """
    hq, d = q.shape
    if not parts:
        return q.new_zeros(hq, d, dtype=torch.float32), q.new_full((hq,), float("-inf"), dtype=torch.float32)
    hkv = packed.num_kv_heads if packed is not None else parts[0][0].shape[2]
    if logits is None:
        keys, valid = gather_candidate_keys(parts, hkv, q.device, packed)  # keys: [Hkv, M, D], valid: [Hkv, M]
    else:
        keys, valid = None, candidate_valid(parts, _chunk_tokens(parts, packed), q.device)   # valid: [Hkv, M]
    idx, ok = select_tokens(q, keys, valid, k, scale, group_reduce, base_lse, mass, floor, logits)  # [Hkv, k'] each
    if rows_out is not None:
        rows_out += ok.sum()
    if keys is None:
        ksel = gather_picked_rows(parts, idx, ok, 0, None, packed)       # ksel: [Hkv, k', D]
    else:
        ksel = keys.gather(1, idx[..., None].expand(-1, -1, d))           # ksel: [Hkv, k', D]
    vsel = gather_picked_rows(parts, idx, ok, 1, ksel.dtype, packed)      # vsel: [Hkv, k', D]
    return _attend(q, ksel, vsel, ok, scale)


def ranked_token_attend(q: torch.Tensor, parts, cand_ids: torch.Tensor, ranker, k: int, scale: float,
                        group_reduce: str = "sum", base_lse: torch.Tensor | None = None, packed=None,
                        mass: float = 0.0, floor: int = 0,
                        rows_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """token_attend with the candidates ranked by `ranker` (the layer's ShadowKeyIndex) from estimates of their
    logits instead of their keys; cand_ids int64 [Hkv, K]: the chunk id of each candidate column (-1: none).
    rows_out (int64 [1], optional): the token rows attended (min(held candidate tokens, k), or what the mass
    threshold keeps) summed over KV heads are added to it on the device (a decode step's statistics, no extra
    launches on the fused path).

    On the GPU, with one candidate part and shadows on the GPU, three launches (tokens.cu: shadow logits, top-k
    select, attention over the picked rows where they lie), four with a mass threshold (mass.cu between the last
    two); otherwise the torch path: ranker.token_logits [Hkv, G, K*C] float32, then token_attend (the reference of
    the fused path)."""
    fused = _fused_ranked(q, parts, cand_ids, ranker, k, packed, mass, group_reduce)
    if fused is not None:
        cp, (pool, slots, alt), (basis, shadows, index_scale) = fused
        m = slots.shape[1] * pool.shape[3]
        return cp.ranked_token_attend(q, pool, slots, alt, cand_ids, basis, shadows, min(k, m), index_scale, scale,
                                      group_reduce, base_lse, rows_out, mass, floor)
    logits = ranker.token_logits(q, cand_ids)                             # logits: [Hkv, G, K*C]
    return token_attend(q, parts, k, scale, group_reduce, base_lse, packed, mass, floor, logits, rows_out)


def _fused_ranked(q, parts, cand_ids, ranker, k, packed, mass, group_reduce):
    """(the CuPy launchers, the one part, the shadow operands) when the fused path takes these inputs, else None."""
    from . import KERNELS_AVAILABLE, _backend
    if not (KERNELS_AVAILABLE and q.is_cuda and len(parts) == 1 and packed is None and k > 0
            and (mass == 0 or group_reduce == "sum")):
        return None
    operands = ranker.shadow_operands() if hasattr(ranker, "shadow_operands") else None
    if operands is None or _backend() is None:
        return None
    from . import _cupy_tokens as cp
    pool, slots, alt = parts[0]
    m = slots.shape[1] * pool.shape[3]
    if m == 0 or not cp.supports_ranked(q, pool, slots, alt, cand_ids, operands[0], operands[1], min(k, m)):
        return None
    if mass > 0 and min(k, m) > cp.MASS_MAX:
        return None
    return cp, parts[0], operands
