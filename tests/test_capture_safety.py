"""A decode step's CUDA graph capture and the runtime's other CUDA users: a host slab dropped during a capture
(a closed session collected by the garbage collector at any allocation) must not unpin inside it, since
cudaHostUnregister there invalidates the capture and the step falls back to piecewise graphs."""
import gc

import pytest
import torch

import offload.tiers.host as host
from offload.tiers.base import ChunkShape


class _FakeCudart:
    def __init__(self):
        self.unregistered = []

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


def test_unpinning_waits_for_the_capture_to_end(monkeypatch):
    rt, capturing = _FakeCudart(), [True]
    monkeypatch.setattr(torch.cuda, "cudart", lambda: rt)
    monkeypatch.setattr(host, "_capturing", lambda: capturing[0])
    monkeypatch.setattr(host, "_DEFERRED", [])
    buf = bytearray(16)
    host._unregister(1234, buf)                       # dropped mid-capture: nothing is called, the buffer is kept
    assert rt.unregistered == [] and host._DEFERRED == [(1234, buf)]
    assert host.unregister_deferred() == 0 and rt.unregistered == []   # still capturing
    capturing[0] = False
    assert host.unregister_deferred() == 1
    assert rt.unregistered == [1234] and host._DEFERRED == []
    host._unregister(99)                              # outside a capture: at once
    assert rt.unregistered == [1234, 99]


def test_a_failed_capture_reports_the_first_error_and_where():
    from offload.engine.graphs import first_error
    from offload.tiers.slots import pieces

    def capture_end():
        try:
            pieces(None, 1)                           # raises inside offload's code: the original failure
        except Exception:
            raise RuntimeError("operation failed due to a previous error during capture")

    with pytest.raises(RuntimeError) as info:
        capture_end()
    msg = first_error(info.value)
    assert "previous error" not in msg and msg.split(":")[0] in ("TypeError", "AttributeError"), msg
    assert "tiers/slots.py:" in msg, msg


@pytest.mark.gpu
def test_a_pinned_slab_dropped_during_a_capture_does_not_break_it():
    from offload.engine.graphs import capture
    from offload.tiers.host import HostPool
    gc.collect()                                      # other tests' graphs: destroying one inside a capture breaks it
    pool = HostPool(ChunkShape(2, 8, 64, torch.bfloat16), capacity=4)
    assert pool.pin_method == "cudaHostRegister", pool.pin_method
    x = torch.zeros(1, device="cuda")                 # x: [1]
    g = torch.cuda.CUDAGraph()
    with capture(g):
        x.add_(1)
        del pool                                      # the last reference goes inside the capture: unpinned after it
    g.replay()
    torch.cuda.synchronize()
    assert x.item() == 1.0 and host._DEFERRED == []


def test_importing_the_bench_harness_patches_no_runtime_function():
    """The fidelity harness counted token picks by replacing kernels.tokens.select_tokens at import, with a host
    read per call: every later session of the process (the GPU suite's graph tests) synced inside its capture."""
    import importlib
    import os
    import sys

    import offload.kernels.tokens as tokens
    before = {k: v for k, v in vars(tokens).items() if callable(v)}
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    try:
        for name in ("fidelity_sessions", "fidelity_suite", "fidelity"):
            importlib.import_module(name)
    finally:
        sys.path.pop(0)
    after = {k: v for k, v in vars(tokens).items() if callable(v)}
    assert after == before, sorted(k for k in before if after.get(k) is not before[k])


def test_a_failed_capture_warns_once_and_records_the_first_error(monkeypatch):
    """No GPU needed: the step's capture is made to fail as a sync inside it does, and the engine is asked twice."""
    from offload.engine import runner as runner_mod
    from offload.tiers.slots import pieces

    class _Attn:
        def graph_key(self):
            return ("k", 1)

    eng = runner_mod.Engine.__new__(runner_mod.Engine)
    eng.attn, eng.device = _Attn(), torch.device("cpu")
    eng._graph_failed, eng._graph_key, eng._graph, eng._logits, eng._graph_error = False, None, None, None, None

    def failing_capture():
        try:
            pieces(None, 1)                           # the original failure, inside offload's code
        except TypeError:
            raise RuntimeError("operation failed due to a previous error during capture")

    eng._capture = failing_capture
    monkeypatch.setattr(runner_mod.torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(runner_mod, "heal_rng_after_failed_capture", lambda device: None)
    with pytest.warns(RuntimeWarning, match="piecewise graphs") as rec:
        assert eng._tiered_graph_ok() is False
        assert eng._tiered_graph_ok() is False        # never retried, no second warning
    assert len(rec) == 1 and "tiers/slots.py:" in str(rec[0].message)
    assert eng._graph_failed and eng._graph_error.startswith("TypeError")
