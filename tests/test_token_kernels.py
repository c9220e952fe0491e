"""tokens.cu against its torch reference: shadow logits, the top-k token select, and the fused ranked token stage.

The reference is the torch path of kernels.tokens (the low-rank logits of ShadowKeyIndex.token_logits, rank_logits,
torch.topk, token_attend). Selections are compared as sets up to ties: the sorted ranks of the picks must equal the
reference top-k's, every pick's reported rank must be its reference rank, and picks are distinct and in order.
"""
from types import SimpleNamespace

import pytest
import torch

from offload.kernels.reference import ALT_SLOT
from offload.kernels.tokens import candidate_valid, rank_logits, ranked_token_attend, token_attend

HKV, G, D, C, R, CAP, K = 8, 4, 128, 32, 32, 300, 48


def _inputs(seed=0, dtype=torch.bfloat16, few_valid=True, kc=K, cap=CAP):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(HKV * G, D, generator=gen).to(dtype).cuda()                      # q: [Hq, D]
    basis = torch.linalg.qr(torch.randn(HKV, D, R, generator=gen))[0].contiguous().cuda()  # basis: [Hkv, D, r]
    shadows = (3 * torch.randn(HKV, cap, C, R, generator=gen)).to(dtype).cuda()       # shadows: [Hkv, cap, C, r]
    cand = torch.stack([torch.randperm(cap, generator=gen)[:kc] for _ in range(HKV)])  # cand: [Hkv, K] chunk ids
    cand[1, -5:] = -1                                                                   # padding columns
    slots = torch.stack([torch.randperm(cap, generator=gen)[:kc] for _ in range(HKV)]).int()  # slots: [Hkv, K]
    slots = torch.where(torch.rand(HKV, kc, generator=gen) < 0.5, slots | ALT_SLOT, slots)
    slots[cand < 0] = -1
    if few_valid:
        slots[0, 2:] = -1                    # head 0: 64 held tokens, fewer than k: invalid picks must follow
    return q, basis, shadows, cand.cuda(), slots.cuda()


def _ref_logits(q, basis, shadows, cand, scale):
    """ShadowKeyIndex._token_scores: scale * (q U) . shadow of every candidate token -> [Hkv, G, K*C] float32."""
    qp = torch.einsum("hgd,hdr->hgr", q.float().reshape(HKV, G, D), basis)             # qp: [Hkv, G, r]
    sh = shadows[torch.arange(HKV, device=cand.device)[:, None], cand.clamp(min=0)]    # sh: [Hkv, K, C, r]
    return (torch.einsum("hgr,hmcr->hgmc", qp, sh.float()) * scale).flatten(2)      # [Hkv, G, K*C]


def _valid(cand, slots):
    return ((cand >= 0) & (slots >= 0)).repeat_interleave(C, dim=1)                    # [Hkv, K*C]


@pytest.mark.gpu
@pytest.mark.parametrize("reduce,with_base,kc,k", [("sum", False, K, 512), ("sum", True, K, 512), ("max", False, K, 512),
                                                 ("sum", True, 520, 2048)])
