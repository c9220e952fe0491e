"""One thread runs the model; requests wait for it in a bounded line.

The event loop never touches the model: a request becomes a Job, queued for the worker thread, which
sends its results back as events on an asyncio queue of the request's loop. One sequence decodes at a
time (one GPU, one set of weights); at most `capacity` jobs run or wait, and one more is refused at once
(QueueFull, answered 429 with Retry-After) instead of piling up behind a long generation.
"""
from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections import deque
from typing import Callable


class QueueFull(Exception):
    """Every place in line is taken; retry_after: a guess in whole seconds from recent job times."""

    def __init__(self, capacity: int, retry_after: int):
        super().__init__(f"{capacity} requests are already running or waiting")
        self.capacity, self.retry_after = capacity, retry_after


class Job:
    """One request's work on the worker thread and the events it sends back to the request's loop."""

    def __init__(self, work: Callable[["Job"], None], loop: asyncio.AbstractEventLoop):
        self.work, self.loop = work, loop
        self.events: asyncio.Queue = asyncio.Queue()     # ("piece", str) ... then ("end", result) or ("error", exc)
        self._cancelled = threading.Event()
        self.ended = False          # its last event ("end" or "error") is sent: a later cancel() changes nothing

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """The client is gone: the worker stops at the next token (or skips the job if it has not started)."""
        self._cancelled.set()

    def emit(self, kind: str, value=None) -> None:
        """From the worker thread."""
        self.ended = self.ended or kind in ("end", "error")
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:        # the loop is closed (server shutting down): nobody listens any more
            self.cancel()


class Worker:
    """The one thread that runs jobs, in arrival order."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._admitted = 0                    # running + waiting
        self._times: deque = deque(maxlen=16)  # seconds of recent jobs: the Retry-After guess
        self.counts = {"done": 0, "cancelled": 0, "rejected": 0, "failed": 0}
        self._thread = threading.Thread(target=self._run, name="offload-worker", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[Job], None]) -> Job:
        """Queue work(job) for the worker thread; QueueFull when `capacity` jobs already run or wait."""
        with self._lock:
            if self._admitted >= self.capacity:
                self.counts["rejected"] += 1
                raise QueueFull(self.capacity, self._retry_after())
            self._admitted += 1
        job = Job(work, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def _retry_after(self) -> int:
        mean = sum(self._times) / len(self._times) if self._times else 1.0
        return max(1, math.ceil(mean * self._admitted))

    @property
    def load(self) -> dict:
        with self._lock:
            return {"admitted": self._admitted, "capacity": self.capacity, **self.counts}

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            t0 = time.perf_counter()
            outcome = "cancelled"
            try:
                if not job.cancelled:
                    job.work(job)
                    outcome = "cancelled" if job.cancelled and not job.ended else "done"
            except BaseException as e:  # noqa: BLE001  (reported to the request; the worker keeps serving)
                outcome = "failed"
                job.emit("error", e)
            finally:
                with self._lock:
                    self._admitted -= 1
                    self.counts[outcome] += 1
                    self._times.append(time.perf_counter() - t0)

    def run_sync(self, fn: Callable[[], object]) -> object:
        """fn() on the worker thread, waited for from any thread that is not it (start-up and shutdown work)."""
        done, box = threading.Event(), {}

        class _Once:
            cancelled = False

            @staticmethod
            def work(_job):
                try:
                    box["value"] = fn()
                except BaseException as e:  # noqa: BLE001
                    box["error"] = e
                finally:
                    done.set()

            @staticmethod
            def emit(kind, value=None):
                pass

        with self._lock:
            self._admitted += 1
        self._jobs.put(_Once)
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)
