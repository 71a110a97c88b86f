"""The request core both protocol adapters (`serve.anthropic`, `serve.openai`) stand on.

Everything about an HTTP request that is not its protocol's shape lives here, once:
authentication (x-api-key or Authorization: Bearer), the body-size cap (413), JSON and
schema validation (400 naming the field), the model check (404), admission into the
engine with the per-key concurrency cap (429) and the engine's bounded queue (529 with
retry-after), cancel-on-disconnect, Prometheus metrics and request ids.

Every response carries a `request-id`; every error has the Anthropic shape
{"type": "error", "error": {"type", "message"}, "request_id"} with its status (the OpenAI
SDK reads the same `error.message`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter
from pydantic import BaseModel, ConfigDict, FailFast, ValidationError, model_validator
from pydantic_core import PydanticCustomError
from starlette.requests import ClientDisconnect

from megamesh.serve import tools as tool_mod
from megamesh.serve.engine import BadGrammar, Engine, Event, QueueFull, SamplingParams, TooLong
from megamesh.serve.text import merge_turns, render_chat

INT32_MAX = 2**31 - 1  # the engine's per-row sampling parameters are int32 on the device
MAX_JSON_DEPTH = 64  # deeper request bodies are refused (a chat request nests ~5 levels)

STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "overloaded_error", 529: "overloaded_error"}
CLIENT_CLOSED = 499  # nginx's code for a client that went away before its answer: not a 5xx


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class ClientClosed(Exception):
    """The client closed its connection before its answer (mid-body, or while waiting):
    counted as status 499, never logged or counted as a server error."""


def clip(value: Any, limit: int = 80, quote: bool = True) -> str:
    """`repr(value)` (or `str` when not `quote`) for an error message, cut to about `limit`
    characters: an error never echoes a client's 100 KB model id back at it."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


@dataclass
class Settings:
    api_keys: frozenset[str] = frozenset()  # empty: no authentication
    max_body_bytes: int = 32 * 1024 * 1024  # the Messages API's own cap
    max_concurrent_per_key: int = 256
    retry_after_s: int = 1
    input_tokens_per_minute: int = 0  # per API key (0: no limit)
    output_tokens_per_minute: int = 0  # per API key (0: no limit); max_tokens is reserved
    cache_min_tokens: int = 1024  # the shortest prefix prompt caching writes (Claude Sonnet's)
    batch_db: str | None = None  # Message Batches' SQLite file (None: in memory, lost at exit)
    batch_concurrency: int = 0  # batch requests in the engine at once (0: its slots)
    aliases: tuple[str, ...] = ()  # more model ids this model answers to
    any_model: bool = False  # answer whatever model id a request names (a proxy's backend)
    max_output_tokens: int = 0  # the operator's cap on any request's output (0: none)
    # an anthropic-beta value not in anthropic.BETAS: "reject" (a 400, as the Messages API
    # answers an unknown beta) or "ignore" (counted and logged once: for a client that
    # sends betas newer than this server)
    unknown_betas: str = "reject"


class TokenBucket:
    """Tokens per minute as the Messages API's rate limits count them: a bucket of `limit`
    tokens refilled continuously at limit/60 per second (`limit` 0: no limit)."""

    def __init__(self, limit: int, now: float):
        self.limit, self.rate = limit, limit / 60.0
        self.level, self.t = float(limit), now

    def _refill(self, now: float) -> None:
        self.level = min(self.limit, self.level + (now - self.t) * self.rate)
        self.t = now

    def wait_for(self, n: int, now: float) -> float:
        """Seconds until `n` tokens are there (0: now)."""
        if not self.limit:
            return 0.0
        self._refill(now)
        return max(0.0, (n - self.level) / self.rate)

    def take(self, n: int) -> None:
        self.level -= n

    def give(self, n: int) -> None:
        self.level = min(self.limit, self.level + n)


class _FailFast(FailFast):
    """pydantic's FailFast, hashable: Python 3.11's Union hashes its members' metadata."""

    def __hash__(self) -> int:
        return hash(type(self))


FAIL_FAST = _FailFast()  # Annotated[list[...], FAIL_FAST]: the first bad item, not 500,000


