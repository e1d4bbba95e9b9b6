"""The HTTP layer: FastAPI routes for the OpenAI API, API keys, limits, SSE streaming, health and metrics.

Thin by design: a route checks the key, reads and validates the body, applies the limits, turns the request into
prompt token ids and :class:`~bitnet_torch.serving.scheduler.SamplingParams`, and relays the scheduler's events
(one JSON response, or server-sent events ending in ``data: [DONE]``). Every refusal is OpenAI's error object
with the status that says why: 400 (bad JSON, a limit such as max prompt tokens or max_tokens, an unsupported
feature), 401 (missing or wrong key), 413 (body too large), 422 (wrong types), 429 + ``Retry-After`` (queue
full, rate limits), 408 (request timeout), 503 (draining). One structured log line per request
(logger ``bitnet_torch.serving.requests``) names the client by a short hash of its key, never the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from . import protocol
from .config import ServeConfig, client_id
from .limits import KeyRateLimiter
from .metrics import ServingMetrics
from .scheduler import Event, QueueFull, SamplingParams, Scheduler

__all__ = ["ServerState", "APIError", "create_app"]

logger = logging.getLogger(__name__)
request_log = logging.getLogger("bitnet_torch.serving.requests")

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready", "/metrics")


class APIError(Exception):
    """A refusal rendered as OpenAI's error object with ``status`` (and headers such as Retry-After)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, reason: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.reason = reason or code or type_
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(protocol.error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status, headers=self.headers)


@dataclasses.dataclass
class ServerState:
    """Everything the routes share: settings, tokenizer, scheduler, metrics, rate limiter, drain flag."""

    config: ServeConfig
    tokenizer: Any
    scheduler: Scheduler
    metrics: ServingMetrics
    limiter: KeyRateLimiter = dataclasses.field(init=False)
    draining: bool = False
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.limiter = KeyRateLimiter(self.config.rate_limit_rpm, self.config.rate_limit_tpm)
        self._keys = tuple(k.encode("utf-8") for k in self.config.api_keys)

    def authenticate(self, request: Request) -> str:
        """The client's short id; :class:`APIError` 401 for a missing or wrong key (when keys are configured).

        Every configured key is compared in constant time (``hmac.compare_digest``), all of them on every call.
        """
        if not self._keys:
            return client_id(None)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           code="invalid_api_key", reason="unauthorized")
        given = token.strip().encode("utf-8")
        match = False
        for key in self._keys:
            match |= hmac.compare_digest(given, key)
        if not match:
            raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key",
                           reason="unauthorized")
        return client_id(given.decode("utf-8"))


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one larger than ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                       code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="body_too_large")
    return bytes(body)


def _field_path(loc: tuple) -> str | None:
    """``messages.0.role`` from a pydantic error location, without the union-branch tags (``str``, ``list[int]``)."""
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int) or (isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS):
            parts.append(str(part))
        else:
            break
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "literal"}