def test_gpu_shadow_select_matches_torch(reduce, with_base, kc, k):
    """The last case is the 128K shape of x8 candidates at a 2K budget: 16,640 tokens, 17 select slices per head."""
    from offload.kernels import _cupy_tokens as cp
    q, basis, shadows, cand, slots = _inputs(kc=kc, cap=max(CAP, kc))
    scale = D ** -0.5
    base = torch.randn(HKV * G, device="cuda") + 4 if with_base else None               # base: [Hq]
    ref = _ref_logits(q, basis, shadows, cand, scale)                                  # ref: [Hkv, G, M]
    valid = _valid(cand, slots)                                                        # valid: [Hkv, M]
    mode = cp.GROUP_MAX if reduce == "max" else cp.LOGITS
    logits, parts = cp.shadow_logits(q, basis, shadows, cand, slots, scale, mode, reduce == "sum")
    want = ref.amax(1) if reduce == "max" else ref                                    # [Hkv, M] or [Hkv, G, M]
    want = want.masked_fill(~(valid if reduce == "max" else valid[:, None]), float("-inf"))
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-4)
    if parts is not None:      # the blocks' (max, sum exp) combine to the logsumexp over the valid candidates
        lse = parts[..., 0] + parts[..., 1].log()                                     # lse: [Hkv, B, G]
        torch.testing.assert_close(torch.logsumexp(lse, 1), torch.logsumexp(want, 2), rtol=1e-4, atol=1e-4)

    r = rank_logits(ref, valid, reduce, base)                                         # r: [Hkv, M] reference ranks
    idx, val, ok, row = cp.ranked_select(q, basis, shadows, cand, slots, k, scale, reduce, base, C, True)
    top = torch.topk(r, k, dim=1).values                                              # top: [Hkv, k] sorted
    torch.testing.assert_close(val.sort(1, descending=True).values, top, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(r.gather(1, idx), val, rtol=1e-4, atol=1e-6)
    assert (idx.diff(dim=1) > 0).all(), "picks are distinct and in position order"
    assert torch.equal(ok, valid.gather(1, idx))
    assert int(ok[0].sum()) == int(valid[0].sum()) == 2 * C, "a head with fewer held tokens than k takes them all"
    # the pool row of each pick: its chunk's slot * 2 * Hkv * C + token, flagged like the slot; -1 where not held
    s = slots.long().gather(1, idx // C)                                              # s: [Hkv, k]
    want_row = ((s & ~ALT_SLOT) * 2 * HKV * C + idx % C) | (s & ALT_SLOT)
    assert torch.equal(row.long(), torch.where(ok, want_row, -1))


@pytest.mark.gpu
@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_ranked_token_attend_equals_the_torch_path(reduce, dtype):
    """GPU pool and pinned host slab in one merged list: the fused stage attends what the torch path does."""
    q, basis, shadows, cand, slots = _inputs(seed=3, dtype=dtype)
    gen = torch.Generator().manual_seed(5)
    gpu_pool = torch.randn(CAP, 2, HKV, C, D, generator=gen).to(dtype).cuda()          # [S, 2, Hkv, C, D]
    host_pool = torch.randn(CAP, 2, HKV, C, D, generator=gen).to(dtype).pin_memory()  # [S, 2, Hkv, C, D]
    base = torch.randn(HKV * G, device="cuda") + 2                                    # base: [Hq]
    scale, index_scale, k = D ** -0.5, D ** -0.5, 700
    parts = [(gpu_pool, slots, host_pool)]

    def refuse(*a):
        raise AssertionError("the fused path must not compute the logits in torch")
    ranker = SimpleNamespace(shadow_operands=lambda: (basis, shadows, index_scale), token_logits=refuse)
    rows = torch.zeros(1, dtype=torch.long, device="cuda")                            # rows: [1] statistics
    o, lse = ranked_token_attend(q, parts, cand, ranker, k, scale, reduce, base, rows_out=rows)
    logits = _ref_logits(q, basis, shadows, cand, index_scale)                        # logits: [Hkv, G, M]
    want_o, want_lse = token_attend(q, parts, k, scale, reduce, base, logits=logits)
    held = candidate_valid(parts, C, "cuda")                                           # held: [Hkv, M]
    assert torch.equal(held, _valid(cand, slots))
    assert int(rows) == int(held.sum(1).clamp(max=k).sum()), "the select kernel counts the held picks"
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, want_o, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_shadow_chunk_scores_match_torch():
    """The shadow index's fine stage: per candidate chunk and query head, the log-sum-exp or max of its tokens."""
    from offload.kernels import _cupy_tokens as cp
    q, basis, shadows, cand, _ = _inputs(seed=1)
    cand = cand.clamp(min=0)                        # the index's candidates are all real chunks
    ref = _ref_logits(q, basis, shadows, cand, 0.1).unflatten(2, (K, C))               # ref: [Hkv, G, K, C]
    lse, _ = cp.shadow_logits(q, basis, shadows, cand, None, 0.1, cp.CHUNK_LSE)
    mx, _ = cp.shadow_logits(q, basis, shadows, cand, None, 0.1, cp.CHUNK_MAX)
    torch.testing.assert_close(lse, torch.logsumexp(ref, 3), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(mx, ref.amax(3), rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("fine_reduce", ["mass", "max"])
def test_gpu_shadow_index_select_matches_its_torch_path(fine_reduce, monkeypatch):
    """ShadowKeyIndex.select on the GPU (chunk-score kernel + topk_rows) picks the chunks its torch path picks."""
    from offload.indexes import shadow
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(HKV, 600 * C, D, generator=gen).to(torch.bfloat16).cuda()      # keys: [Hkv, N, D]
    idx = shadow.ShadowKeyIndex(HKV, HKV * G, D, C, "cuda", torch.bfloat16, rank=R, candidate_factor=4,
                                fine_reduce=fine_reduce)
    idx.build(keys)
    q = torch.randn(HKV * G, D, generator=gen).to(torch.bfloat16).cuda()              # q: [Hq, D]
    got = idx.select(q, 64)                                                            # got: [Hkv, 64] best first
    scores = idx._fine_scores(q, got)                                                  # [Hkv, 64]
    monkeypatch.setattr(shadow, "_chunk_scores_kernel", lambda *a: None)
    want = idx.select(q, 64)
    want_scores = idx._fine_scores(q, want)
    torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-6)   # the same chunks' scores, in order
    overlap = (got[..., None] == want[:, None, :]).any(-1).float().mean()
    assert overlap > 0.98, overlap                                           # equal sets, up to near-ties


@pytest.mark.gpu
@pytest.mark.parametrize("mass", [True, False])
@pytest.mark.parametrize("how", ["sum", "max"])
def test_gpu_chunk_reduce_matches_torch(mass, how):
    """Softmax share among the candidates (or the value itself), the group's sum or max, -inf past the count."""
    from offload.kernels import _cupy_tokens as cp
    gen = torch.Generator().manual_seed(4)
    x = (4 * torch.randn(HKV, G, 700, generator=gen)).cuda()                          # x: [Hkv, G, m]
    cand = torch.randint(0, 900, (HKV, 700), generator=gen).cuda()                     # cand: [Hkv, m]
    count = torch.tensor([800], device="cuda")
    past = cand >= count                                                               # past: [Hkv, m]
    xm = x.masked_fill(past[:, None], float("-inf"))
    per = torch.exp(xm - torch.logsumexp(xm, 2, keepdim=True)) if mass else xm
    want = (per.sum(1) if how == "sum" else per.amax(1)).masked_fill(past, float("-inf"))
    torch.testing.assert_close(cp.chunk_reduce(x, cand, count, mass, how == "sum"), want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_shadow_index_candidates_past_the_count_are_never_picked():
    """The GPU select's width follows the allocated rows (a captured step keeps working as chunks are appended):
    with fewer chunks than candidates, it picks what the CPU index (width = the count) picks."""
    from offload.indexes.shadow import ShadowKeyIndex
    gen = torch.Generator().manual_seed(6)
    keys = torch.randn(HKV, 40 * C, D, generator=gen)                                 # keys: [Hkv, 40 chunks]
    q = torch.randn(HKV * G, D, generator=gen)                                         # q: [Hq, D]
    got, want = [], []
    for dev, out in (("cuda", got), ("cpu", want)):
        idx = ShadowKeyIndex(HKV, HKV * G, D, C, dev, torch.float32, rank=R, group_reduce="sum")
        idx.build(keys.to(dev))
        idx.reserve(80)                               # as the selector does: room past the count
        out.append(idx.select(q.to(dev), 15).cpu())   # width min(80, 4 * 15) = 60 on the GPU: 20 rows hold no chunk
    assert got[0].shape == want[0].shape == (HKV, 15) and (got[0] < 40).all()
    overlap = (got[0][..., None] == want[0][:, None, :]).any(-1).float().mean()
    assert overlap > 0.98, overlap


@pytest.mark.gpu
@pytest.mark.parametrize("n,count,k", [(4100, 4097, 520), (600, 300, 520), (64, 64, 64)])
def test_gpu_select_rows_is_topk_rows_without_the_sort(n, count, k):
    """The shadow index's coarse candidates: the same rows as topk_rows (ties: lower row), in row order."""
    from offload.kernels import _cupy_tokens as cp
    from offload.kernels import topk_rows
    gen = torch.Generator().manual_seed(n)
    scores = torch.randn(HKV, n, generator=gen).round(decimals=1).cuda()              # scores: [Hkv, N], many ties
    cnt = torch.tensor([count], device="cuda")
    got = cp.select_rows(scores, cnt, k)                                              # got: [Hkv, k]
    assert (got.diff(dim=1) > 0).all()
    assert torch.equal(got, topk_rows(scores, cnt, k).sort(1).values)


def test_reference_select_top_takes_ties_at_the_lower_position():
    from offload.kernels.reference import select_top
    r = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0], [float("-inf")] * 3 + [0.5, float("-inf"), 0.0]])
    assert select_top(r, 4).tolist() == [[1, 2, 3, 4], [0, 1, 3, 5]]


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,heads_empty,bucket,crowded", [
    (16640, 2048, False, None, False), (16640, 2048, True, None, False), (1024, 1000, False, None, False),
    (5000, 1, False, None, False), (40000, 4000, False, None, False), (16640, 2048, False, 64, False),
    (16640, 2048, True, None, True), (40000, 4000, False, 64, True)])
