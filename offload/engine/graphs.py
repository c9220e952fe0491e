"""Piecewise CUDA graphs for a decode step whose attention cannot be captured (tiered / sparse backends).

Per layer, the dense work before attention (norm, qkv, RoPE) and after it (o_proj, MLP) replays as two
graphs; the backend's attention runs eagerly in between, so it may select, fetch and sync as it likes.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import traceback

import torch

from offload.attention import AttentionBackend
from offload.model.llama import LlamaModel
from offload.tiers.host import unregister_deferred

# only this thread's unsafe CUDA calls break a capture: the runtime's background threads may use CUDA meanwhile
CAPTURE_MODE = "thread_local"


@contextlib.contextmanager
def capture(graph: torch.cuda.CUDAGraph, **kw):
    """torch.cuda.graph with the runtime's rules: errors of this thread only (CAPTURE_MODE); no cyclic garbage
    collection during the capture, since a collected session's finalizers call CUDA inside it (a forced collection
    there destroyed earlier sessions' graphs, cuGraphExecDestroy, and invalidated the capture: H200 2026-11-30);
    host slabs dropped meanwhile (by reference count) are unpinned once it has ended."""
    was = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, capture_error_mode=CAPTURE_MODE, **kw):
            yield
    finally:
        if was:
            gc.enable()
        unregister_deferred()


def first_error(e: BaseException) -> str:
    """The error that broke a capture, with where it was raised. Leaving torch.cuda.graph after an error raises
    "operation failed due to a previous error during capture", which hides the first one in its context chain.
    OFFLOAD_DEBUG_CAPTURE=1 prints its whole traceback on stderr."""
    while e.__context__ is not None and e.__context__ is not e:
        e = e.__context__
    if os.environ.get("OFFLOAD_DEBUG_CAPTURE") == "1":
        traceback.print_exception(e, file=sys.stderr)
    tb, where = e.__traceback__, ""
    while tb is not None:             # the deepest frame of our own code: the call that torch or CuPy refused
        path = tb.tb_frame.f_code.co_filename
        if "/offload/" in path:
            where = f" ({path.rsplit('/offload/', 1)[1]}:{tb.tb_lineno})"
        tb = tb.tb_next
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}{where}"


def heal_rng_after_failed_capture(device: torch.device) -> None:
    """A capture that CUDA invalidated ends before torch closes its RNG bookkeeping (the generator's count of captures
    under way stays raised), so every later random op of the process fails ("Offset increment outside graph capture
    encountered unexpectedly": 110 GPU tests after one failed capture, H200 2026-11-30). A later capture that ends
    properly does not lower it again. The generator gets a fresh state object instead (same seed and, where readable, offset)."""
    try:
        torch.randn(1, device=device)      # the usual case: nothing left open
        return
    except RuntimeError:
        pass
    idx = device.index if device.index is not None else torch.cuda.current_device()
    gen = torch.cuda.default_generators[idx]
    fresh = torch.Generator(device=torch.device("cuda", idx))
    fresh.manual_seed(gen.initial_seed())
    try:
        fresh.set_offset(gen.get_offset())
    except RuntimeError:
        pass
    gen.graphsafe_set_state(fresh)


class PiecewiseDecode:
    def __init__(self, model: LlamaModel, attn: AttentionBackend):
        self.model, self.attn = model, attn
        cfg, dev, dt = model.cfg, model.device, model.dtype
        self.x = torch.zeros(1, cfg.hidden_size, device=dev, dtype=dt)  # x: [1, H] the residual stream
        self.cos = torch.zeros(1, cfg.head_dim, device=dev, dtype=dt)  # cos: [1, D]
        self.sin = torch.zeros(1, cfg.head_dim, device=dev, dtype=dt)  # sin: [1, D]
        self.o = torch.zeros(cfg.num_heads, 1, cfg.head_dim, device=dev, dtype=dt)  # o: [Hq, 1, D]
        self.pool = torch.cuda.graph_pool_handle()
        self.pre, self.post, self.qkv = [], [], []
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):   # warm-up outside capture, as graph capture requires
            for i in range(cfg.num_layers):
                model.attn_inputs(i, self.x, self.cos, self.sin)
                model.attn_output_mlp(i, self.x, self.o)
            model.logits(self.x)
        torch.cuda.current_stream().wait_stream(s)
        for i in range(cfg.num_layers):
            g = torch.cuda.CUDAGraph()
            with capture(g, pool=self.pool):
                qkv = model.attn_inputs(i, self.x, self.cos, self.sin)  # q: [Hq, 1, D], k, v: [Hkv, 1, D]
            self.pre.append(g)
            self.qkv.append(qkv)
            g = torch.cuda.CUDAGraph()
            with capture(g, pool=self.pool):
                self.x.copy_(model.attn_output_mlp(i, self.x, self.o))
            self.post.append(g)
        self.head = torch.cuda.CUDAGraph()
        with capture(self.head, pool=self.pool):
            self.logits = model.logits(self.x)[0]  # logits: [V]

    def step(self, token: int, position: int) -> torch.Tensor:
        m = self.model
        self.x.copy_(m.embed[token:token + 1])
        cos, sin = m.rope(torch.tensor([position], device=m.device))  # cos, sin: [1, D]
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        for i in range(m.cfg.num_layers):
            self.pre[i].replay()
            q, k, v = self.qkv[i]
            self.o.copy_(self.attn.attend(i, q, k, v))
            self.post[i].replay()
        self.head.replay()
        return self.logits.clone()
