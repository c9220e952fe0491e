"""Hot chunks up to the GPU pool during decode (offload/tiers/hot.py, placement.plan_swaps): the decision follows
the eviction policy's ranking, and promotion changes where chunks live, never what decode computes."""
import pytest
import torch

from fixtures_models import TIERED_OPTS
from offload import LLM
from offload.tiers.placement import Residents, plan_swaps
from offload.tiers.policy import AttentionMassPolicy, LRUPolicy

OPTS = TIERED_OPTS


def _residents(chunks: list[int], layer: int = 0) -> Residents:
    c = torch.tensor(chunks)
    return Residents(torch.arange(100, 100 + len(chunks)), torch.full_like(c, layer), c)   # slot = 100 + position


def test_lru_swaps_the_coldest_unpinned_residents_for_the_hottest_host_chunks():
    pol = LRUPolicy(sink_chunks=1, window_chunks=1)
    pol.touch(0, torch.arange(10))                       # insert order: chunk 0 oldest
    pol.touch(0, torch.tensor([3]))                      # a GPU resident selected since
    pol.touch(0, torch.tensor([7, 8]))                   # host chunks selected last: 8 is the most recent
    gpu = _residents([0, 1, 2, 3, 9])                    # 0 is a sink, 9 the window: pinned
    num = torch.tensor([10])
    hot = torch.tensor([7, 8])
    sw = plan_swaps(pol, gpu, torch.zeros(2, dtype=torch.long), hot, num, limit=10)
    assert sw.down == [101, 102]                         # chunks 1, 2: coldest first; 0 and 9 never move
    assert hot[sw.up].tolist() == [8, 7]                 # hottest first
    sw = plan_swaps(pol, gpu, torch.zeros(2, dtype=torch.long), hot, num, limit=1)
    assert sw.down == [101] and hot[sw.up].tolist() == [8]


def test_mass_policy_promotes_only_a_chunk_that_outranks_a_resident():
    pol = AttentionMassPolicy(sink_chunks=1, window_chunks=1, decay=1.0)
    pol.touch(0, torch.arange(10), torch.zeros(10))
    pol.touch(0, torch.tensor([1, 2, 7, 8]), torch.tensor([5.0, 0.1, 1.0, 0.05]))
    gpu = _residents([0, 1, 2, 9])
    sw = plan_swaps(pol, gpu, torch.zeros(2, dtype=torch.long), torch.tensor([7, 8]), torch.tensor([10]), limit=10)
    assert sw.down == [102] and sw.up == [0]             # 7 (mass 1) beats resident 2 (0.1); 8 (0.05) beats none


def _steady_choice(sess, chunks: list[int]) -> None:
    """Every step of every layer selects the same old chunks (a hot set that real attention approximates)."""
    from offload.indexes.selector import Selection
    sel = sess.attn.selector
    ids = torch.tensor(chunks, device=sel.device).expand(sel.Hkv, -1).contiguous()      # ids: [Hkv, m]

    def propose(layer, q, budget, n):       # no host-to-device copy inside a captured step
        return Selection(ids, len(chunks), sel.n_sink, sel.n_window, sel.streaming[layer])
    sel.propose = propose


def _decode(llm, ids, chunks):
    s = llm.session()
    _steady_choice(s, chunks)
    out = [s.prefill(ids[:250])] + [s.step(t) for t in ids[250:]]
    return torch.stack(out), s


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_promotion_moves_hot_chunks_up_and_leaves_the_logits_unchanged(tiny, ids, device):
    """A steady hot set that prefill left on the host: with promotion it is read from the GPU pool after the first
    chunk of tokens, without it from the host to the end. The logits agree (copies move bytes as they are; only
    the order in which one gather reads a head's chunks changes, hence float rounding), and every prefilled chunk
    reads back from its new tier bit-identical to the session without promotion."""
    opts = dict(OPTS, attention="sparse", budget="40", gpu_mem="60KiB", host_mem="1MiB", device=device,
                dtype="float32")     # on CUDA the copies run on the store's copy stream, fenced both ways
    hot = [3, 4, 5, 6]                                   # past the 2 sink chunks; LRU put them on the host
    off, s_off = _decode(LLM(str(tiny.path), **opts), ids, hot)
    on, s_on = _decode(LLM(str(tiny.path), promote_hot=True, **opts), ids, hot)
    torch.testing.assert_close(on, off, rtol=0, atol=1e-5)
    st_on, st_off = s_on.stats(), s_off.stats()
    assert st_on["promoted_hot_chunks"] > 0 and st_off["promoted_hot_chunks"] == 0
    assert st_off["attended_gpu_selections"] < st_on["attended_gpu_selections"]
    assert st_on["attended_host_selections"] < st_off["attended_host_selections"] / 2, (st_on, st_off)
    prefilled = 250 // OPTS["chunk_tokens"]             # decode's own chunks differ by the rounding above
    for layer in range(s_on.attn.L):                     # every prefilled chunk, wherever it lives now, as put
        assert torch.equal(s_on.attn.store.read(layer, range(prefilled)), s_off.attn.store.read(layer, range(prefilled)))


@pytest.mark.parametrize("kv_dtype", ["int8"])
def test_a_packed_host_tier_keeps_the_placement_of_put(tiny, ids, kv_dtype):
    """int8/int4 host chunks would come up dequantized and go down re-quantized: promotion stays off there."""
    opts = dict(attention="sparse", budget="40", gpu_mem="60KiB", host_mem="1MiB", kv_dtype=kv_dtype, **OPTS)
    on, s_on = _decode(LLM(str(tiny.path), promote_hot=True, **opts), ids, [3, 4, 5, 6])
    off, _ = _decode(LLM(str(tiny.path), **opts), ids, [3, 4, 5, 6])
    assert s_on.stats()["promoted_hot_chunks"] == 0
    assert torch.equal(on, off)
