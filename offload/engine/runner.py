"""Prefill (layer-wise, chunked) and decode steps for one sequence."""
from __future__ import annotations

import time
import warnings
from typing import Callable

import torch

from offload.attention import AttentionBackend
from offload.engine.graphs import PiecewiseDecode, capture, first_error, heal_rng_after_failed_capture
from offload.model.llama import LlamaModel

HOST_HIDDEN_BYTES = 256 << 20
ROPE_TABLE_TOKENS = 128 << 10


class Engine:
    """Runs a model over one sequence whose KV lives in `attn`.

    Prefill goes layer by layer: each layer sees every prompt token (in chunks of `prefill_chunk`)
    before the next layer starts, so a tiered backend only ever holds one layer's new KV on the
    GPU, and no step allocates O(N x vocab) logits or O(N^2) scores.
    """

    def __init__(self, model: LlamaModel, attn: AttentionBackend, prefill_chunk: int = 2048,
                 use_cuda_graph: bool = True, stream_chunk: int = 8192):
        self.model, self.attn = model, attn
        self.prefill_chunk, self.stream_chunk = prefill_chunk, stream_chunk
        self.device = model.device
        graphs = use_cuda_graph and self.device.type == "cuda"
        self.use_graph = graphs and attn.static                        # whole step in one graph
        self.use_piecewise = graphs and not self.use_graph             # dense parts in graphs, attention eager
        self._graph = self._piecewise = None
        self._graph_key, self._graph_failed, self._captured_once = None, False, False
        self._captures, self._graph_error, self._capture_s = 0, None, 0.0
        self.last_prefill_s = 0.0

    @property
    def length(self) -> int:
        return self.attn.length

    @torch.inference_mode()
    def prefill(self, ids: list[int], progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Append ids to the sequence; returns float32 logits of the last position: [V]."""
        t0 = time.perf_counter()
        m, N = self.model, len(ids)
        start = self.attn.length
        self.attn.begin(N)
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)  # ids_t: [N]
        pos = torch.arange(start, start + N, device=self.device)  # pos: [N]
        H, itemsize = m.cfg.hidden_size, torch.empty((), dtype=m.dtype).element_size()
        if self.device.type == "cuda" and N * H * itemsize > HOST_HIDDEN_BYTES:
            # a long prompt's hidden states wait in pinned host memory (1M tokens of an 8B model: 8 GiB, more than
            # a capped GPU has beside its weights), embedded a slice at a time; one chunk at a time visits the GPU
            x = torch.empty((N, H), dtype=m.dtype, pin_memory=True)  # x: [N, H] (host)
            step = max(1, HOST_HIDDEN_BYTES // (H * itemsize))
            for s in range(0, N, step):
                x[s:s + step].copy_(m.embed[ids_t[s:s + step]])   # pinned target: a DMA, not a pageable copy
        else:
            x = m.embed[ids_t]  # x: [N, H]
        size = self.prefill_chunk
        long_forward = getattr(self.attn, "long_forward", None)
        if self.device.type == "cuda" and self.stream_chunk > size and long_forward is not None and long_forward(N):
            # every forward chunk reads the streamed history once: fewer, larger chunks read it fewer times, and
            # the GPU's queue grows long enough to hide the host's work (the store's puts, the next block's
            # lookups) behind it (bench/RESULTS.md, issue 11)
            size = self.stream_chunk
        chunks = [(s, min(s + size, N)) for s in range(0, N, size)]
        # cos/sin of every position kept while short (2 x N x D x 2 bytes); longer prompts compute them per chunk
        ropes = [m.rope(pos[s:e]) for s, e in chunks] if N <= ROPE_TABLE_TOKENS else None
        hidden = _HiddenStates(x, self.device)
        for layer in range(m.cfg.num_layers):
            for j, (s, e) in enumerate(chunks):
                cos, sin = ropes[j] if ropes is not None else m.rope(pos[s:e])  # cos, sin: [T, D]
                xs = hidden.get(s, e, chunks[(j + 1) % len(chunks)])  # xs: [T, H]
                hidden.put(s, e, m.layer_forward(layer, xs, cos, sin, self.attn))
                if progress:   # token-layer units: layer * N + tokens of this layer done
                    progress(layer * N + e, m.cfg.num_layers * N)
        hidden.done()
        logits = m.logits(x[-1:].to(self.device))[0]  # logits: [V]
        self.attn.end()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            if N > self.prefill_chunk:
                # hand the long prefill's temporaries back, so decode graphs fit under a capped GPU
                del x
                torch.cuda.empty_cache()
        self.last_prefill_s = time.perf_counter() - t0
        return logits

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Append one token; returns float32 logits: [V]."""
        self.attn.begin(1)
        if self.use_graph:
            logits = self._graph_step(token)
        elif self.use_piecewise and self._tiered_graph_ok():
            logits = self._graph_step(token)
        elif self.use_piecewise:
            if self._piecewise is None:
                self._piecewise = PiecewiseDecode(self.model, self.attn)
            logits = self._piecewise.step(token, self.attn.length)
        else:
            ids = torch.tensor([token], dtype=torch.long, device=self.device)  # ids: [1]
            pos = torch.tensor([self.attn.length], dtype=torch.long, device=self.device)  # pos: [1]
            logits = self.model.forward(ids, pos, self.attn)
        self.attn.end()
        return logits

    def stats(self) -> dict:
        mode = ("graph" if self.use_graph or (self.use_piecewise and not self._graph_failed and self._captures)
                else "piecewise-graphs" if self.use_piecewise else "eager")
        out = {"decode_mode": mode, "graph_captures": self._captures,
               "graph_capture_ms": round(1000 * self._capture_s, 1)}
        if self._graph_error:
            out["graph_error"] = self._graph_error
        return out

    def _tiered_graph_ok(self) -> bool:
        """A tiered backend's step is captured whole while nothing it depends on changes (recaptured otherwise)."""
        if self._graph_failed:
            return False
        key = self.attn.graph_key()
        if key is None:
            return False
        if key != self._graph_key:
            # drop the old graph and its outputs first: its private pool is then free for the new capture
            self._graph = self._logits = None
            self._graph_key = key
            try:
                self._capture()
            except RuntimeError as e:   # a sync inside the step, or no memory: piecewise graphs from now on
                # never retried, and torch's RNG, left mid-capture by an invalidated capture, is closed again
                self._graph, self._graph_failed = None, True
                self._graph_error = first_error(e)
                torch.cuda.synchronize()
                heal_rng_after_failed_capture(self.device)
                # the user sees slower decode, not wrong output: say why once (the session's stats keep it)
                warnings.warn(f"decode step not captured as one CUDA graph ({self._graph_error}); decoding goes "
                              "on with piecewise graphs, slower; OFFLOAD_DEBUG_CAPTURE=1 prints the traceback",
                              RuntimeWarning, stacklevel=3)
                return False
        return True

    def _graph_step(self, token: int) -> torch.Tensor:
        if self._graph is None:
            self._capture()
        self._ids.fill_(token)
        self._pos.fill_(self.attn.length)
        self._graph.replay()
        return self._logits.clone()

    def _capture(self) -> None:
        """Capture one decode step (all layers, static cache, device-side position) in a CUDA graph."""
        t0 = time.perf_counter()
        self._ids = torch.zeros(1, dtype=torch.long, device=self.device)  # _ids: [1]
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)  # _pos: [1]
        self._pos.fill_(self.attn.length)
        self._ids.fill_(0)
        if not self._captured_once:
            # warm-up on a side stream (lazy cuBLAS/CuPy init must not happen inside a capture); the KV slot
            # written here is rewritten by the replay. Recaptures skip it: their kernels are all loaded.
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self.model.forward(self._ids, self._pos, self.attn)
            torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        # a private pool per capture: sharing one handle across recaptures trips the caching allocator's
        # use_count assert (torch 2.11) once the previous graph is gone but its outputs are not
        # thread_local: the runtime's own background threads (ANN builds, drive writes waiting on events,
        # checkpoint commits) may call CUDA during a capture; "global" mode failed the capture for them
        with capture(g):
            self._logits = self.model.forward(self._ids, self._pos, self.attn)  # _logits: [V]
        self._graph = g
        self._captured_once = True
        self._captures += 1
        self._capture_s += time.perf_counter() - t0


