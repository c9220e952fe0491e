"""Steps 3 and 4 of a decode step (select -> plan -> attend -> merge): execute a DecodePlan.

    selection = selector.select(layer, q, n_chunks, length)     # offload/indexes/selector.py
    plan = store.plan(layer, selection)                         # offload/tiers/decode.py
    o, lse = attend_plan(q, Tail(k, v, count), plan, scale)     # here

The tail (the newest tokens, on the compute device) is attended densely; every whole-chunk part of the plan
is one gather-attend launch, whichever tiers it reads (GPU pool, pinned host slab through UVA, chunks
staged from the drive); the partial results merge exactly by log-sum-exp, in plan order. The token stage
then scores the candidate parts' keys and attends its best tokens, ranked against what is attended
already (base_lse), and merges last.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Tail(NamedTuple):
    """The newest keys of one layer: k, v [Hkv, N, D]; only the first `count` (int64 [1] on the device,
    read when the kernel runs, so a captured step follows it) when given."""
    k: torch.Tensor
    v: torch.Tensor
    count: torch.Tensor | None = None


def _gather(kernels, q, part, scale, packed):
    """One whole-chunk part: packed pools (int8/int4 host slab, drive chunks) through quant.gather_attend_q."""
    if packed is not None:
        from offload.kernels import quant
        if quant.is_packed(part.pool) or quant.is_packed(part.alt):
            return quant.gather_attend_q(q, part.pool, part.slots, scale, packed, part.alt)
    return kernels.gather_attend(q, part.pool, part.slots, scale, part.alt)


def attend_plan(q: torch.Tensor, tail: Tail, plan, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [Hq, D] over the tail and everything DecodePlan `plan` (None: nothing) reads
    -> (o [Hq, D], lse [Hq]) float32."""
    from offload import kernels   # looked up per call, so a kernel can be swapped (tests count launches)
    partials = [kernels.dense_attend(q, tail.k, tail.v, scale, tail.count)]   # [(o [Hq, D], lse [Hq])]
    if plan is not None:
        partials += [_gather(kernels, q, p, scale, plan.packed) for p in plan.whole]
    o, lse = kernels.merge_all(partials)                                      # o: [Hq, D], lse: [Hq]
    if plan is not None and plan.token_k:
        # base_lse: what is attended anyway, so "sum" ranks tokens by their share of the whole softmax
        # ranked from estimates (low-rank key shadows on the GPU): the candidates' keys are never read
        if plan.rank_tokens is not None:
            o2, lse2 = kernels.tokens.ranked_token_attend(
                q, plan.candidates, plan.candidate_ids, plan.rank_tokens, plan.token_k, scale, plan.token_reduce,
                base_lse=lse, packed=plan.packed, mass=plan.token_mass, floor=plan.token_floor,
                rows_out=plan.token_rows)
        else:
            o2, lse2 = kernels.token_attend(q, plan.candidates, plan.token_k, scale, plan.token_reduce, base_lse=lse,
                                            packed=plan.packed, mass=plan.token_mass, floor=plan.token_floor)
        o, lse = kernels.merge_attn(o, lse, o2, lse2)
    return o, lse
