"""Chat: a multi-turn conversation over one session of an LLM (offload.api), saved and resumed as one file."""
from __future__ import annotations

from typing import Iterator

from offload.errors import ConfigError, SessionClosedError, SessionFileError
from offload.files import utf8_text

CHAT_META = "chat"      # the key of a saved chat's messages in its session file's header


class Chat:
    """Multi-turn chat over one session; each turn prefills only the text not already in the KV cache.

    Several chats of one LLM coexist, each with its own session (KV); chat.save(path) writes the messages
    and the KV in one session file, and llm.load_chat(path) resumes it without prefilling again."""

    def __init__(self, llm, system: str | None = None):
        self.llm, self.system = llm, system
        self.session = None
        self.finish_reason: str | None = None   # of the last answer: "stop" or "length" (cut by max_tokens)
        self.reset()

    def reset(self) -> None:
        """Start over: this chat's own session is replaced (other chats and sessions are untouched)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._new_session()

    def _new_session(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session = self.llm.session()
        self._cached_text = ""   # the text whose tokens are in the KV cache, in order

    def close(self) -> None:
        self.session.close()

    def send(self, text: str, sampling_params=None, **sampling) -> str:
        return "".join(self.stream(text, sampling_params, **sampling))

    def stream(self, text: str, sampling_params=None, **sampling) -> Iterator[str]:
        """The answer to `text`, streamed. sampling_params (offload.SamplingParams) and/or keyword arguments
        (max_new_tokens / max_tokens, temperature, top_p, top_k, min_p, penalties, stop, seed)."""
        tok = self.llm.tokenizer
        if tok is None:
            raise ConfigError("this model has no tokenizer (load_format='dummy'); chat needs a real model")
        if self.session.closed:
            raise SessionClosedError("this chat was closed (chat.close() or llm.close()); start a new one with "
                                     "llm.chat()")
        utf8_text(text, "the message")
        params = self.llm.sampling(sampling_params, **sampling)    # checked before the turn is taken
        messages = self.messages + [{"role": "user", "content": text}]
        rendered, spans = tok.render_chat(messages, add_generation_prompt=True)
        if not rendered.startswith(self._cached_text):
            # the template rewrote earlier turns (some templates do): start the cache over
            self._new_session()
        self.messages = messages
        # the template's markers are control tokens; the messages' text never is (even when it spells one)
        ids = tok.encode_chat(rendered, spans, start=len(self._cached_text))   # the template has BOS
        start = self.session.length + len(ids)
        pieces = []
        self.finish_reason = None
        try:
            for piece in self.session.generate_text(ids, params):
                pieces.append(piece)
                yield piece
        finally:
            if len(self.session.tokens) < start:
                # the prompt never fully reached the KV (refused, interrupted in prefill): the turn did not
                # happen, and a half-filled cache is not trusted
                self.messages = messages[:-1]
                if not self.session.closed:
                    self._new_session()
            else:
                # also when the caller stops early (Ctrl-C, a closed stream): the answer so far is the turn
                self.finish_reason = self.session.finish_reason
                self.messages.append({"role": "assistant", "content": "".join(pieces)})
                fed = self.session.tokens[start:]   # generated ids that went through the model (not the last one)
                self._cached_text = rendered + tok.decode(fed, skip_special_tokens=False)

    # ---- save / load ----------------------------------------------------------------------------
    def save(self, path) -> None:
        """One session file (offload.persist: 0600, atomic, checksummed) holding the KV and the messages."""
        from offload.persist import save_session
        if self.session.closed:
            raise SessionClosedError("this chat was closed; save it before chat.close()")
        save_session(self.session, path, meta={CHAT_META: {"system": self.system, "messages": self.messages,
                                                           "cached_text": self._cached_text}})

    @classmethod
    def load(cls, llm, path) -> "Chat":
        from offload.persist import load_session
        chat = cls.__new__(cls)
        chat.llm, chat.finish_reason = llm, None
        chat.session = llm.session()
        try:
            meta = load_session(chat.session, path) or {}
            state = _checked_state(meta.get(CHAT_META), path)
        except BaseException:
            chat.session.close()
            raise
        chat.system, chat.messages, chat._cached_text = state["system"], state["messages"], state["cached_text"]
        return chat


def _checked_state(state, path) -> dict:
    def bad(what):
        return SessionFileError(f"{path} holds no saved chat ({what}); load it with llm.load_session(), or save a "
                                "chat with chat.save()")
    if not isinstance(state, dict):
        raise bad("no chat messages in its header")
    msgs, system, cached = state.get("messages"), state.get("system"), state.get("cached_text")
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                             and isinstance(m.get("content"), str) for m in msgs):
        raise bad("malformed messages")
    if not (system is None or isinstance(system, str)) or not isinstance(cached, str):
        raise bad("malformed system prompt or cached text")
    return state
