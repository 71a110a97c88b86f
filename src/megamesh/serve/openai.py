"""The OpenAI chat-completions API over the request core: POST /v1/chat/completions
(plain and streaming), so OpenAI SDKs and tools work against megamesh unchanged."""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from megamesh.serve.core import INT32_MAX, ApiError, Core, OpenSchema, sse_json, text_of
from megamesh.serve.engine import SamplingParams

# the engine's stop reasons in OpenAI's words
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}


class OpenAIMessage(OpenSchema):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(OpenSchema):
    model: str
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=INT32_MAX)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    tools: list[Any] | None = None  # refused unless empty: no tool use here
    tool_choice: str | dict[str, Any] | None = None  # refused unless "none"
    user: str | None = None  # accepted: an end-user id changes no output
    # accepted only at the values that change nothing; anything else is refused
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    ignore_eos: bool = False

    def refuse_unsupported(self) -> None:
        """400 for a declared field at a value this server would not honour."""
        checks = [
            ("logprobs", bool(self.logprobs), "log probabilities"),
            ("top_logprobs", self.top_logprobs not in (None, 0), "log probabilities"),
            ("presence_penalty", self.presence_penalty not in (None, 0), "penalties"),
            ("frequency_penalty", self.frequency_penalty not in (None, 0), "penalties"),
            ("logit_bias", bool(self.logit_bias), "logit bias"),
            ("response_format", bool(self.response_format)
             and self.response_format.get("type") != "text", "structured output"),
            ("tool_choice", self.tool_choice not in (None, "none"), "tool use"),
            ("stream_options", bool(set(self.stream_options or {}) - {"include_usage"}),
             "stream options other than include_usage"),
        ]
        for name, bad, what in checks:
            if bad:
                raise ApiError(400, f"{name}: {what} is not supported by this server")

    def sampling(self, max_tokens: int) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(max_tokens=max_tokens,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_k=self.top_k or 0, top_p=1.0 if self.top_p is None else self.top_p,
                              seed=self.seed, stop=stop, ignore_eos=self.ignore_eos)


def register(app: FastAPI, core: Core) -> None:
    name = core.model.name

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        key, req = await core.parse(request, ChatRequest)
        if req.n != 1:
            raise ApiError(400, f"n: {req.n} is not supported (only n=1)")
        if req.tools:
            raise ApiError(400, "tools: tool use is not supported by this server")
        req.refuse_unsupported()
        system, turns = [], []
        for i, m in enumerate(req.messages):
            text = text_of(m.content, f"messages.{i}")
            if m.role in ("system", "developer"):
                system.append(text)
            else:
                turns.append((m.role, text))
        prompt = await core.encode_chat("\n\n".join(system) or None, turns)
        max_tokens = req.max_completion_tokens or req.max_tokens or max(core.engine.max_len - len(prompt), 1)
        gen = core.start(prompt, req.sampling(max_tokens), key)
        cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())

        def usage(n_out: int) -> dict[str, Any]:
            # OpenAI caches prompt prefixes automatically and reports what was reused
            return {"prompt_tokens": len(prompt), "completion_tokens": n_out,
                    "total_tokens": len(prompt) + n_out,
                    "prompt_tokens_details": {"cached_tokens": gen.cached_tokens or 0}}

        if not req.stream:
            text, ev = await core.complete(request, gen)
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": FINISH[ev.stop_reason], "logprobs": None}],
                "usage": usage(ev.output_tokens)})

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], reason: str | None) -> bytes:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}
            return f"data: {sse_json(body)}\n\n".encode()

        async def events():
            yield chunk({"role": "assistant", "content": ""}, None)
            async for ev in gen.events():
                if ev.text:
                    yield chunk({"content": ev.text}, None)
            if ev.stop_reason in ("error", "cancelled"):
                err = {"error": {"type": "api_error", "message": f"generation failed: {ev.error}"}}
                yield f"data: {sse_json(err)}\n\n".encode()
                return
            yield chunk({}, FINISH[ev.stop_reason])
            if include_usage:
                body = {"id": cid, "object": "chat.completion.chunk", "created": created,
                        "model": name, "choices": [], "usage": usage(gen.n_out)}
                yield f"data: {sse_json(body)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return core.stream(gen, events(), {"cache-control": "no-cache"})
