"""In-flight state of slots: what must finish before a slot is read, and before it is overwritten.

A handle is a torch.cuda.Event (GPU copies) or a concurrent.futures.Future (disk I/O); None = done.
Per tier and slot the store remembers
    fill:  the operation producing the slot's content   (a reader waits for it)
    drain: operations still reading the slot's content  (a writer waits for them, and for fill)
Waiting is done where it is cheapest: a CUDA stream waits an event without blocking the host, a disk
worker waits inside its thread (`after=`), and only a GPU copy that must follow disk I/O blocks the host.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from typing import Iterable, Sequence

import torch


def wait_handles(handles: Iterable) -> None:
    """Block until every CUDA event / Future in handles is done (failures are the reader's to report)."""
    for h in handles:
        if h is None:
            continue
        if isinstance(h, Future):
            wait_futures([h])
        else:
            h.synchronize()


def gather(futures: list[Future]) -> Future:
    """One Future done when all are; it carries the first failure, set only after every part finished."""
    out: Future = Future()
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(_):
        with lock:
            left[0] -= 1
            if left[0]:
                return
        failed = [f.exception() for f in futures if f.exception() is not None]
        out.set_exception(failed[0]) if failed else out.set_result(None)

    if not futures:
        out.set_result(None)
    for f in futures:
        f.add_done_callback(one_done)
    return out


def is_done(h) -> bool:
    if h is None:
        return True
    return h.done() if isinstance(h, Future) else h.query()


def stream_wait(stream, handles: Iterable) -> None:
    """Order `stream` after handles: events without blocking the host, futures by blocking it."""
    for h in handles:
        if h is None or is_done(h):
            continue
        if isinstance(h, Future):
            wait_handles([h])
        elif stream is not None:
            stream.wait_event(h)
        else:
            h.synchronize()


class SlotStates:
    """fill / drain handles of every slot of one tier (sparse: only slots with something in flight)."""

    def __init__(self):
        self.fill: dict[int, object] = {}
        self.drain: dict[int, list] = {}

    def readers_wait(self, slots: Sequence[int]) -> list:
        """Handles a reader of these slots must wait for (their fills), deduplicated."""
        out = {}
        if not self.fill:
            return []
        if len(self.fill) < len(slots):     # a long read (prefill history) against few pending fills
            wanted = set(map(int, slots))
            slots = [s for s in self.fill if s in wanted]
        done = _DoneMemo()
        for s in slots:
            h = self.fill.get(int(s))
            if h is not None:
                if done(h):
                    del self.fill[int(s)]
                else:
                    out[id(h)] = h
        return list(out.values())

    def writers_wait(self, slots: Sequence[int]) -> list:
        """Handles an overwrite of these slots must wait for (fills and drains); forgets them."""
        out = {}
        done = _DoneMemo()
        for s in slots:
            s = int(s)
            for h in [self.fill.pop(s, None), *self.drain.pop(s, [])]:
                if h is not None and not done(h):
                    out[id(h)] = h
        return list(out.values())

    def filled_by(self, slots: Sequence[int], h) -> None:
        if h is None:
            return
        for s in slots:
            self.fill[int(s)] = h

    def drained_by(self, slots: Sequence[int], h) -> None:
        if h is None:
            return
        done = _DoneMemo()
        for s in slots:
            lst = [x for x in self.drain.get(int(s), []) if not done(x)]
            lst.append(h)
            self.drain[int(s)] = lst


class _DoneMemo:
    """is_done, asked once per handle within one call: a put of 4K chunks shares a few events among its slots,
    and an event query costs microseconds (prefill spent ~0.2 s of every 64K tokens in them)."""

    def __init__(self):
        self.seen: dict[int, bool] = {}

    def __call__(self, h) -> bool:
        key = id(h)
        r = self.seen.get(key)
        if r is None:
            r = self.seen[key] = is_done(h)
        return r


def new_event(stream) -> "torch.cuda.Event | None":
    if stream is None:
        return None
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev
