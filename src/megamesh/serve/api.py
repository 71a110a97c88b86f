"""HTTP: the Anthropic Messages API and the OpenAI chat-completions API over one engine.

Routes: POST /v1/messages (plain and SSE streaming), POST /v1/messages/count_tokens,
GET /v1/models[/{id}], POST /v1/chat/completions (plain and streaming), GET /health,
GET /metrics (Prometheus). Reference: ../shared/reference/messages-api.md.

Every response carries a `request-id`; every error has the Anthropic shape
{"type": "error", "error": {"type", "message"}, "request_id"} with its status (the OpenAI
SDK reads the same `error.message`). Limits: a body-size cap (413), a per-key concurrency
cap (429), the engine's bounded queue (529 with retry-after) and the context (400).
Clients that disconnect are cancelled in the engine at once, freeing their slot.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from megamesh.serve.engine import Engine, Event, QueueFull, Sampling, TooLong
from megamesh.serve.text import merge_turns, render_chat

STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class Settings:
    api_keys: frozenset[str] = frozenset()  # empty: no authentication
    max_body_bytes: int = 32 * 1024 * 1024  # the Messages API's own cap
    max_concurrent_per_key: int = 256
    retry_after_s: int = 1


# ----------------------------------------------------------------------------- schemas

class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class AnthropicMessage(_Open):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(_Open):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    tools: list[Any] | None = None
    thinking: dict[str, Any] | None = None
    ignore_eos: bool = False  # extension (as vLLM's): generate max_tokens whatever the model says


class CountTokensRequest(_Open):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[Any] | None = None


class OpenAIMessage(_Open):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Open):
    model: str
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    tools: list[Any] | None = None
    ignore_eos: bool = False


def _validate(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "body"
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ApiError(400, f"{loc}: {err['msg']}{more}") from None


def _text_of(content: str | list[dict[str, Any]] | None, where: str) -> str:
    """The text of a message's content; any block other than text is refused (never dropped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            raise ApiError(400, f"{where}.content.{i}: content block type {kind!r} is not supported "
                                "by this server (text only)")
        text = block.get("text")
        if not isinstance(text, str):
            raise ApiError(400, f"{where}.content.{i}.text: must be a string")
        parts.append(text)
    return "".join(parts)


# ----------------------------------------------------------------------------- the app

@dataclass
class _Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = PromCounter("megamesh_http_requests", "HTTP requests by route and status",
                                    ["route", "status"], registry=r)
        self.prompt_tokens = PromCounter("megamesh_prompt_tokens", "prompt tokens admitted", registry=r)
        self.output_tokens = PromCounter("megamesh_output_tokens", "tokens generated", registry=r)
        self.queue = Gauge("megamesh_queue_depth", "requests waiting for a slot", registry=r)
        self.active = Gauge("megamesh_active_slots", "slots holding a request", registry=r)
        self.slots = Gauge("megamesh_slots", "decode slots (KV cache rows)", registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("megamesh_time_to_first_token_seconds", "TTFT", buckets=buckets, registry=r)
        self.tpot = Histogram("megamesh_time_per_output_token_seconds", "TPOT (after the first token)",
                              buckets=buckets, registry=r)
        self.e2e = Histogram("megamesh_request_latency_seconds", "end-to-end latency", buckets=buckets,
                             registry=r)


_ROUTES = {"/v1/messages", "/v1/messages/count_tokens", "/v1/models", "/v1/chat/completions",
           "/health", "/metrics"}


class _RequestIdMiddleware:
    """Pure ASGI: a request-id on every response (errors and streams included), and the
    request counter by route and status."""

    def __init__(self, app: Any, metrics: _Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = "req_" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = rid
        path = scope.get("path", "")
        route = path if path in _ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/")
                                              else "other")

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"request-id", rid.encode())]
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, send_with_id)