def test_gpu_token_select_over_many_blocks_picks_the_stable_sort_top_k(m, k, heads_empty, bucket, crowded, monkeypatch):
    """select.cu's three launches: the same positions as a stable descending sort (ties to the lower position), over
    several slices per head, with many ties (ranks rounded), padding columns, and a head with no held token. bucket:
    ST_BUCKET lowered so the threshold kernel reads the 16-bit bucket's keys from global memory (its other path).
    crowded: every rank within 25% of 1e-4, as on dummy weights: one first 8-bit digit holds them all, only the
    16-bit histogram tells them apart."""
    from offload.kernels import _cupy_select, _cupy_tokens as cp
    from offload.kernels.reference import select_top
    if bucket is not None:
        monkeypatch.setattr(_cupy_select, "THRESHOLD_DEFINES", (f"-DST_BUCKET={bucket}",))
    gen = torch.Generator().manual_seed(m + k)
    kc = m // C
    m = kc * C
    cand = torch.randint(0, 10 ** 6, (HKV, kc), generator=gen)                      # cand: [Hkv, K] chunk ids
    slots = torch.randint(0, 1000, (HKV, kc), generator=gen).int()                   # slots: [Hkv, K]
    cand[2, ::3] = -1
    slots[3, 1::4] = -1
    if heads_empty:
        cand[5] = -1
    # group-max ranks ("max"), rounded: many exact ties across slices; +0.0 folds -0.0 into 0.0 (the kernel orders
    # -0.0 below 0.0, the sort does not)
    ranks = (torch.randn(HKV, m, generator=gen) * 3).round(decimals=1) + 0.0          # ranks: [Hkv, M]
    if crowded:                # rounded before the product: equal ranks stay exactly equal
        ranks = (1 + 0.05 * ranks).clamp(0.75, 1.25) * 1e-4
    valid = _valid(cand, slots)                                                        # valid: [Hkv, M]
    want = select_top(ranks.masked_fill(~valid, float("-inf")), k)                     # want: [Hkv, k]
    rows = torch.zeros(1, dtype=torch.long, device="cuda")
    idx, val, ok, row = cp.token_select(ranks.cuda(), None, None, cand.cuda(), slots.cuda(), C, k, True, rows)
    assert torch.equal(idx.cpu(), want)
    assert torch.equal(ok.cpu(), valid.gather(1, want))
    assert torch.equal(val.cpu(), ranks.masked_fill(~valid, float("-inf")).gather(1, want))
    assert int(rows) == int(valid.gather(1, want).sum())
    s = slots.long().gather(1, want // C)                                             # s: [Hkv, k]
    assert torch.equal(row.cpu().long(), torch.where(ok.cpu(), s * 2 * HKV * C + want % C, -1))


@pytest.mark.gpu
@pytest.mark.parametrize("n,count,k", [(4100, 4097, 520), (40000, 39000, 3000), (2048, 10, 64)])
def test_gpu_select_rows_picks_the_stable_sort_top_k(n, count, k):
    """Plain score rows (the shadow index's coarse candidates): rows past the count are never picked before the
    rows under it; ties to the lower row."""
    from offload.kernels import _cupy_tokens as cp
    from offload.kernels.reference import select_top
    gen = torch.Generator().manual_seed(n)
    scores = torch.randn(HKV, n, generator=gen).round(decimals=1) + 0.0              # scores: [Hkv, N], many ties
    masked = scores.masked_fill(torch.arange(n) >= count, float("-inf"))             # masked: [Hkv, N]
    got = cp.select_rows(scores.cuda(), torch.tensor([count], device="cuda"), k)      # got: [Hkv, k]
    assert torch.equal(got.cpu(), select_top(masked, k))


def test_reference_topk_rows_maps_rows_to_ids():
    from offload.kernels import reference
    scores = torch.tensor([[0.1, 0.9, 0.5, 7.0], [3.0, -1.0, 2.0, 9.0]])
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    assert reference.topk_rows(scores, torch.tensor([3]), 2, ids).tolist() == [[11, 12], [20, 22]]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(520, 520), (4100, 74), (3000, 2000)])
def test_gpu_topk_rows_with_ids_is_the_gather_of_its_rows(n, k):
    """The shadow index's fine stage: topk_rows best first (k = n with candidate_factor 1: a sort) with the candidates'
    gather folded in; the same rows as torch, ties to the lower row."""
    from offload.kernels import _cupy, reference
    gen = torch.Generator().manual_seed(n)
    scores = (torch.randn(HKV, n, generator=gen).round(decimals=1) + 0.0).cuda()      # scores: [Hkv, N], ties
    ids = torch.randint(0, 10 ** 6, (HKV, n), generator=gen).cuda()                    # ids: [Hkv, N]
    every = torch.tensor([2 ** 62], device="cuda")
    rows = _cupy.topk_rows(scores, every, k)                                           # rows: [Hkv, k]
    want = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]      # want: [Hkv, k]
    assert torch.equal(rows, want)
    assert torch.equal(_cupy.topk_rows(scores, every, k, ids), ids.gather(1, want))
    if k == n:                                  # torch.topk orders ties as it likes: compare sets only when all are picked
        assert torch.equal(reference.topk_rows(scores, every, k, ids).sort(1).values, ids.sort(1).values)
