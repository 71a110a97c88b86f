"""The Anthropic Messages API over the request core: POST /v1/messages (plain and SSE
streaming) and POST /v1/messages/count_tokens. Shapes as in the Messages API reference
(docs/serving.md summarizes what is supported and what is refused)."""

from __future__ import annotations

import secrets
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from megamesh.serve.core import (
    INT32_MAX,
    ApiError,
    Core,
    Generation,
    OpenSchema,
    Prompt,
    sse_json,
    text_of,
)
from megamesh.serve.engine import Event, SamplingParams


class AnthropicMessage(OpenSchema):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class CountTokensRequest(OpenSchema):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[Any] | None = None  # refused unless empty: no tool use here
    tool_choice: dict[str, Any] | None = None  # refused unless {"type": "none"}
    thinking: dict[str, Any] | None = None  # refused unless disabled


class MessagesRequest(CountTokensRequest):
    """What count_tokens takes, and how to generate."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=INT32_MAX)
    stream: bool = False
    metadata: dict[str, Any] | None = None  # accepted: an end-user id changes no output
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here
    ignore_eos: bool = False  # extension (as vLLM's): generate max_tokens whatever the model says

    def sampling(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_k=self.top_k or 0, top_p=1.0 if self.top_p is None else self.top_p,
                              stop=tuple(self.stop_sequences or ()), ignore_eos=self.ignore_eos)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {sse_json(data)}\n\n".encode()


async def prompt_of(core: Core, req: MessagesRequest | CountTokensRequest) -> Prompt:
    """The prompt of a Messages request (400 for what is not supported)."""
    if req.tools:
        raise ApiError(400, "tools: tool use is not supported by this server")
    if req.tool_choice and req.tool_choice.get("type") != "none":
        raise ApiError(400, "tool_choice: tool use is not supported by this server")
    if req.thinking and req.thinking.get("type") not in (None, "disabled"):
        raise ApiError(400, "thinking: extended thinking is not supported by this server")
    system = text_of(req.system, "system", caching=True) or None
    turns = [(m.role, text_of(m.content, f"messages.{i}", caching=True))
             for i, m in enumerate(req.messages)]
    return await core.encode_chat(system, turns)


def message_object(core: Core, gen: Generation, text: str, ev: Event) -> dict[str, Any]:
    """A whole (non-streamed) Messages API response for a finished generation."""
    return {"id": "msg_" + secrets.token_hex(12), "type": "message", "role": "assistant",
            "model": core.model.name, "content": [{"type": "text", "text": text}],
            "stop_reason": ev.stop_reason, "stop_sequence": ev.stop_sequence,
            "usage": {**core.cache_usage(gen), "output_tokens": ev.output_tokens}}


def register(app: FastAPI, core: Core) -> None:
    name = core.model.name

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        key, req = await core.parse(request, MessagesRequest)
        gen = core.start(await prompt_of(core, req), req.sampling(), key)
        msg_id = "msg_" + secrets.token_hex(12)

        if not req.stream:
            text, ev = await core.complete(request, gen)
            return JSONResponse(message_object(core, gen, text, ev))

        async def events():
            await gen.admitted()  # the usage says what the engine found cached
            usage_in = core.cache_usage(gen)
            yield _sse("message_start", {"type": "message_start", "message": {
                "id": msg_id, "type": "message", "role": "assistant", "model": name,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {**usage_in, "output_tokens": 0}}})
            yield _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": {"type": "text", "text": ""}})
            yield _sse("ping", {"type": "ping"})
            async for ev in gen.events():
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
                                         "usage": {**usage_in, "output_tokens": gen.n_out}})
            yield _sse("message_stop", {"type": "message_stop"})

        return core.stream(gen, events(), {"cache-control": "no-cache", "connection": "close"})

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        _, req = await core.parse(request, CountTokensRequest)
        return JSONResponse({"input_tokens": len(await prompt_of(core, req))})  # cached or not