def _error_response(request: Request, status: int, message: str,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    rid = request.scope.get("state", {}).get("request_id", "")
    body = {"type": "error", "error": {"type": STATUS_TYPES.get(status, "api_error"), "message": message},
            "request_id": rid}
    return JSONResponse(body, status_code=status, headers=headers)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass
class _Stream:
    """One request's engine events for a streamed response, with what the metrics need:
    the time of the first text and the tokens generated so far."""

    queue: asyncio.Queue
    t_first: float | None = None
    n_out: int = 0

    async def events(self):
        """Engine events up to and including the last (done) one."""
        while True:
            ev = await self.queue.get()
            self.n_out = ev.output_tokens
            if ev.text and self.t_first is None:
                self.t_first = time.perf_counter()
            yield ev
            if ev.done:
                return


def create_app(engine: Engine, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    model = engine.model
    tok = model.tokenizer
    metrics = _Metrics()
    metrics.queue.set_function(lambda: engine.waiting)
    metrics.active.set_function(lambda: engine.active)
    metrics.slots.set(engine.slots)
    in_flight: Counter[str] = Counter()
    app = FastAPI(title="megamesh", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_RequestIdMiddleware, metrics=metrics)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error_response(request, e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"{request.method} {request.url.path}: no such route",
               405: f"{request.method} is not allowed on {request.url.path}"}
        msg = msg.get(e.status_code, str(e.detail))
        return _error_response(request, e.status_code, msg)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        engine.log(f"internal error on {request.url.path}: {type(e).__name__}: {e}")
        return _error_response(request, 500, "internal server error")

    # ------------------------------------------------------------------ helpers

    def authorize(request: Request) -> str:
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if key is None and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if settings.api_keys:
            if not key:
                raise ApiError(401, "missing API key: send it in the x-api-key header")
            if key not in settings.api_keys:
                raise ApiError(401, "invalid x-api-key")
        return key or "anonymous"

    async def read_json(request: Request) -> Any:
        limit = settings.max_body_bytes
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            raise ApiError(413, f"request body of {int(cl):,} bytes exceeds the limit of {limit:,} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit:,} bytes")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from None

    def check_model(name: str) -> None:
        if name != model.name:
            raise ApiError(404, f"model: {name!r} is not served here; this server serves {model.name!r}")

    def anthropic_prompt(req: MessagesRequest | CountTokensRequest) -> list[int]:
        if req.tools:
            raise ApiError(400, "tools: tool use is not supported by this server")
        system = req.system
        if isinstance(system, list):
            system = _text_of(system, "system")
        turns = [(m.role, _text_of(m.content, f"messages.{i}")) for i, m in enumerate(req.messages)]
        return tok.encode(render_chat(system, merge_turns(turns)), add_special_tokens=False).ids

    def start(prompt: list[int], sampling: Sampling, key: str) -> tuple[Any, asyncio.Queue, float]:
        """Admit into the engine; events arrive on the returned asyncio queue."""
        try:
            engine.check(len(prompt), sampling.max_tokens)
        except TooLong as e:
            raise ApiError(400, str(e)) from None
        if in_flight[key] >= settings.max_concurrent_per_key:
            raise ApiError(429, f"too many concurrent requests for this API key (the limit is "
                                f"{settings.max_concurrent_per_key}); retry later",
                           {"retry-after": str(settings.retry_after_s)})
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        t0 = time.perf_counter()
        try:
            handle = engine.submit(prompt, sampling,
                                   lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        except QueueFull as e:
            raise ApiError(529, str(e), {"retry-after": str(settings.retry_after_s)}) from None
        in_flight[key] += 1
        metrics.prompt_tokens.inc(len(prompt))
        return handle, queue, t0

    def finished(key: str, t0: float, t_first: float | None, n_out: int) -> None:
        in_flight[key] -= 1
        if in_flight[key] <= 0:
            del in_flight[key]
        t1 = time.perf_counter()
        metrics.output_tokens.inc(n_out)
        metrics.e2e.observe(t1 - t0)
        if t_first is not None:
            metrics.ttft.observe(t_first - t0)
            if n_out > 1:
                metrics.tpot.observe((t1 - t_first) / (n_out - 1))

    async def collect(request: Request, handle: Any, queue: asyncio.Queue) -> tuple[str, Event, float | None]:
        """Wait for a whole non-streamed answer, cancelling it if the client goes away."""
        text, t_first = [], None
        while True:
            try:
                ev = await asyncio.wait_for(queue.get(), timeout=0.25)
            except TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(handle)
                    raise ApiError(400, "client disconnected") from None
                continue
            if t_first is None and (ev.text or ev.output_tokens):
                t_first = time.perf_counter()
            text.append(ev.text)
            if ev.done:
                return "".join(text), ev, t_first

    async def plain(request: Request, handle: Any, queue: asyncio.Queue, key: str,
                    t0: float) -> tuple[str, Event]:
        ev, t_first = None, None
        try:
            text, ev, t_first = await collect(request, handle, queue)
            return text, ev
        finally:
            engine.cancel(handle)
            finished(key, t0, t_first, ev.output_tokens if ev is not None else 0)

    # ------------------------------------------------------------------ Anthropic

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        key = authorize(request)
        req = _validate(MessagesRequest, await read_json(request))
        check_model(req.model)
        if req.thinking and req.thinking.get("type") not in (None, "disabled"):
            raise ApiError(400, "thinking: extended thinking is not supported by this server")
        prompt = anthropic_prompt(req)
        sampling = Sampling(max_tokens=req.max_tokens,
                            temperature=1.0 if req.temperature is None else req.temperature,
                            top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p,
                            stop=tuple(req.stop_sequences or ()), ignore_eos=req.ignore_eos)
        handle, queue, t0 = start(prompt, sampling, key)
        msg_id = "msg_" + secrets.token_hex(12)
        usage_in = len(prompt)

        if not req.stream:
            text, ev = await plain(request, handle, queue, key, t0)
            if ev.stop_reason in ("error", "cancelled"):
                raise ApiError(500, f"generation failed: {ev.error or ev.stop_reason}")
            return JSONResponse({
                "id": msg_id, "type": "message", "role": "assistant", "model": model.name,
                "content": [{"type": "text", "text": text}], "stop_reason": ev.stop_reason,
                "stop_sequence": ev.stop_sequence,
                "usage": {"input_tokens": usage_in, "output_tokens": ev.output_tokens}})

        async def events():
            st = _Stream(queue)
            try:
                yield _sse("message_start", {"type": "message_start", "message": {
                    "id": msg_id, "type": "message", "role": "assistant", "model": model.name,
                    "content": [], "stop_reason": None, "stop_sequence": None,
                    "usage": {"input_tokens": usage_in, "output_tokens": 0}}})
                yield _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                                   "content_block": {"type": "text", "text": ""}})
                yield _sse("ping", {"type": "ping"})
                async for ev in st.events():
                    if ev.text:
                        yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                           "delta": {"type": "text_delta", "text": ev.text}})
                if ev.stop_reason in ("error", "cancelled"):
                    yield _sse("error", {"type": "error", "error": {
                        "type": "api_error", "message": f"generation failed: {ev.error or ev.stop_reason}"}})
                    return
                yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
                yield _sse("message_delta", {"type": "message_delta",
                                             "delta": {"stop_reason": ev.stop_reason,
                                                       "stop_sequence": ev.stop_sequence},
                                             "usage": {"input_tokens": usage_in, "output_tokens": st.n_out}})
                yield _sse("message_stop", {"type": "message_stop"})
            finally:
                engine.cancel(handle)  # a no-op when done; frees the slot when the client left
                finished(key, t0, st.t_first, st.n_out)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "connection": "close"})

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        authorize(request)
        req = _validate(CountTokensRequest, await read_json(request))
        check_model(req.model)
        return JSONResponse({"input_tokens": len(anthropic_prompt(req))})

    # ------------------------------------------------------------------ models, health, metrics

    def model_object() -> dict[str, Any]:
        return {"id": model.name, "object": "model", "type": "model", "display_name": model.name,
                "created": model.created,
                "created_at": datetime.fromtimestamp(model.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "owned_by": "megamesh", "max_input_tokens": engine.max_len - 1,
                "max_tokens": engine.max_len - 1}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_object()], "has_more": False,
                             "first_id": model.name, "last_id": model.name})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str) -> Response:
        authorize(request)
        check_model(model_id)
        return JSONResponse(model_object())

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok", "model": model.name, "slots": engine.slots,
                             "active_slots": engine.active, "queue_depth": engine.waiting,
                             "max_len": engine.max_len,
                             # smaller decode batches still compiling in the background
                             "compiling": not engine.compiled_all.is_set()})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ OpenAI

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        key = authorize(request)
        req = _validate(ChatRequest, await read_json(request))
        check_model(req.model)
        if req.n != 1:
            raise ApiError(400, f"n: {req.n} is not supported (only n=1)")
        if req.tools:
            raise ApiError(400, "tools: tool use is not supported by this server")
        system, turns = [], []
        for i, m in enumerate(req.messages):
            text = _text_of(m.content, f"messages.{i}")
            if m.role in ("system", "developer"):
                system.append(text)
            else:
                turns.append((m.role, text))
        prompt = tok.encode(render_chat("\n\n".join(system) or None, merge_turns(turns)),
                            add_special_tokens=False).ids
        max_tokens = req.max_completion_tokens or req.max_tokens or max(engine.max_len - len(prompt), 1)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        sampling = Sampling(max_tokens=max_tokens,
                            temperature=1.0 if req.temperature is None else req.temperature,
                            top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p,
                            seed=req.seed, stop=stop, ignore_eos=req.ignore_eos)
        handle, queue, t0 = start(prompt, sampling, key)
        cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
        finish = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}

        def usage(n_out: int) -> dict[str, int]:
            return {"prompt_tokens": len(prompt), "completion_tokens": n_out,
                    "total_tokens": len(prompt) + n_out}

        if not req.stream:
            text, ev = await plain(request, handle, queue, key, t0)
            if ev.stop_reason in ("error", "cancelled"):
                raise ApiError(500, f"generation failed: {ev.error or ev.stop_reason}")
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": model.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish[ev.stop_reason], "logprobs": None}],
                "usage": usage(ev.output_tokens)})

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], reason: str | None) -> bytes:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}
            return f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()

        async def events():
            st = _Stream(queue)
            try:
                yield chunk({"role": "assistant", "content": ""}, None)
                async for ev in st.events():
                    if ev.text:
                        yield chunk({"content": ev.text}, None)
                if ev.stop_reason in ("error", "cancelled"):
                    err = {"error": {"type": "api_error", "message": f"generation failed: {ev.error}"}}
                    yield f"data: {json.dumps(err)}\n\n".encode()
                    return
                yield chunk({}, finish[ev.stop_reason])
                if include_usage:
                    body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": model.name, "choices": [], "usage": usage(st.n_out)}
                    yield f"data: {json.dumps(body, separators=(',', ':'))}\n\n".encode()
                yield b"data: [DONE]\n\n"
            finally:
                engine.cancel(handle)
                finished(key, t0, st.t_first, st.n_out)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    return app
