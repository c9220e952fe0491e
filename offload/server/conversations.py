"""Conversations that outlive a request: each one's KV is kept, live or parked on disk, and resumed by prefix.

A request's prompt (a chat rendered by the model's template, or a completion prompt) is compared with the
text of every kept conversation of its kind; the longest one that is a proper prefix of it is resumed, and
only the rest of the prompt is tokenized and prefilled, exactly as `Chat` does turn by turn. The KV's own
token ids are kept with that text: the text is what the ids decode to, so the resumed ids are a token-id
prefix of the request's. After the answer the conversation holds prompt + answer and is kept again.

At most `live_max` conversations keep their session (KV in the tiers, counted in the LLM's shared budget);
the least recently used others are parked as saved session files (offload.persist: checksummed, 0600) in a
private folder, within `park_bytes`, and loaded back when a request continues them. Past that budget the
oldest parked ones are forgotten (a later request then simply prefills). Only the worker thread calls in.
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from offload.errors import CapacityError, OffloadError


@dataclass
class Conversation:
    id: int
    kind: str                 # "chat" | "completion": their prompts are encoded differently
    text: str                 # what the KV holds, as text (the ids decode to it)
    tokens: int               # how many tokens the KV holds
    session: object | None    # live: an offload.api.Session; parked: None
    path: Path | None         # parked: the saved session file
    nbytes: int = 0           # parked file size
    used: float = 0.0         # monotonic time of the last request


class ConversationStore:
    def __init__(self, llm, park_dir: str | os.PathLike | None = None, park_bytes: int = 8 << 30, live_max: int = 2):
        self.llm, self.park_bytes, self.live_max = llm, int(park_bytes), max(1, int(live_max))
        self._own_dir = park_dir is None
        self.park_dir = Path(tempfile.mkdtemp(prefix="offload-serve-")) if park_dir is None else Path(park_dir)
        if not self._own_dir:
            self.park_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._kept: list[Conversation] = []
        self._ids = itertools.count(1)
        self.counts = {"hits": 0, "misses": 0, "reused_tokens": 0, "parked": 0, "resumed_from_disk": 0,
                       "forgotten": 0}

    # ---- a request's conversation ----------------------------------------------------------------
    def checkout(self, kind: str, text: str):
        """(session, cached_text, reused_tokens) for a prompt `text`: the kept conversation whose text is the
        longest proper prefix of it (removed from the store while the request runs), or a new empty session."""
        best = max((c for c in self._kept if c.kind == kind and len(c.text) < len(text) and text.startswith(c.text)),
                   key=lambda c: len(c.text), default=None)
        if best is not None:
            self._kept.remove(best)
            sess = best.session if best.session is not None else self._swap_in(best)
            if sess is not None:
                self.counts["hits"] += 1
                self.counts["reused_tokens"] += sess.length
                return sess, best.text, sess.length
        self.counts["misses"] += 1
        return self._new_session(), "", 0

    def checkin(self, kind: str, session, text: str) -> None:
        """Keep `session`, whose KV now holds `text`, for the next request that extends it."""
        if session.closed or session.length == 0:
            return
        self._kept.append(Conversation(next(self._ids), kind, text, session.length, session, None,
                                       used=time.monotonic()))
        live = sorted((c for c in self._kept if c.session is not None), key=lambda c: c.used)
        for c in live[:max(0, len(live) - self.live_max)]:
            self._park(c)

    def drop(self, session) -> None:
        """A session whose KV is not trusted any more (a request failed half-way): closed, never kept."""
        session.close()

    # ---- live <-> disk ------------------------------------------------------------------------------
    def _new_session(self):
        while True:
            try:
                return self.llm.session()
            except CapacityError:
                live = sorted((c for c in self._kept if c.session is not None), key=lambda c: c.used)
                if not live:
                    raise
                self._park(live[0])       # the shared KV budget is full: the oldest live one goes to disk

    def _park(self, c: Conversation) -> None:
        from offload.persist import save_session
        sess, c.session = c.session, None
        path = self.park_dir / f"conversation-{c.id}.offload"
        try:
            if self.park_bytes > 0:
                save_session(sess, path)
                c.path, c.nbytes = path, path.stat().st_size
                self.counts["parked"] += 1
        except (OSError, OffloadError):
            path.unlink(missing_ok=True)   # a full or failing disk: this one is forgotten, the server goes on
        finally:
            sess.close()
        if c.path is None:
            self._forget(c)                # a later request that extends it prefills it again
        self._trim()

    def _trim(self) -> None:
        parked = sorted((c for c in self._kept if c.path is not None), key=lambda c: c.used)
        total = sum(c.nbytes for c in parked)
        for c in parked:
            if total <= self.park_bytes:
                break
            self._forget(c)
            total -= c.nbytes

    def _forget(self, c: Conversation) -> None:
        if c in self._kept:
            self._kept.remove(c)
        if c.path is not None:
            c.path.unlink(missing_ok=True)
        self.counts["forgotten"] += 1

    def _swap_in(self, c: Conversation):
        sess = self._new_session()
        try:
            from offload.persist import load_session
            load_session(sess, c.path)
        except OffloadError:           # the file was damaged or removed: forget it, prefill afresh
            sess.close()
            self._forget(c)
            return None
        c.path.unlink(missing_ok=True)
        self.counts["resumed_from_disk"] += 1
        return sess

    # ---- reporting, shutdown -------------------------------------------------------------------------
    def stats(self) -> dict:
        parked = [c for c in self._kept if c.path is not None]
        return {**self.counts, "live": sum(1 for c in self._kept if c.session is not None),
                "parked_now": len(parked), "parked_bytes": sum(c.nbytes for c in parked),
                "park_budget_bytes": self.park_bytes, "live_max": self.live_max}

    def close(self) -> None:
        for c in list(self._kept):
            if c.session is not None:
                c.session.close()
            if c.path is not None:
                c.path.unlink(missing_ok=True)
        self._kept.clear()
        if self._own_dir:
            shutil.rmtree(self.park_dir, ignore_errors=True)