def _parse(body: bytes, schema: type[protocol.BaseModel]) -> Any:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="bad_json") from None
    except RecursionError:
        raise APIError(400, "the request body nests JSON too deeply", code="bad_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="bad_json")
    try:
        request = schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _field_path(first.get("loc", ()))
        message = f"invalid value for '{where}': {first.get('msg')}" if where else f"invalid request: {first.get('msg')}"
        raise APIError(422, message, param=where, code="invalid_type") from None
    problem = protocol.unsupported_fields(request)
    if problem:
        raise APIError(400, problem, code="unsupported")
    return request


class _Handler:
    """One completion request from validation to its last byte (shared by chat and completions)."""

    def __init__(self, state: ServerState, chat: bool):
        self.state = state
        self.chat = chat
        self.endpoint = "/v1/chat/completions" if chat else "/v1/completions"

    def prompt_ids(self, req: Any) -> list[int]:
        tok = self.state.tokenizer
        if self.chat:
            if not getattr(tok, "chat_template", None):
                raise APIError(400, "this model has no chat template; use /v1/completions", code="no_chat_template")
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in req.messages]
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # noqa: BLE001 - a template that raises (e.g. on a role) refuses the request
                raise APIError(400, f"the model's chat template refused these messages: {exc}", param="messages",
                               code="chat_template_error") from None
            return list(tok(text, add_special_tokens=False)["input_ids"])
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return list(tok(prompt)["input_ids"])
        vocab = self.state.scheduler.decoder.vocab_size
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt",
                           code="invalid_token")
        return list(prompt)

    def sampling(self, req: Any, prompt_len: int) -> SamplingParams:
        cfg = self.state.config
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        if prompt_len > cfg.max_prompt_tokens:
            raise APIError(400, f"the prompt has {prompt_len} tokens, more than the maximum of "
                                f"{cfg.max_prompt_tokens} prompt tokens", param="messages" if self.chat else "prompt",
                           code="prompt_too_long")
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        # Unspecified: the default, shortened to what the context leaves after the prompt.
        max_tokens = asked or max(1, min(cfg.default_max_tokens, cfg.max_seq_len - prompt_len))
        if max_tokens > cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this server's limit of max_tokens="
                                f"{cfg.max_tokens_limit}", param="max_tokens", code="max_tokens_too_large")
        room = cfg.max_seq_len - prompt_len
        if max_tokens > room:
            raise APIError(400, f"the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the "
                                f"context length of {cfg.max_seq_len} tokens", param="max_tokens",
                           code="context_length_exceeded")
        top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
        return SamplingParams(
            max_tokens=max_tokens, temperature=float(req.temperature if req.temperature is not None else 1.0),
            top_p=float(req.top_p if req.top_p is not None else 1.0), top_k=top_k, seed=req.seed,
            stop=req.stop_strings(), ignore_eos=bool(req.ignore_eos))

    async def __call__(self, request: Request) -> Response:
        state = self.state
        started = time.monotonic()
        client = state.authenticate(request)
        request.state.client = client
        if state.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable", code="draining",
                           reason="draining", headers={"Retry-After": "5"})
        body = await _read_body(request, state.config.max_body_bytes)
        req = _parse(body, protocol.ChatCompletionRequest if self.chat else protocol.CompletionRequest)
        prompt = self.prompt_ids(req)
        params = self.sampling(req, len(prompt))
        charge = len(prompt) + params.max_tokens
        refused = state.limiter.admit(client, charge)
        if refused is not None:
            which, wait = refused
            limit = state.config.rate_limit_rpm if which == "requests" else state.config.rate_limit_tpm
            if math.isinf(wait):
                message = (f"this request needs {charge} tokens (prompt + max_tokens), more than this API key's limit "
                           f"of {limit:g} tokens per minute")
                retry = "60"
            else:
                message = f"rate limit reached for this API key: {limit:g} {which} per minute"
                retry = str(max(1, math.ceil(wait)))
            raise APIError(429, message, "rate_limit_error", code="rate_limit_exceeded", reason=f"rate_limit_{which}",
                           headers={"Retry-After": retry})
        request_id = protocol.new_id("chatcmpl" if self.chat else "cmpl")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        timeout = state.config.request_timeout_s or None
        try:
            state.scheduler.submit(request_id, prompt, params, sink, timeout_s=timeout)
        except QueueFull as exc:
            state.limiter.refund(client, charge)
            raise APIError(429, str(exc), "rate_limit_error", code="queue_full", reason="queue_full",
                           headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))}) from None
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_request") from None
        context = dict(request_id=request_id, client=client, prompt=len(prompt), charge=charge, started=started)
        model = req.model or state.config.model_name
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(events, context, model, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})
        return await self._collect(request, events, context, model)

    def _finish(self, context: dict, event: Event | None, status: int) -> None:
        """Refund unused tokens and write the request's log line."""
        completion = event.completion_tokens if event is not None else 0
        self.state.limiter.refund(context["client"], context["charge"] - context["prompt"] - completion)
        timings = (event.timings if event is not None else None) or {}
        record = {
            "event": "request", "id": context["request_id"], "client": context["client"], "endpoint": self.endpoint,
            "status": status, "prompt_tokens": context["prompt"], "completion_tokens": completion,
            "finish_reason": event.finish_reason if event is not None else "abort",
            "queue_s": _round(timings.get("queue_s")), "ttft_s": _round(timings.get("ttft_s")),
            "e2e_s": _round(time.monotonic() - context["started"]),
        }
        request_log.info(json.dumps(record))

    def _usage(self, event: Event) -> protocol.Usage:
        return protocol.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                              total_tokens=event.prompt_tokens + event.completion_tokens)

    async def _collect(self, request: Request, events: asyncio.Queue, context: dict, model: str) -> Response:
        parts: list[str] = []
        last: Event | None = None
        status = 499
        loop = asyncio.get_running_loop()
        checked = loop.time()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    event = None
                # Every quarter second, busy or not: has the client gone? Then its sequence leaves the batch.
                if loop.time() - checked >= 0.25:
                    checked = loop.time()
                    if await request.is_disconnected():
                        return Response(status_code=499)
                if event is None:
                    continue
                parts.append(event.text)
                if event.finish_reason is not None:
                    last = event
                    break
            status, response = self._final_response(last, "".join(parts), context, model)
            return response
        finally:
            if last is None:
                self.state.scheduler.cancel(context["request_id"])
            self._finish(context, last, status)

    def _final_response(self, event: Event, text: str, context: dict, model: str) -> tuple[int, Response]:
        reason = event.finish_reason
        if reason == "timeout":
            err = APIError(408, f"the request did not finish within {self.state.config.request_timeout_s:g} s",
                           "timeout_error", code="timeout")
            return 408, err.response()
        if reason == "abort":
            return 503, APIError(503, "the request was cancelled (server shutting down)", "service_unavailable",
                                 code="cancelled").response()
        if reason == "error":
            return 500, APIError(500, event.error or "internal error", "server_error", code="internal").response()
        usage = self._usage(event)
        build = protocol.chat_response if self.chat else protocol.completion_response
        return 200, JSONResponse(build(context["request_id"], model, text, reason, usage, int(time.time())))

    async def _stream(self, events: asyncio.Queue, context: dict, model: str, include_usage: bool) -> AsyncIterator[str]:
        rid, created = context["request_id"], int(time.time())
        last: Event | None = None
        try:
            if self.chat:
                yield _sse(protocol.chat_chunk(rid, model, created, {"role": "assistant", "content": ""},
                                               include_usage_field=include_usage))
            while True:
                event = await events.get()
                if event.finish_reason is not None:
                    last = event
                if event.finish_reason in ("timeout", "abort", "error"):
                    message = {"timeout": f"the request did not finish within {self.state.config.request_timeout_s:g} s",
                               "abort": "the request was cancelled (server shutting down)",
                               "error": event.error or "internal error"}[event.finish_reason]
                    yield _sse(protocol.error_body(message, "timeout_error" if event.finish_reason == "timeout"
                                                   else "server_error", code=event.finish_reason))
                    break
                if event.text or event.finish_reason is not None:
                    if self.chat:
                        delta = {"content": event.text} if event.text else {}
                        yield _sse(protocol.chat_chunk(rid, model, created, delta, event.finish_reason,
                                                       include_usage_field=include_usage))
                    else:
                        yield _sse(protocol.completion_chunk(rid, model, created, event.text, event.finish_reason,
                                                             include_usage_field=include_usage))
                if event.finish_reason is not None:
                    if include_usage:
                        chunk = protocol.chat_chunk if self.chat else protocol.completion_chunk
                        if self.chat:
                            yield _sse(chunk(rid, model, created, {}, usage=self._usage(event)))
                        else:
                            yield _sse(chunk(rid, model, created, "", usage=self._usage(event)))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if last is None:
                self.state.scheduler.cancel(rid)
            self._finish(context, last, 200)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class _CountResponses:
    """ASGI middleware: counts every HTTP response by endpoint and status in the metrics."""

    def __init__(self, app, metrics: ServingMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http(endpoint, message["status"])
            await send(message)

        return await self.app(scope, receive, counting_send)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application over ``state``; its lifespan starts and stops the scheduler thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.scheduler.start()
        logger.info("scheduler started: %d sequences, queue %d, chunk %d", state.config.max_batch_size,
                    state.config.max_queue, state.config.prefill_chunk)
        try:
            yield
        finally:
            state.draining = True
            await asyncio.to_thread(state.scheduler.shutdown, 10.0)
            logger.info("scheduler stopped")

    app = FastAPI(title="bitnet_torch OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.serving = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        state.metrics.rejected(exc.reason)
        record = {"event": "refused", "client": getattr(request.state, "client", None),
                  "endpoint": request.url.path, "status": exc.status, "reason": exc.reason, "message": exc.message}
        request_log.info(json.dumps(record))
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        state.metrics.rejected("invalid_request")
        return APIError(422, f"invalid request: {exc.errors()[:1]}", code="invalid_type").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        state.metrics.rejected("internal")
        return APIError(500, f"internal error: {type(exc).__name__}", "server_error", code="internal").response()

    chat = _Handler(state, chat=True)
    completion = _Handler(state, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(request)

    @app.get("/v1/models")
    async def models(request: Request):
        state.authenticate(request)
        return protocol.model_list(state.config.model_name, state.created)

    @app.get("/health")
    async def health():
        if state.scheduler.failure is not None and not state.scheduler.alive:
            return JSONResponse({"status": "scheduler stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state.draining or not state.scheduler.alive:
            return JSONResponse({"status": "draining" if state.draining else "not ready"}, status_code=503)
        return {"status": "ready", "running": state.scheduler.num_running, "waiting": state.scheduler.num_waiting}

    @app.get("/metrics")
    async def metrics():
        state.metrics.running.set(state.scheduler.num_running)
        state.metrics.waiting.set(state.scheduler.num_waiting)
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    if state.config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(state.config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(_CountResponses, metrics=state.metrics)
    return app