class OpenSchema(BaseModel):
    """Request schemas: a field this server does not implement is refused (400 naming it),
    never silently ignored; fields it accepts but cannot honour in every value are
    declared and checked by the route.

    Validation stops at the first problem, as the Messages API reports one: unknown fields
    are found with one set difference before any field is validated (pydantic's own
    `extra="forbid"` would build one error per key: 500,000 keys took ~6 s of the event
    loop), and list fields are declared FAIL_FAST."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known_fields_only(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = data.keys() - cls.model_fields.keys()
            if unknown:
                raise PydanticCustomError("unknown_field", "unknown field {field}",
                                          {"field": min(unknown, key=str), "count": len(unknown)})
        return data


UNSUPPORTED = "is not supported by this server (it would be ignored, so it is refused)"


def text_of(content: str | list[dict[str, Any]] | None, where: str) -> str:
    """The text of a message's content (a string, or text blocks); any other block, or a
    field of a text block this server does not implement, is refused (never dropped).
    The Messages API's cache_control and tool blocks: `serve.anthropic_content`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(text_block(block, f"{where}.content.{i}") for i, block in enumerate(content))


def text_block(block: Any, where: str, also: frozenset[str] = frozenset()) -> str:
    """The text of one content block `where`, which must be a text block with no field but
    type, text and `also` (400 naming what is not)."""
    kind = block.get("type") if isinstance(block, dict) else None
    if kind != "text":
        raise ApiError(400, f"{where}: content block type {clip(kind)} is not supported by this "
                            "server (text only)")
    extra = sorted(set(block) - {"type", "text"} - also, key=str)
    if extra:
        what = {"cache_control": "prompt caching"}.get(extra[0], clip(extra[0], quote=False))
        raise ApiError(400, f"{where}.{clip(extra[0], quote=False)}: {what} {UNSUPPORTED}")
    text = block.get("text")
    if not isinstance(text, str):
        raise ApiError(400, f"{where}.text: must be a string")
    return text


@dataclass
class Prompt:
    """A tokenized prompt and its marks (the Messages API's cache breakpoints): (prefix
    length in tokens, label) in order, each the tokens wholly before its offset in the text."""

    ids: list[int]
    breakpoints: list[tuple[int, str]] = field(default_factory=list)
    # the context management edits applied to it (serve.context_edits), when asked for
    edits: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self.ids)


def check_json(data: Any) -> None:
    """Refuse what JSON allows but no text model can take: nesting deeper than
    MAX_JSON_DEPTH and strings holding a lone UTF-16 surrogate ("\\ud800"), which no
    tokenizer can encode. 400 naming where."""
    stack: list[tuple[Any, str, int]] = [(data, "body", 0)]
    while stack:
        x, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{where}: the string holds a lone UTF-16 surrogate (not "
                                    "valid Unicode text)") from None
        elif isinstance(x, dict):
            for k, v in x.items():
                stack.append((k, f"{where} key", depth + 1))
                stack.append((v, f"{where}.{k}" if where != "body" else str(k), depth + 1))
        elif isinstance(x, list):
            stack.extend((v, f"{where}.{i}", depth + 1) for i, v in enumerate(x))


def longest_token_bytes(tokenizer: Any) -> int:
    """The most UTF-8 bytes one token of `tokenizer` stands for (at least 1)."""
    ids = range(tokenizer.get_vocab_size())
    return max([1, *(len(tokenizer.decode([i], skip_special_tokens=False).encode("utf-8"))
                     for i in ids)])


