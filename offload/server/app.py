"""The ASGI app (Starlette): OpenAI-compatible routes over a Service, whose model work runs on its worker thread.

Routes: POST /v1/chat/completions, POST /v1/completions (JSON or SSE with "stream": true), GET /v1/models,
GET /health (no key needed), GET /stats (prefix-cache hits, queue, last request's timings).
"""
from __future__ import annotations

import asyncio
import hmac

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from offload.errors import OffloadError
from offload.server.protocol import ApiError, Reply, parse_json, parse_request, sse
from offload.server.service import Service
from offload.server.worker import Job, QueueFull

_POLL_S = 0.25      # a non-streamed request checks this often whether its client is still there


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _as_api_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, OffloadError):
        code = "context_length_exceeded" if "ctx" in str(e) or "context" in str(e) else None
        return ApiError(400, str(e), code=code)
    return ApiError(500, f"internal error ({type(e).__name__}: {str(e)[:120]}); the server goes on, retry or "
                         "report it", type_="server_error")


class JobStream(StreamingResponse):
    """An SSE response whose job is cancelled however the response ends: done, or the client gone."""

    def __init__(self, job: Job, content):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def create_app(service: Service, api_key: str | None = None) -> Starlette:
    limits = service.limits

    def authorize(request: HttpRequest) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key; send the server's key as 'Authorization: Bearer KEY' "
                                "(the openai client's api_key)", code="invalid_api_key")

    async def read_body(request: HttpRequest) -> dict:
        declared = request.headers.get("content-length")
        too_big = ApiError(413, f"the request body is over this server's limit of {limits.max_body_bytes} bytes; "
                                "send less (offload-serve --max-body raises it)", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise too_big
        raw = bytearray()
        async for part in request.stream():       # also bounds a chunked body with no length
            raw += part
            if len(raw) > limits.max_body_bytes:
                raise too_big
        return parse_json(bytes(raw))

    async def completion(request: HttpRequest, kind: str) -> Response:
        authorize(request)
        req = parse_request(kind, await read_body(request), service.served, limits, service.sampling)
        prompt = await run_in_threadpool(service.prepare, req)    # a long prompt's tokenizing leaves the loop free
        try:
            job = service.submit(req, prompt)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}); retry after {e.retry_after} s", type_="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(e.retry_after)}) from None
        reply = Reply(req)
        if req.stream:
            return JobStream(job, _stream(job, reply))
        return await _whole(request, job, reply)

    async def _whole(request: HttpRequest, job: Job, reply: Reply) -> Response:
        pieces, getter = [], None
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                # asyncio.wait leaves the pending get alone on timeout (wait_for would cancel it, and a get that
                # completes in that instant loses its event)
                getter = getter or asyncio.ensure_future(job.events.get())
                done, _ = await asyncio.wait({getter}, timeout=_POLL_S)
                if loop.time() - checked >= _POLL_S:      # also while tokens keep coming
                    checked = loop.time()
                    if await request.is_disconnected():
                        return Response(status_code=499)
                if not done:
                    continue
                kind, value = getter.result()
                getter = None
                if kind == "piece":
                    pieces.append(value)
                elif kind == "error":
                    return error_response(_as_api_error(value))
                else:
                    u = value["usage"]
                    return JSONResponse(reply.whole("".join(pieces), value["finish_reason"],
                                                    Reply.usage(u["prompt_tokens"], u["completion_tokens"],
                                                                u["cached_tokens"])))
        finally:
            job.cancel()     # a no-op once the job ended; stops it if the client left or this handler is cancelled
            if getter is not None:
                getter.cancel()

    async def _stream(job: Job, reply: Reply):
        yield sse(reply.chunk(first=True))
        while True:
            kind, value = await job.events.get()
            if kind == "piece":
                yield sse(reply.chunk(value))
            elif kind == "error":   # the headers are out: the error goes in the stream, as OpenAI's does
                yield sse(_as_api_error(value).body())
                return
            else:
                yield sse(reply.chunk(finish_reason=value["finish_reason"]))
                if reply.req.include_usage:
                    u = value["usage"]
                    yield sse(reply.usage_chunk(Reply.usage(u["prompt_tokens"], u["completion_tokens"],
                                                            u["cached_tokens"])))
                yield sse("[DONE]")
                return

    async def chat_completions(request):
        return await completion(request, "chat")

    async def completions(request):
        return await completion(request, "completion")

    async def models(request):
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "offload",
             "max_model_len": service.llm.ctx} for name in service.served]})

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def stats(request):
        authorize(request)
        return JSONResponse(service.stats())

    async def on_api_error(request, e: ApiError):
        return error_response(e)

    async def on_http_error(request, e: HTTPException):
        kind = "not_found" if e.status_code == 404 else None
        what = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else e.detail
        return error_response(ApiError(e.status_code, f"{what}; see /v1/models, /v1/chat/completions, "
                                                      "/v1/completions, /health, /stats", code=kind))

    async def on_disconnect(request, e: ClientDisconnect):
        return Response(status_code=499)

    async def on_other(request, e: Exception):
        return error_response(_as_api_error(e))

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/stats", stats, methods=["GET"])]
    handlers = {ApiError: on_api_error, HTTPException: on_http_error, ClientDisconnect: on_disconnect,
                Exception: on_other}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.service = service
    return app

