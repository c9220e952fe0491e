"""The OpenAI wire format: requests checked into frozen dataclasses, responses and stream chunks, error objects.

Every refusal is an ApiError: an HTTP status and OpenAI's error object, {"error": {"message", "type", "param",
"code"}}, whose message names the problem and the fix in one line.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from offload.engine.sampling import SamplingParams
from offload.errors import ConfigError

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "seed", "stop")
_UNSUPPORTED = {"tools": "tool calls", "functions": "function calls", "logprobs": "logprobs",
                "response_format": "structured output", "echo": "echo", "best_of": "best_of", "suffix": "suffix"}
_ROLES = ("system", "user", "assistant", "developer")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 << 20     # a request body, bytes
    max_tokens: int = 4096            # most new tokens one request may ask for
    default_max_tokens: int = 256     # when the request does not say


@dataclass(frozen=True)
class Request:
    """A checked /v1/chat/completions (messages) or /v1/completions (prompt) request."""
    kind: str                          # "chat" | "completion"
    model: str
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    messages: tuple = ()               # chat: ({"role", "content"}, ...), contents as text
    prompt: str = ""                   # completion


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"the request body is not valid JSON ({str(e).splitlines()[0][:80]}); send a UTF-8 JSON object",
                  code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body is a JSON {type(body).__name__}, not an object; send a JSON object",
                  code="invalid_json")
    return body


def parse_request(kind: str, body: dict, served: tuple[str, ...], limits: Limits,
                  base: SamplingParams | None = None) -> Request:
    """base: the server's sampling (its --temperature, ...); the request's fields override it."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad(f"'model' is missing or not a string; pass \"model\": \"{served[0]}\"", param="model")
    if model not in served:
        raise ApiError(404, f"the model '{model[:100]}' does not exist here; this server serves '{served[0]}' "
                            "(GET /v1/models)", code="model_not_found", param="model")
    for key, what in _UNSUPPORTED.items():
        if body.get(key) not in (None, False, [], 0):
            raise bad(f"'{key}' ({what}) is not supported by offload-serve; leave it out", param=key)
    n = body.get("n", 1)
    if n != 1:
        raise bad(f"'n' is {n!r}; offload-serve answers with one choice per request, so leave it out or pass 1",
                  param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("'stream' must be true or false; pass a JSON boolean", param="stream")
    opts = body.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    sampling = _sampling(body, limits, base or SamplingParams())
    if kind == "chat":
        return Request(kind, model, sampling, stream, include_usage, messages=_messages(body.get("messages")))
    return Request(kind, model, sampling, stream, include_usage, prompt=_prompt(body.get("prompt")))


def _sampling(body: dict, limits: Limits, base: SamplingParams) -> SamplingParams:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    n = body.get(key)
    if n is None:
        n = limits.default_max_tokens
    elif isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise bad(f"'{key}' is {n!r}; pass a whole number from 1 to {limits.max_tokens}", param=key)
    elif n > limits.max_tokens:
        raise bad(f"'{key}' is {n}, over this server's limit of {limits.max_tokens}; ask for at most "
                  f"{limits.max_tokens} (offload-serve --max-tokens raises it)", param=key)
    values = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
    try:
        return base.override(max_tokens=n, **values)
    except ConfigError as e:
        param = next((k for k in values if str(e).startswith(k) or f"{k} " in str(e)), None)
        raise bad(str(e), param=param) from None


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):         # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"{where} has a content part of type {kind!r}; offload-serve reads text parts only",
                          param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"{where} content must be a string or a list of text parts; send the text", param="messages")


def _messages(messages) -> tuple:
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' is missing or empty; send a list of {\"role\", \"content\"} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            role = m.get("role") if isinstance(m, dict) else None
            raise bad(f"messages[{i}] has role {role!r}; use one of {', '.join(_ROLES)}", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text(m.get("content"), f"messages[{i}]")})
    return tuple(out)


def _prompt(prompt) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("'prompt' must be one non-empty string; send one prompt per request", param="prompt")
    return prompt


# ---- responses --------------------------------------------------------------------------------------
class Reply:
    """The ids, timestamps and shapes of one request's response (whole or as stream chunks)."""

    def __init__(self, req: Request):
        self.req = req
        self.id = ("chatcmpl-" if req.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if req.kind == "chat" else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.req.model}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens}}

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        if self.req.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(self.object), "choices": [choice], "usage": usage}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> dict:
        if self.req.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        obj = "chat.completion.chunk" if self.req.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage}


def sse(payload) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()