def error_response(request: Request, status: int, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return _error(request.scope, status, message, headers)


def _error(scope: Any, status: int, message: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    """The error shape of every API error, with the request's id."""
    rid = scope.get("state", {}).get("request_id", "")
    body = {"type": "error", "error": {"type": STATUS_TYPES.get(status, "api_error"), "message": message},
            "request_id": rid}
    return JSONResponse(body, status_code=status, headers=headers)


def sse_json(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = PromCounter("megamesh_http_requests", "HTTP requests by route and status",
                                    ["route", "status"], registry=r)
        self.prompt_tokens = PromCounter("megamesh_prompt_tokens", "prompt tokens admitted", registry=r)
        self.output_tokens = PromCounter("megamesh_output_tokens", "tokens generated", registry=r)
        self.queue = Gauge("megamesh_queue_depth", "requests waiting for a slot", registry=r)
        self.active = Gauge("megamesh_active_slots", "slots holding a request", registry=r)
        self.slots = Gauge("megamesh_slots", "decode slots (rows of the decode batch)", registry=r)
        self.kv_pages = Gauge("megamesh_kv_pages", "KV cache pages", registry=r)
        self.kv_pages_used = Gauge("megamesh_kv_pages_used", "KV cache pages held by requests",
                                   registry=r)
        self.preempted = Gauge("megamesh_preempted", "requests preempted for KV pages so far "
                               "(recomputed when readmitted)", registry=r)
        self.prefix_hits = Gauge("megamesh_prefix_cache_hit_tokens", "prompt tokens read from "
                                 "cached KV pages instead of prefilled, so far", registry=r)
        self.step_seconds = Gauge("megamesh_engine_seconds", "seconds the engine spent in "
                                  "prefill and decode steps so far", ["phase"], registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("megamesh_time_to_first_token_seconds", "TTFT", buckets=buckets, registry=r)
        self.tpot = Histogram("megamesh_time_per_output_token_seconds", "TPOT (after the first token)",
                              buckets=buckets, registry=r)
        self.rate_limited = PromCounter("megamesh_rate_limited", "requests refused by a tokens-per-"
                                        "minute limit", registry=r)
        self.e2e = Histogram("megamesh_request_latency_seconds", "end-to-end latency", buckets=buckets,
                             registry=r)
        self.connections = Gauge("megamesh_http_connections", "open HTTP connections", registry=r)
        self.unknown_betas = PromCounter("megamesh_unknown_betas", "anthropic-beta values this "
                                         "server does not know (ignored)", registry=r)
        self.tool_input_invalid = PromCounter(
            "megamesh_tool_input_invalid", "tool calls whose input breaks a schema keyword the "
            "grammar engine could not enforce (returned as generated)", registry=r)
        self.connections_closed = PromCounter(
            "megamesh_http_connections_closed", "connections this server closed before a whole "
            "request, by reason (header_timeout, body_timeout, bad_request, over_cap, "
            "evicted_waiting, idle_evicted)", ["reason"], registry=r)
        # The gauges an inference gateway's endpoint picker reads (the Gateway API Inference
        # Extension's model-server protocol; the names are vLLM's, which the picker reads by
        # default) and an autoscaler can scale on: megamesh_queue_depth, _active_slots and
        # _kv_pages_used under the protocol's names
        self.epp_waiting = Gauge("vllm:num_requests_waiting", "TotalQueuedRequests: requests "
                                 "waiting for a slot", registry=r)
        self.epp_running = Gauge("vllm:num_requests_running", "TotalRunningRequests: requests "
                                 "holding a slot", registry=r)
        self.epp_kv = Gauge("vllm:kv_cache_usage_perc", "KVCacheUtilization: the fraction of KV "
                            "cache pages held by requests (0-1)", registry=r)
        self.epp_cache = Gauge("vllm:cache_config_info", "BlockSize and NumGPUBlocks: positions "
                               "per KV page and pages, as labels", ["block_size", "num_gpu_blocks"],
                               registry=r)
        self.epp_lora = Gauge("vllm:lora_requests_info", "LoRA adapters (this server has none: "
                              "max_lora 0); the value is when it was read", ["max_lora",
                              "running_lora_adapters", "waiting_lora_adapters"], registry=r)


ROUTES = {"/v1/messages", "/v1/messages/count_tokens", "/v1/models", "/v1/chat/completions",
          "/health", "/health/live", "/metrics", "/v1/messages/batches"}


def route_of(path: str) -> str:
    """The metrics label of a request path (a fixed set: paths are client input)."""
    return (path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/")
            else "/v1/messages/batches/{id}" if path.startswith("/v1/messages/batches/")
            else "other")


class RequestIdMiddleware:
    """Pure ASGI: a request-id on every response (errors and streams included), and the
    request counter by route and status. It is the app's outermost layer of its own, so an
    exception nothing else handled becomes a 500 here, with its request-id and counted
    (Starlette's own last-resort 500 is sent outside every middleware: neither). A client
    that left before its answer is counted as 499, not logged. HEAD is answered wherever
    GET is (the server sends the headers only)."""

    def __init__(self, app: Any, metrics: Metrics, log: Any = print):
        self.app, self.metrics, self.log = app, metrics, log

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = "req_" + secrets.token_hex(12)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        path = scope.get("path", "")
        route = route_of(path)
        if scope["method"] == "HEAD":  # routed as GET; the HTTP layer drops the body
            scope = {**scope, "method": "GET"}

        started = False

        async def send_with_id(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"request-id", rid.encode())]
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        names = {k for k, _ in scope.get("headers", ())}
        if b"content-length" in names and b"transfer-encoding" in names:
            # ambiguous framing (request smuggling's tool): refused, and the connection closed
            await _error(scope, 400, "the request has both Content-Length and Transfer-Encoding; "
                                     "send one", {"connection": "close"})(scope, receive, send_with_id)
            return
        try:
            await self.app(scope, receive, send_with_id)
        except (ClientClosed, ClientDisconnect):
            # the client went away (or the HTTP layer answered it: a timeout, a bad chunk)
            if not started and not state.get("answered_by_http_layer"):
                self.metrics.requests.labels(route, str(CLIENT_CLOSED)).inc()
        except Exception as e:  # noqa: BLE001 -- what no handler caught: a 500 like any other
            self.log(f"internal error on {clip(path, quote=False)}: {type(e).__name__}: {e}")
            if started:  # the response is under way: all that is left is to end it
                return
            await _error(scope, 500, "internal server error")(scope, receive, send_with_id)


@dataclass(eq=False)
class Generation:
    """One admitted request: its engine events and what the metrics need. Close it when
    the response ends (`Core.finish`): that cancels it in the engine if still running."""

    handle: Any
    queue: asyncio.Queue
    key: str
    prompt: Prompt
    t0: float
    t_first: float | None = None
    n_out: int = 0
    finished: bool = False
    reserved: int = 0  # output tokens taken from the key's per-minute bucket at admission
    cached_tokens: int | None = None  # prompt tokens whose KV the engine reused (once admitted)
    pending: list[Event] = field(default_factory=list)  # read by `admitted`, not yet by `events`
    background: bool = False  # a Message Batches request (no interactive limits, metrics)
    aborted: str | None = None  # why the server ended it (shutting down), if it did
    tools: list = field(default_factory=list)  # the tools it may call (their input is checked)
    text: list[str] = field(default_factory=list)  # its output so far (when it may call tools)
    logprobs: list = field(default_factory=list)  # every event's Event.logprobs, in order

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    async def admitted(self) -> list[Event]:
        """Wait until the engine has admitted the request (it says how much of the prompt
        it found cached) or ended it; returns the events read meanwhile."""
        while self.cached_tokens is None and not (self.pending and self.pending[-1].done):
            self.pending.append(self.note(await self.queue.get()))
        return self.pending

    def note(self, ev: Event) -> Event:
        if self.tools and ev.text:
            self.text.append(ev.text)
        if ev.logprobs:
            self.logprobs.extend(ev.logprobs)
        if ev.cached_tokens is not None and self.cached_tokens is None:
            self.cached_tokens = ev.cached_tokens
        self.n_out = ev.output_tokens
        if (ev.text or ev.output_tokens) and self.t_first is None:
            self.t_first = time.perf_counter()
        return ev

    async def events(self):
        """Engine events up to and including the last (done) one."""
        while True:
            ev = self.pending.pop(0) if self.pending else self.note(await self.queue.get())
            yield ev
            if ev.done:
                return


class Core:
    """The protocol-independent half of every route."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine, self.settings = engine, settings
        self.model = engine.model
        self.metrics = Metrics()
        self.metrics.queue.set_function(lambda: engine.waiting)
        self.metrics.active.set_function(lambda: engine.active)
        self.metrics.slots.set(engine.slots)
        self.metrics.kv_pages.set(engine.kv_pages)
        self.metrics.kv_pages_used.set_function(lambda: engine.pages_used)
        self.metrics.preempted.set_function(lambda: engine.stats["preempted"])
        self.metrics.prefix_hits.set_function(lambda: engine.stats["prefix_hit_tokens"])
        self.metrics.epp_waiting.set_function(lambda: engine.waiting)
        self.metrics.epp_running.set_function(lambda: engine.active)
        self.metrics.epp_kv.set_function(lambda: engine.pages_used / engine.kv_pages)
        self.metrics.epp_cache.labels(str(engine.page_size), str(engine.kv_pages)).set(1)
        self.metrics.epp_lora.labels("0", "", "").set_function(time.time)
        for phase in ("prefill", "decode"):
            self.metrics.step_seconds.labels(phase).set_function(
                lambda p=phase: engine.stats[f"{p}_seconds"])
        self.in_flight: Counter[str] = Counter()
        self.live: set[Generation] = set()  # admitted, response not yet over (batch work too)
        self.draining = False  # shutting down: new work is refused, /health is not ready
        # a host of this (multi-host) server is gone: why; nothing is served any more
        self.failed: str | None = None
        self.buckets: dict[str, tuple[TokenBucket, TokenBucket]] = {}  # key -> (input, output)
        self.max_token_bytes = longest_token_bytes(self.model.tokenizer)
        self.max_prompt_bytes = engine.max_len * self.max_token_bytes

    # ------------------------------------------------------------------ the request

    def authorize(self, request: Request) -> str:
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if key is None and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if self.settings.api_keys:
            if not key:
                raise ApiError(401, "missing API key: send it in the x-api-key header")
            if key not in self.settings.api_keys:
                raise ApiError(401, "invalid x-api-key")
        return key or "anonymous"

    async def read_body(self, request: Request) -> bytes:
        """The request body, within the size limit (413); a client that leaves mid-body is
        `ClientClosed`, not an error of this server."""
        limit = self.settings.max_body_bytes
        cl = request.headers.get("content-length")
        if cl is not None and cl.isdigit() and int(cl) > limit:
            raise ApiError(413, f"request body of {int(cl):,} bytes exceeds the limit of {limit:,} bytes")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"request body exceeds the limit of {limit:,} bytes")
        except ClientDisconnect:
            raise ClientClosed() from None
        return bytes(body)

    @staticmethod
    def decode(body: bytes, schema: type[BaseModel] | None = None) -> Any:
        """JSON text -> checked data (-> a validated `schema`): 400 naming the first problem.
        CPU-bound on a large body: run it off the event loop (`parse` does)."""
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
        check_json(data)
        return data if schema is None else Core.validate(schema, data)

    async def read_json(self, request: Request) -> Any:
        """The body as checked JSON, parsed in a worker thread."""
        return await asyncio.to_thread(self.decode, await self.read_body(request))

    @staticmethod
    def validate(schema: type[BaseModel], data: Any) -> Any:
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            n = e.error_count()
            err = e.errors(include_url=False, include_input=False)[0]  # fail-fast: few
            loc = ".".join(str(x) for x in err["loc"])
            if err["type"] == "unknown_field":
                ctx = err["ctx"]
                loc = ".".join(x for x in (loc, str(ctx["field"])) if x)
                n += ctx["count"] - 1
            more = f" (and {n - 1} more)" if n > 1 else ""
            unsupported = err["type"] in ("unknown_field", "extra_forbidden")
            msg = f"this field {UNSUPPORTED}" if unsupported else err["msg"]
            raise ApiError(400, f"{clip(loc, 200, quote=False) or 'body'}: {msg}{more}") from None

    @property
    def model_ids(self) -> list[str]:
        """The ids this server answers to: the model's name, then its aliases."""
        return [self.model.name, *(a for a in self.settings.aliases if a != self.model.name)]

    def check_model(self, name: str) -> None:
        """404 unless `name` is an id served here (any, with `any_model`); responses
        name the model by the id the request used."""
        if self.settings.any_model or name in self.model_ids:
            return
        ids = ", ".join(repr(i) for i in self.model_ids)
        raise ApiError(404, f"model: {clip(name)} is not served here; this server serves {ids}")

    async def parse(self, request: Request, schema: type[BaseModel]) -> tuple[str, Any]:
        """The preamble of every model route: (API key, validated body for this model).
        Parsing and validating run in a worker thread: a large body never holds the event
        loop (every stream, /health) for more than a GIL switch interval."""
        key = self.authorize(request)
        self.refuse_if_draining()
        req = await asyncio.to_thread(self.decode, await self.read_body(request), schema)
        self.check_model(req.model)
        return key, req

    async def encode_chat(self, system: str | None, turns: list[tuple[str, str]]) -> Prompt:
        """Token ids of a chat (consecutive same-role turns merged) in the model's template."""
        return await self.encode(render_chat(system, merge_turns(turns)))

    async def encode(self, text: str, marks: list[tuple[int, str]] = ()) -> Prompt:
        """Token ids of `text`, with each mark (a character offset, and a label: a cache
        breakpoint's ttl) turned into the count of tokens wholly before it. A prompt with
        more bytes than the context could hold at the tokenizer's longest token is refused
        before tokenizing (400); the tokenizer runs in a worker thread, so a long prompt
        never stalls the event loop (every other stream, /health)."""
        n_bytes = len(text.encode("utf-8"))
        if n_bytes > self.max_prompt_bytes:
            least = -(-n_bytes // self.max_token_bytes)
            raise ApiError(400, f"prompt is too long: {n_bytes:,} bytes are at least {least:,} "
                                f"tokens (no token of this model is longer than "
                                f"{self.max_token_bytes} bytes), more than the context of "
                                f"{self.engine.max_len:,} tokens")
        enc = await asyncio.to_thread(self.model.tokenizer.encode, text, add_special_tokens=False)
        ends = [end for _, end in enc.offsets]  # a token is before a mark if it ends there
        return Prompt(enc.ids, [(sum(1 for e in ends if e <= at), label) for at, label in marks])

    # ------------------------------------------------------------------ generation

    def start(self, prompt: Prompt, sampling: SamplingParams, key: str, *,
              background: bool = False, fit_window: bool = False,
              tools: list | None = None) -> Generation:
        """Admit into the engine; events arrive on the generation's asyncio queue.
        `background` (Message Batches): at the engine's lower priority, as tenant
        "batch:<key>", outside the key's interactive concurrency and token-rate limits.
        `fit_window` (the Messages API): a prompt that fits with a max_tokens that does not
        is accepted, its output cut at the context window (stop_reason
        model_context_window_exceeded); a prompt that does not fit is the API's 400.
        `tools`: those the answer may call (a finished call's input is checked on `finish`)."""
        self.refuse_if_draining()
        cap = self.settings.max_output_tokens
        if cap and sampling.max_tokens > cap:  # the operator's policy: ends as max_tokens
            sampling = dataclasses.replace(sampling, max_tokens=cap)
        if fit_window:
            limit = self.engine.max_len - 1  # at least one position to generate into
            if len(prompt) > limit:
                raise ApiError(400, f"prompt is too long: {len(prompt)} tokens > {limit} maximum")
            if len(prompt) + sampling.max_tokens > self.engine.max_len:
                sampling = dataclasses.replace(sampling, window_limited=True,
                                               max_tokens=self.engine.max_len - len(prompt))
        try:
            self.engine.check(len(prompt), sampling.max_tokens)
        except TooLong as e:
            raise ApiError(400, str(e)) from None
        s = self.settings
        reserve = 0
        if not background:
            if self.in_flight[key] >= s.max_concurrent_per_key:
                raise ApiError(429, f"too many concurrent requests for this API key (the limit is "
                                    f"{s.max_concurrent_per_key}); retry later",
                               {"retry-after": str(s.retry_after_s)})
            reserve = self._check_token_rates(key, len(prompt), sampling.max_tokens)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        t0 = time.perf_counter()
        try:
            handle = self.engine.submit(prompt.ids, sampling,
                                        lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev),
                                        tenant="batch:" + key if background else key,
                                        priority=1 if background else 0)
        except QueueFull as e:
            raise ApiError(529, str(e), {"retry-after": str(s.retry_after_s)}) from None
        except BadGrammar as e:
            raise ApiError(400, str(e)) from None
        self.metrics.prompt_tokens.inc(len(prompt))
        if background:
            gen = Generation(handle, queue, key, prompt, t0, background=True, tools=tools or [])
        else:
            self.in_flight[key] += 1
            buckets = self.buckets.get(key)
            if buckets:
                buckets[0].take(len(prompt))
                buckets[1].take(reserve)
            gen = Generation(handle, queue, key, prompt, t0, reserved=reserve, tools=tools or [])
        self.live.add(gen)
        return gen

    def _buckets_of(self, key: str, now: float) -> tuple[TokenBucket, TokenBucket]:
        s = self.settings
        if key not in self.buckets:
            self.buckets[key] = (TokenBucket(s.input_tokens_per_minute, now),
                                 TokenBucket(s.output_tokens_per_minute, now))
        return self.buckets[key]

    def rate_limit_headers(self, key: str) -> dict[str, str]:
        """The Messages API's `anthropic-ratelimit-*` headers for this key's budgets (none
        without --input-tpm/--output-tpm): per limited kind its limit, what remains now,
        and when the bucket is full again (RFC 3339); `tokens-*` repeats the most
        restrictive of the two, as the API does."""
        s = self.settings
        if not (s.input_tokens_per_minute or s.output_tokens_per_minute):
            return {}
        now, wall = time.monotonic(), time.time()
        out: dict[str, str] = {}
        tightest: tuple[float, dict[str, str]] | None = None
        for kind, bucket in zip(("input-tokens", "output-tokens"), self._buckets_of(key, now)):
            if not bucket.limit:
                continue
            bucket._refill(now)
            full_at = wall + (bucket.limit - bucket.level) / bucket.rate
            values = {"limit": str(bucket.limit), "remaining": str(max(0, int(bucket.level))),
                      "reset": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(full_at)))}
            out.update({f"anthropic-ratelimit-{kind}-{k}": v for k, v in values.items()})
            share = bucket.level / bucket.limit
            if tightest is None or share < tightest[0]:
                tightest = (share, values)
        if tightest is not None:
            out.update({f"anthropic-ratelimit-tokens-{k}": v for k, v in tightest[1].items()})
        return out

    def _check_token_rates(self, key: str, n_in: int, max_tokens: int) -> int:
        """429 (with retry-after) when this key's input or output tokens per minute would
        be exceeded; 400 when the request alone is larger than the limit. Returns the output
        tokens to reserve (max_tokens; what is not generated is given back)."""
        s = self.settings
        if not (s.input_tokens_per_minute or s.output_tokens_per_minute):
            return 0
        now = time.monotonic()
        b_in, b_out = self._buckets_of(key, now)
        for n, limit, what in ((n_in, s.input_tokens_per_minute, "input"),
                               (max_tokens, s.output_tokens_per_minute, "output")):
            if limit and n > limit:
                raise ApiError(400, f"this request's {n:,} {what} tokens exceed the {limit:,} {what} "
                                    "tokens per minute an API key may use here"
                                    + ("; lower max_tokens" if what == "output" else ""))
        wait = max(b_in.wait_for(n_in, now), b_out.wait_for(max_tokens, now))
        if wait > 0:
            self.metrics.rate_limited.inc()
            raise ApiError(429, f"rate limit: this API key's tokens per minute are used up (input "
                                f"{s.input_tokens_per_minute or 'unlimited'}, output "
                                f"{s.output_tokens_per_minute or 'unlimited'}, output counted at "
                                f"max_tokens until the answer is done); retry in {math.ceil(wait)} s",
                           {"retry-after": str(math.ceil(wait)), **self.rate_limit_headers(key)})
        return max_tokens if s.output_tokens_per_minute else 0

    def finish(self, gen: Generation) -> None:
        """The response is over: cancel the request if still running (a no-op when done;
        frees the slot when the client left) and record the metrics. Idempotent."""
        if gen.finished:
            return
        gen.finished = True
        self.live.discard(gen)
        self.engine.cancel(gen.handle)
        m = self.metrics
        m.output_tokens.inc(gen.n_out)
        if gen.tools:
            self._check_tool_input(gen)
        if gen.background:  # latency metrics are the interactive traffic's
            return
        if gen.reserved and gen.key in self.buckets:  # output reserved but not generated
            self.buckets[gen.key][1].give(max(0, gen.reserved - gen.n_out))
        self.in_flight[gen.key] -= 1
        if self.in_flight[gen.key] <= 0:
            del self.in_flight[gen.key]
        t1 = time.perf_counter()
        m.e2e.observe(t1 - gen.t0)
        if gen.t_first is not None:
            m.ttft.observe(gen.t_first - gen.t0)
            if gen.n_out > 1:
                m.tpot.observe((t1 - gen.t_first) / (gen.n_out - 1))

    async def complete(self, request: Request, gen: Generation) -> tuple[str, Event]:
        """The whole text of a non-streamed answer, cancelling it if the client goes away;
        a failed generation is a 500 (the engine's exception text stays in its log)."""
        text: list[str] = []
        check_every = 0.1  # seconds between looks at the connection, tokens arriving or not
        next_check = time.monotonic() + check_every
        try:
            while True:
                try:
                    ev = gen.note(await asyncio.wait_for(gen.queue.get(), timeout=check_every))
                except TimeoutError:
                    ev = None
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + check_every
                    if await request.is_disconnected():
                        raise ClientClosed()
                if ev is None:
                    continue
                text.append(ev.text)
                if ev.done:
                    break
        finally:
            self.finish(gen)
        failed = self.failure(gen, ev)
        if failed:
            raise failed
        return "".join(text), ev

    def start_n(self, prompt: Prompt, samplings: list[SamplingParams], key: str,
                **kw: Any) -> list[Generation]:
        """`start` once per sampling (OpenAI's `n`: several choices of one prompt, which
        share its cached pages); if one is refused, those already admitted are finished
        and the refusal raised."""
        gens: list[Generation] = []
        try:
            for sampling in samplings:
                gens.append(self.start(prompt, sampling, key, **kw))
        except BaseException:
            for g in gens:
                self.finish(g)
            raise
        return gens

    async def complete_n(self, request: Request, gens: list[Generation]) -> list[tuple[str, Event]]:
        """`complete` for each generation at once; if one fails, the others are finished."""
        try:
            return list(await asyncio.gather(*(self.complete(request, g) for g in gens)))
        finally:
            for g in gens:
                self.finish(g)

    async def events_n(self, gens: list[Generation]):
        """(index, event) of several generations as they arrive, each up to its last."""
        if len(gens) == 1:  # the usual request: its own events, no task or queue between
            async for ev in gens[0].events():
                yield 0, ev
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, g: Generation) -> None:
            async for ev in g.events():
                await merged.put((i, ev))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
        try:
            left = len(gens)
            while left:
                i, ev = await merged.get()
                left -= ev.done
                yield i, ev
        finally:
            for t in tasks:
                t.cancel()

    def stream_n(self, gens: list[Generation], chunks: Any, headers: dict[str, str]) -> StreamingResponse:
        """`stream` over several generations: every one is finished however it ends."""

        async def guarded():
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                for g in gens:
                    self.finish(g)

        return StreamingResponse(guarded(), media_type="text/event-stream", headers=headers)

    def _check_tool_input(self, gen: Generation) -> None:
        """A finished call's input against its tool's full schema: decoding enforced all
        but the keywords the grammar engine lacks (`tools.enforceable`); a mismatch is
        returned as generated, as the Messages API returns a model's call (the client
        validates it, as Claude Code does), and counted and logged here."""
        for call in tool_mod.parse("".join(gen.text))[1]:
            tool = next((t for t in gen.tools if t.name == call.name), None)
            if tool is None:
                continue
            try:
                value = json.loads(call.args)
            except json.JSONDecodeError:
                continue  # cut off before it was whole (max_tokens): not a call
            problem = tool_mod.check_input(tool, value)
            if problem:
                self.metrics.tool_input_invalid.inc()
                self.engine.log(f"tool {clip(call.name)}: the input breaks a schema keyword decoding "
                                f"could not enforce ({clip(problem, 200, quote=False)})")

    def failure(self, gen: Generation, ev: Event) -> ApiError | None:
        """How a generation that did not finish ends its response (None when it did): a 503
        overloaded_error with retry-after when the server ended it (shutting down), a 500
        api_error when the engine failed (its exception text stays in its log). Streams
        send it as an `error` event."""
        if ev.stop_reason not in ("error", "cancelled"):
            return None
        if gen.aborted:
            return ApiError(503, gen.aborted, {"retry-after": str(self.settings.retry_after_s)})
        return ApiError(500, f"generation failed: {ev.error or ev.stop_reason}")

    # ------------------------------------------------------------------ shutting down

    def refuse_if_draining(self) -> None:
        if self.failed:
            raise ApiError(503, f"this server failed and takes no requests: {self.failed}",
                           {"retry-after": str(self.settings.retry_after_s)})
        if self.draining:
            raise ApiError(503, "this server is shutting down and takes no new requests; retry "
                                "(another replica will answer)",
                           {"retry-after": str(self.settings.retry_after_s)})

    async def drain(self, seconds: float, log: Any = print) -> None:
        """Graceful shutdown: from now on /health is not ready and new requests are 503s;
        what is running gets up to `seconds` to finish, and what is still running then ends
        with a 503 overloaded_error (an `error` event on a stream). Message Batches work is
        not started, and what is interrupted stays pending in the database. Returns once
        every response is over (or a few seconds after the deadline, whatever is left)."""
        self.draining = True
        t0 = time.monotonic()
        n = len(self.live)
        log(f"draining: {n} request(s) in flight get up to {seconds:g} s to finish; new ones "
            "are refused (503)")
        while self.live and time.monotonic() - t0 < seconds:
            await asyncio.sleep(0.05)
        left = list(self.live)
        for gen in left:
            gen.aborted = (f"this server is shutting down and this request did not finish within "
                           f"its {seconds:g} s drain period; retry")
            self.engine.cancel(gen.handle)
        end = time.monotonic() + 5  # the aborted send their error and end
        while self.live and time.monotonic() < end:
            await asyncio.sleep(0.05)
        log(f"drained in {time.monotonic() - t0:.1f} s: {n - len(left)} finished, {len(left)} "
            "ended with an overloaded_error")

    def stream(self, gen: Generation, chunks: Any, headers: dict[str, str]) -> StreamingResponse:
        """A server-sent-events response of `chunks` (an async generator of bytes reading
        `gen.events()`); `finish` runs however the stream ends, the client leaving included."""
        return self.stream_n([gen], chunks, headers)