class _HiddenStates:
    """A prefill's hidden states x: [N, H], on the device, or (a long prompt) in pinned host memory with one chunk
    at a time on the device. Host chunks move on a copy stream, the next one read while this one computes and
    each written back behind its compute, so the 2 x N x H x 2 bytes per layer cross PCIe off the critical path."""

    def __init__(self, x: torch.Tensor, device: torch.device):
        self.x, self.device = x, device
        self.copy = torch.cuda.Stream(device) if device.type == "cuda" and not x.is_cuda else None
        self.next = None                                                   # (s, e, xs on the device, ready)

    def get(self, s: int, e: int, following: tuple[int, int]) -> torch.Tensor:
        """Rows s:e on the device; starts the read of `following` (s, e) behind them."""
        if self.copy is None:
            return self.x[s:e].to(self.device, non_blocking=True)          # [T, H]
        compute = torch.cuda.current_stream(self.device)
        if self.next is None or self.next[:2] != (s, e):
            self.next = (s, e, *self._read(s, e))
        xs, ready = self.next[2:]
        compute.wait_event(ready)
        xs.record_stream(compute)
        # one chunk only: its next read must follow this layer's write-back, so it is not started early
        self.next = (*following, *self._read(*following)) if following != (s, e) else None
        return xs

    def put(self, s: int, e: int, out: torch.Tensor) -> None:
        """Rows s:e = out [T, H] (device), written back behind the compute that makes it."""
        if self.copy is None:
            self.x[s:e].copy_(out, non_blocking=True)
            return
        self.copy.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy):
            self.x[s:e].copy_(out, non_blocking=True)
        out.record_stream(self.copy)

    def done(self) -> None:
        """Every write-back landed (the caller reads x next)."""
        if self.copy is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy)
            self.copy.synchronize()
            self.next = None

    def _read(self, s: int, e: int):
        with torch.cuda.stream(self.copy):                 # after every write-back queued so far (same stream)
            xs = self.x[s:e].to(self.device, non_blocking=True)            # xs: [T, H]
            ready = torch.cuda.Event()
            ready.record(self.copy)
        return xs, ready
