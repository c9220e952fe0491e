"""Mass budgets end to end: a sparse session on a tiny checkpoint (CPU; the GPU tier is a CPU pool)."""
import pytest
import torch

from fixtures_models import TIERED_OPTS, run_session
from offload import LLM
from offload.indexes.adaptive import MassBudgetIndex

OPTS = TIERED_OPTS    # tiny, ids and dense: the shared fixtures in fixtures_models.py


@pytest.mark.parametrize("index", ["summary", "shadow", "ann"])
def test_mass_budget_of_everything_equals_exact(tiny, ids, dense, index):
    """p = 1 with a cap over the whole context keeps every chunk: the logits of full attention."""
    opts = {"rank": 8} if index == "shadow" else None                         # the tiny model's head_dim is 16
    got, s = run_session(LLM(str(tiny.path), attention="sparse", budget="p=1,floor=0,cap=512", index=index,
                             index_options=opts, **OPTS), ids, 250)
    assert all(isinstance(i, MassBudgetIndex) for i in s.attn.indexes)      # the runtime applies the mass budget
    torch.testing.assert_close(got, dense[0], rtol=0, atol=1e-5)


def test_mass_budget_takes_what_p_needs_between_floor_and_cap(tiny, ids, dense):
    got, s = run_session(LLM(str(tiny.path), attention="sparse", budget="p=0.5,floor=16,cap=160", **OPTS), ids, 250)
    used = [i.selected_chunks() for i in s.attn.indexes]                     # mean chunks per head and step
    assert all(16 / 8 <= u <= 160 / 8 for u in used), used
    assert min(used) < 160 / 8                                                # it did not just take the cap
    assert 0 < (got - dense[0]).abs().max() < 5                               # lossy, but not wild


@pytest.mark.gpu
@pytest.mark.parametrize("index", ["summary", "shadow"])
def test_mass_budget_in_the_captured_cuda_step(tiny, ids, index):
    """On the GPU the step with a mass budget is captured in a CUDA graph: p = 1 over everything equals exact
    attention, and a real threshold replays with per-head counts that change from step to step."""
    gpu = dict(OPTS, device="cuda", dtype="float32", index_options={"rank": 8} if index == "shadow" else None)
    ref, _ = run_session(LLM(str(tiny.path), attention="full", index=index, **gpu), ids, 250)
    got, s = run_session(LLM(str(tiny.path), attention="sparse", budget="p=1,floor=0,cap=512", index=index, **gpu),
                         ids, 250)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    _, s = run_session(LLM(str(tiny.path), attention="sparse", budget="p=0.5,floor=16,cap=160", index=index, **gpu),
                       ids, 250)
    used = [i.selected_chunks() for i in s.attn.indexes]
    assert all(2 <= u <= 20 for u in used), used


@pytest.mark.gpu
def test_a_closed_session_gives_its_device_memory_back_at_once(tiny, ids):
    """close() frees the session's indexes (sized for the whole context) and tail while the object is still
    referenced: the next session of the LLM is planned into that room (a 512K index is 2 GiB)."""
    llm = LLM(str(tiny.path), attention="sparse", budget="p=0.5,floor=16,cap=160",
              **dict(OPTS, device="cuda", dtype="float32", ctx=4096))
    s = llm.session()
    s.prefill(ids[:200])
    torch.cuda.synchronize()
    index_bytes = sum(i.gpu_bytes(4096 // 8) for i in s.attn.indexes)
    before = torch.cuda.memory_allocated()
    s.close()
    torch.cuda.synchronize()
    assert before - torch.cuda.memory_allocated() >= index_bytes > 0
