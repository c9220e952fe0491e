"""What the server does with the model: check a request against the model, then (on the worker thread) resume
its conversation, prefill the rest of the prompt and stream the answer back as events."""
from __future__ import annotations

import threading
from dataclasses import dataclass

from offload.api import PrefillCancelled
from offload.server.conversations import ConversationStore
from offload.server.protocol import ApiError, Limits, Request
from offload.server.worker import Job, Worker


@dataclass(frozen=True)
class Prompt:
    """A request's prompt as the model sees it: its text and, for chats, where the user-written spans are."""
    text: str
    spans: tuple = ()        # chat: (start, end) of each message's content: encoded as text, never as control tokens
    tokens: int = 0          # its length in tokens, encoded whole


class Service:
    def __init__(self, llm, served: tuple[str, ...], limits: Limits, queue_size: int = 8,
                 park_dir=None, park_bytes: int = 8 << 30, live_max: int = 2):
        self.llm, self.served, self.limits = llm, served, limits
        self.store = ConversationStore(llm, park_dir, park_bytes, live_max)
        self.worker = Worker(queue_size)
        self.llm_stats: dict = {}
        self.last: dict = {}               # the last request: its tokens, cache use, finish reason, ttft          # refreshed by the worker after each request (the loop never reads the LLM)
        self.requests = {"chat": 0, "completion": 0}
        self.sampling = llm.sampling()     # the server's own sampling options: what a request does not set
        # Tokenizer.encode(parse_special=False) flips a flag on the shared tokenizer for the call: requests being
        # checked (thread pool) and the one running (worker) must not interleave their encodes
        self._tok_lock = threading.Lock()

    # ---- before the request waits in line (a pool thread): its refusals come at once ----
    def prepare(self, req: Request) -> Prompt:
        with self._tok_lock:
            return self._prepare(req)

    def _prepare(self, req: Request) -> Prompt:
        tok = self.llm.tokenizer
        if req.kind == "chat":
            if tok.chat_template is None:
                raise ApiError(400, f"{self.llm.name} has no chat template; use /v1/completions with a raw prompt",
                               param="messages")
            try:
                text, spans = tok.render_chat(list(req.messages), add_generation_prompt=True)
            except Exception as e:  # noqa: BLE001  (ConfigError from raise_exception, or a template error)
                raise ApiError(400, f"the chat template rejected the messages ({str(e)[:120]}); fix the message list",
                               param="messages") from None
            n = len(tok.encode_chat(text, spans))
            prompt = Prompt(text, tuple(spans), n)
        else:
            prompt = Prompt(req.prompt, (), len(self.llm._encode(req.prompt)))
        if prompt.tokens >= self.llm.ctx:
            raise ApiError(400, f"the prompt is {prompt.tokens} tokens but the context holds {self.llm.ctx}; shorten "
                                "it, or restart offload-serve with a larger --ctx", code="context_length_exceeded",
                           param="messages" if req.kind == "chat" else "prompt")
        return prompt

    def submit(self, req: Request, prompt: Prompt) -> Job:
        """Queue the request (QueueFull when the line is full); its events arrive on job.events."""
        return self.worker.submit(lambda job: self._run(job, req, prompt))

    # ---- on the worker thread ---------------------------------------------------------------------
    def _run(self, job: Job, req: Request, prompt: Prompt) -> None:
        llm, tok = self.llm, self.llm.tokenizer
        self.requests[req.kind] += 1
        sess, cached, reused = self.store.checkout(req.kind, prompt.text)
        with self._tok_lock:
            if req.kind == "chat":   # the template's markers are control tokens, the messages' text never is
                ids = tok.encode_chat(prompt.text, list(prompt.spans), start=len(cached))
            elif cached:
                ids = tok.encode(prompt.text[len(cached):], parse_special=False)
            else:
                ids = llm._encode(prompt.text)
        start = sess.length + len(ids)
        sess.interrupt = lambda: job.cancelled     # a long prefill stops between chunks once the client is gone
        gen = sess.generate_text(ids, req.sampling)
        try:
            for piece in gen:
                job.emit("piece", piece)
                if job.cancelled:       # the client went away: stop here, keep what is in the KV
                    break
        except PrefillCancelled:        # the session closed itself; this conversation is prefilled afresh next time
            self.last = {"prompt_tokens": start, "completion_tokens": 0, "cached_tokens": reused,
                         "finish_reason": "cancelled in prefill", "ttft_s": None}
            return
        except BaseException:
            gen.close()
            sess.interrupt = None
            if len(sess.tokens) < start:   # the prompt did not reach the KV whole: do not keep this session
                self.store.drop(sess)
            else:
                self.store.checkin(req.kind, sess, prompt.text + tok.decode(sess.tokens[start:], False))
            raise
        gen.close()
        sess.interrupt = None
        fed = sess.tokens[start:]           # answer ids that went through the model (not the last one sampled)
        self.llm_stats = llm.stats
        usage = {"prompt_tokens": start, "completion_tokens": sess.generated, "cached_tokens": reused}
        self.last = {**usage, "finish_reason": "cancelled" if job.cancelled else sess.finish_reason or "length",
                     "ttft_s": sess.stats().get("ttft_s")}
        if not job.cancelled:           # else nobody listens, and the job counts as cancelled
            job.emit("end", {"finish_reason": sess.finish_reason or "length", "usage": usage})
        # after the answer is out: keeping it may park another conversation on disk, which the client need not wait for
        self.store.checkin(req.kind, sess, prompt.text + tok.decode(fed, skip_special_tokens=False))

    # ---- reporting, shutdown ------------------------------------------------------------------------
    def stats(self) -> dict:
        s = self.llm_stats
        return {"model": self.served[0], "requests": dict(self.requests), "queue": self.worker.load,
                "prefix_cache": self.store.stats(),
                "last_request": {**self.last, "ms_per_token": s.get("ms_per_token")},
                "ctx": self.llm.ctx, "device": str(self.llm.device)}

    def close(self) -> None:
        try:
            self.worker.run_sync(self.store.close)
        finally:
            self.worker.stop()
            self.llm.close()
