"""Progress on stderr: rich bars on a terminal, plain lines every few seconds otherwise; silent when
OFFLOAD_NO_PROGRESS=1 or when asked to be quiet. Also the planner's prefill-time estimate (a FLOP model)."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

_console = Console(stderr=True)
LINE_EVERY_S = 5.0          # a plain progress line this often when stderr is not a terminal
ESTIMATE_FROM = 128 << 10   # prefills this long get the time estimate before they start

# dense bf16 TFLOPS that prefill reaches per device class (GEMMs and attention together): the H200's is the
# effective rate of a real 512K prefill under the 24 GiB cap (503 TFLOPS, bench/RESULTS.md, streamed staging),
# the H100's scaled from it; the others are assumed at ~75% of the card's dense bf16 peak. Unknown GPUs: 100;
# the CPU: 0.3.
DEVICE_TFLOPS = (("H200", 500.0), ("H100", 460.0), ("A100", 230.0), ("L40", 135.0), ("4090", 125.0),
                 ("A6000", 115.0), ("3090", 55.0), ("A10", 95.0), ("T4", 30.0))


def enabled() -> bool:
    return os.environ.get("OFFLOAD_NO_PROGRESS") != "1" and sys.stderr.isatty()


def lines_enabled() -> bool:
    """Plain progress lines (not a terminal): on unless OFFLOAD_NO_PROGRESS=1."""
    return os.environ.get("OFFLOAD_NO_PROGRESS") != "1"


@contextlib.contextmanager
def progress_bar(description: str, total: int, show: bool | None = None):
    """Yields update(done, total): a rich bar on a terminal, a plain line every LINE_EVERY_S otherwise (a log
    or a pipe still sees a long load move); a no-op when show is False or OFFLOAD_NO_PROGRESS=1."""
    if show is False or not lines_enabled():
        yield lambda done, total=None: None
        return
    if not sys.stderr.isatty():
        lines = StepLines(description, total, sys.stderr)
        try:
            yield lines
        finally:
            lines.finish()
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=_console, transient=True) as prog:
        task = prog.add_task(description, total=total)
        yield lambda done, total=None: prog.update(task, completed=done, **({"total": total} if total else {}))


def activity(description: str):
    """For a job without steps (reading a model's metadata): on a non-terminal stderr a line
    "reading X: 0m05s" every LINE_EVERY_S until the returned stop() is called; else a no-op."""
    if not lines_enabled() or sys.stderr.isatty():
        return lambda: None
    lines = StepLines(description, None, sys.stderr)
    return lines.finish


class StepLines:
    """update(done, total) for a long step-wise job on a non-terminal stderr: a thread writes
    "loading X: 3/31 steps (10%), 0m05s" every `every` seconds, also while one step takes long (reading a
    big file is one step), and finish() a last line when any was written. total None: no steps, the time only."""

    def __init__(self, description: str, total: int | None, stream, every: float | None = None):
        self.description, self.total, self.stream = description, total, stream
        self.every = LINE_EVERY_S if every is None else every     # read at call time: tests shorten it
        self.t0 = time.perf_counter()
        self.done, self.printed = 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, name="offload-progress", daemon=True)
        self._thread.start()

    def __call__(self, done: int, total: int | None = None) -> None:
        self.done, self.total = done, total or self.total

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self._write()

    def finish(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        if self.printed:
            self.done = self.total
            self._write()

    def _write(self) -> None:
        self.printed = True
        clock = _clock(time.perf_counter() - self.t0)
        if self.total is None:
            self.stream.write(f"{self.description}: {clock}\n")
        else:
            pct = 100 * self.done / self.total if self.total else 100.0
            self.stream.write(f"{self.description}: {self.done}/{self.total} steps ({pct:.0f}%), {clock}\n")
        self.stream.flush()


@dataclass(frozen=True)
class PrefillEstimate:
    seconds: float
    tflops: float            # the rate assumed for this device
    flops: float
    device: str

    def line(self, n_tokens: int) -> str:
        return (f"prefill of {n_tokens:,} tokens: about {_clock(self.seconds)} (estimate: {self.flops:.2e} FLOPs "
                f"at {self.tflops:g} TFLOPS assumed for {self.device})")


def prefill_flops(mc, n_tokens: int, start: int = 0) -> float:
    """FLOPs of prefilling tokens start..start+n: 2 x params x N for the matmuls, 4 x L x Hq x D per visible
    (query, key) pair for attention (QK^T and PV), N^2/2 pairs for a causal prompt."""
    params = matmul_params(mc)
    pairs = n_tokens * start + n_tokens * n_tokens / 2
    return 2 * params * n_tokens + 4 * mc.num_layers * mc.num_heads * mc.head_dim * pairs


def matmul_params(mc) -> float:
    """Parameters a prefill token multiplies through: the layers (the embedding is a lookup, and prefill
    computes the logits of the last position only)."""
    import torch

    from offload.backends import weight_bytes
    tables = 1 if getattr(mc, "tie_word_embeddings", False) else 2
    return weight_bytes(mc, torch.float32) / 4 - tables * mc.vocab_size * mc.hidden_size


def device_tflops(device) -> tuple[float, str]:
    import torch
    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return 0.3, "the CPU"
    name = torch.cuda.get_device_name(device)
    for key, tf in DEVICE_TFLOPS:
        if key in name:
            return tf, name
    return 100.0, name


def estimate_prefill(mc, n_tokens: int, device, start: int = 0) -> PrefillEstimate:
    tf, name = device_tflops(device)
    flops = prefill_flops(mc, n_tokens, start)
    return PrefillEstimate(flops / (tf * 1e12), tf, flops, name)


class PrefillProgress:
    """update(done, total) in token-layer units (the engine's layer-wise prefill): converts to tokens done
    (FLOP-weighted, since a chunk's attention grows with its position), tokens/s and an ETA; prints a line
    every `every` seconds to `stream` (or drives a rich bar on a terminal)."""

    def __init__(self, n_tokens: int, num_layers: int, start: int = 0, stream=None, every: float | None = None,
                 attn_per_matmul: float = 0.0, bar=None):
        self.n, self.L, self.start = n_tokens, num_layers, start
        self.every = LINE_EVERY_S if every is None else every
        self.stream, self.bar = stream, bar
        self.r = attn_per_matmul     # attention FLOPs per (query, key) pair over matmul FLOPs per token
        self.t0 = time.perf_counter()
        self._last = self.t0

    def _cost(self, e: int) -> float:
        """Relative work of the first e tokens of one layer."""
        return e + self.r * (e * self.start + e * e / 2)

    def fraction(self, done: int, total: int) -> float:
        per_layer = max(1, total // self.L)
        layer, e = divmod(done, per_layer)
        full = self._cost(per_layer)
        return min(1.0, (layer * full + self._cost(e)) / (self.L * full))

    def __call__(self, done: int, total: int | None = None) -> None:
        total = total or self.L * self.n
        now = time.perf_counter()
        if self.bar is not None:
            self.bar(done, total)
        # a line every `every` s, and a last one at the end of a prefill that printed lines (or took that long)
        if self.stream is None or now - self._last < self.every and (done < total or now - self.t0 < self.every):
            return
        self._last = now
        self.stream.write(self.line(done, total, now - self.t0) + "\n")
        self.stream.flush()

    def line(self, done: int, total: int, elapsed: float) -> str:
        f = self.fraction(done, total)
        tok = int(f * self.n)
        rate = tok / elapsed if elapsed > 0 else 0.0
        eta = elapsed * (1 - f) / f if f > 0 else float("inf")
        return (f"prefill {tok}/{self.n} tokens {100 * f:.1f}% {rate:.0f} tok/s elapsed {_clock(elapsed)} "
                f"eta {_clock(eta)}")


@contextlib.contextmanager
def prefill_progress(mc, n_tokens: int, device, start: int = 0, show: bool | None = None):
    """Progress for one prefill: the time estimate first (>= 128K tokens), then a bar on a terminal or plain
    lines every 5 s otherwise. Yields update(done, total) for Engine.prefill."""
    quiet = show is False or (show is None and not lines_enabled())
    if quiet:
        yield lambda done, total=None: None
        return
    if n_tokens >= ESTIMATE_FROM:
        note(estimate_prefill(mc, n_tokens, device, start).line(n_tokens))
    r = 4 * mc.num_layers * mc.num_heads * mc.head_dim / (2 * max(1.0, matmul_params(mc)))
    if enabled():
        with progress_bar(f"prefill {n_tokens} tokens", mc.num_layers * n_tokens, True) as bar:
            yield PrefillProgress(n_tokens, mc.num_layers, start, attn_per_matmul=r, bar=bar)
        return
    yield PrefillProgress(n_tokens, mc.num_layers, start, stream=sys.stderr, attn_per_matmul=r)


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def note(message: str) -> None:
    """One line to stderr (banners, warnings)."""
    # soft_wrap: a line stays one line in a log or a pipe (rich would wrap it at 80 columns there)
    _console.print(message, highlight=False, markup=False, soft_wrap=True)
