"""The Anthropic Messages API over the request core: POST /v1/messages (plain and SSE
streaming) and POST /v1/messages/count_tokens. Shapes as in the Messages API reference
(docs/serving.md summarizes what is supported and what is refused)."""

from __future__ import annotations

import functools
import secrets
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from megamesh.serve import context_edits, tools
from megamesh.serve.anthropic_content import BREAKPOINT, content_text, encode_prompt, prompt_cache
from megamesh.serve.core import (
    FAIL_FAST,
    INT32_MAX,
    STATUS_TYPES,
    UNSUPPORTED,
    ApiError,
    Core,
    Generation,
    OpenSchema,
    Prompt,
    clip,
    sse_json,
)
from megamesh.serve.engine import Event, SamplingParams

Blocks = Annotated[list[dict[str, Any]], FAIL_FAST]  # the first bad block, not all


class AnthropicMessage(OpenSchema):
    # "system": a system message at its place in the conversation (the Messages API's
    # mid-conversation system messages, as Claude Code sends them)
    role: Literal["user", "assistant", "system"]
    content: str | Blocks


class CountTokensRequest(OpenSchema):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1, fail_fast=True)
    system: str | Blocks | None = None
    tools: list[Any] | None = None  # [{name, description, input_schema}] (serve.tools)
    tool_choice: dict[str, Any] | None = None  # {"type": auto | any | tool (+ name) | none}
    # enabled (budget_tokens >= 1024) / adaptive / disabled: accepted; this server's models
    # do not think, so no thinking blocks come back (docs/serving.md)
    thinking: dict[str, Any] | None = None
    context_management: dict[str, Any] | None = None  # edits: serve.context_edits

    @functools.cached_property
    def tool_plan(self) -> tuple[list[tools.Tool], str | None]:
        """`tool_setup(self)`, worked out once per request (the prompt, the sampling and
        the response all need it)."""
        return tool_setup(self)

    @property
    def callable_tools(self) -> list[tools.Tool]:
        """The tools the answer may call (none when tool_choice is none)."""
        found, grammar = self.tool_plan
        return found if grammar is not None else []


class RequestMetadata(OpenSchema):
    """The Messages API's `metadata`: an end-user id (it changes no output); any other key
    is refused by name, as the API does."""

    user_id: str | None = Field(default=None, max_length=256)


class MessagesRequest(CountTokensRequest):
    """What count_tokens takes, and how to generate."""

    max_tokens: int = Field(ge=0)  # 0: prefill only, to pre-warm the prompt cache
    stop_sequences: Annotated[list[str], FAIL_FAST] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=INT32_MAX)
    stream: bool = False
    metadata: RequestMetadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here
    ignore_eos: bool = False  # extension (as vLLM's): generate max_tokens whatever the model says
    # effort (advisory: low | medium | high | max) and format (structured output)
    output_config: dict[str, Any] | None = None

    def sampling(self) -> SamplingParams:
        grammar = self.tool_plan[1]
        fmt = output_format(self)
        if fmt is not None:
            if grammar is not None:
                raise ApiError(400, "output_config.format: structured output with tools that may "
                                    "be called is not supported by this server (set tool_choice "
                                    "none, or leave format out)")
            grammar = tools.json_grammar(fmt)
        return SamplingParams(max_tokens=self.max_tokens,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_k=self.top_k or 0, top_p=1.0 if self.top_p is None else self.top_p,
                              stop=tuple(self.stop_sequences or ()), ignore_eos=self.ignore_eos,
                              grammar=grammar)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {sse_json(data)}\n\n".encode()


def tool_setup(req: MessagesRequest | CountTokensRequest) -> tuple[list[tools.Tool], str | None]:
    """The request's tools and the grammar its tool_choice puts on the output."""
    try:
        found = tools.check_tools(req.tools or [])
    except tools.ToolError as e:
        raise ApiError(400, str(e)) from None
    choice = dict(req.tool_choice or {"type": "auto"})
    kind, name = choice.pop("type", None), choice.pop("name", None)
    single = choice.pop("disable_parallel_tool_use", False)
    if not isinstance(single, bool):
        raise ApiError(400, f"tool_choice.disable_parallel_tool_use: {clip(single)} is not a boolean")
    if choice:
        raise ApiError(400, f"tool_choice.{sorted(choice)[0]}: this field {UNSUPPORTED}")
    if kind not in ("auto", "any", "tool", "none"):
        raise ApiError(400, f"tool_choice.type: {clip(kind)} is not allowed: auto, any, tool or none")
    if kind in ("any", "tool") and not found:
        raise ApiError(400, f"tool_choice: {kind!r} needs tools")
    if kind == "tool" and name not in {t.name for t in found}:
        raise ApiError(400, f"tool_choice.name: {clip(name)} is not one of the tools")
    return found, tools.grammar(found, kind, name if kind == "tool" else None, parallel=not single)


EFFORTS = ("low", "medium", "high", "max")

# `anthropic-beta` values this server knows, and what each changes here (the betas Claude
# Code sends, recorded in tests/data/claude_code). Any other is a 400 naming it, as the
# Messages API answers a beta it does not know (`note_betas`); `megamesh serve
# --unknown-betas ignore` accepts them instead, counted (megamesh_unknown_betas_total) and
# logged once, for clients newer than this list.
BETAS = {
    "claude-code-20250219": "nothing (no Claude Code-only behaviour here)",
    "interleaved-thinking-2025-05-14": "nothing (the models here do not think)",
    "thinking-token-count-2026-05-13": "nothing (no thinking tokens to count)",
    "context-management-2025-06-27": "context_management edits are applied (serve.context_edits)",
    "context-1m-2025-08-07": "nothing: the context is --max-len, whatever the beta",
    "prompt-caching-scope-2026-01-05": "nothing beyond prompt caching as described",
    "mid-conversation-system-2026-04-07": "nothing: system-role messages are always accepted",
    "effort-2025-11-24": "nothing: output_config.effort is always accepted (advisory)",
    "advanced-tool-use-2025-11-20": "nothing: a tool's defer_loading is ignored (every tool is "
                                    "in the prompt)",
}
_seen_unknown: set[str] = set()


def note_betas(core: Core, request: Request) -> None:
    """The request's anthropic-beta values: each one BETAS knows is fine; an unknown one
    is a 400 naming it (counted either way), or, under --unknown-betas ignore, counted and
    logged once."""
    for beta in filter(None, (b.strip() for b in request.headers.get("anthropic-beta", "").split(","))):
        if beta not in BETAS:
            core.metrics.unknown_betas.inc()
            if core.settings.unknown_betas == "reject":
                raise ApiError(400, f"anthropic-beta: {clip(beta)} is not a beta this server knows "
                                    f"(known: {', '.join(sorted(BETAS))}); an operator can accept "
                                    "unknown ones with megamesh serve --unknown-betas ignore")
            if beta not in _seen_unknown and len(_seen_unknown) < 1000:
                _seen_unknown.add(beta)
                core.engine.log(f"anthropic-beta {clip(beta)} is not known here: ignored")


def check_thinking(req: MessagesRequest | CountTokensRequest) -> None:
    """`thinking` as the Messages API takes it (400 in its terms otherwise). Accepted
    and answered without thinking blocks: this server's models do not think."""
    t = req.thinking
    if t is None:
        return
    if not isinstance(t, dict) or t.get("type") not in ("enabled", "disabled", "adaptive"):
        raise ApiError(400, "thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'")
    allowed = {"enabled": {"type", "budget_tokens", "display"},
               "adaptive": {"type", "display"}}.get(t["type"], {"type"})
    extra = sorted(set(t) - allowed)
    if extra:
        raise ApiError(400, f"thinking.{clip(extra[0], quote=False)}: Extra inputs are not permitted")
    if t.get("display", "summarized") not in ("summarized", "omitted"):
        raise ApiError(400, "thinking.display: Input should be 'summarized' or 'omitted'")
    if t["type"] == "enabled":
        budget = t.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1024:
            raise ApiError(400, "thinking.enabled.budget_tokens: Input should be greater than or "
                                "equal to 1024")
        if isinstance(req, MessagesRequest) and budget >= req.max_tokens:
            raise ApiError(400, "`max_tokens` must be greater than `thinking.budget_tokens`")


def output_format(req: MessagesRequest) -> dict[str, Any] | None:
    """`output_config`'s JSON schema for the answer (structured output), if any; its
    `effort` is checked and advisory (one effort here)."""
    cfg = req.output_config or {}
    extra = sorted(set(cfg) - {"effort", "format"})
    if extra:
        raise ApiError(400, f"output_config.{clip(extra[0], quote=False)}: Extra inputs are not "
                            "permitted")
    if "effort" in cfg and cfg["effort"] not in EFFORTS:
        raise ApiError(400, f"output_config.effort: Input should be {', '.join(map(repr, EFFORTS))}")
    fmt = cfg.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or \
            not isinstance(fmt.get("schema"), dict):
        raise ApiError(400, "output_config.format: must be {\"type\": \"json_schema\", \"schema\": "
                            "{...}}")
    return fmt["schema"]


async def prompt_of(core: Core, req: MessagesRequest | CountTokensRequest) -> Prompt:
    """The prompt of a Messages request (400 for what is not supported), with its
    context management edits applied (`serve.context_edits`)."""
    check_thinking(req)
    edits = context_edits.parse(req.context_management)
    found, _ = req.tool_plan
    system = content_text(req.system, "system", caching=True) or None
    if found:
        system = "\n\n".join(x for x in (system, tools.render_tools(found, lambda ttl: BREAKPOINT + ttl))
                               if x)

    async def encode(messages: list[AnthropicMessage]) -> Prompt:
        turns = [(m.role, content_text(m.content, f"messages.{i}", caching=True,
                                       tool_blocks=m.role != "system",
                                       thinking_blocks=m.role == "assistant"))
                 for i, m in enumerate(messages)]
        return await encode_prompt(core, system, turns)

    messages = req.messages
    prompt = await encode(messages)
    applied = []
    for e in edits:
        if e["type"] == context_edits.CLEAR_THINKING:
            n = context_edits.thinking_turns(messages, e["keep"])
            if n:
                applied.append({"type": e["type"], "cleared_thinking_turns": n,
                                "cleared_input_tokens": 0})  # never in this prompt
        elif len(prompt) > e["trigger"]:
            cleared, n = context_edits.clear_tool_uses(messages, e)
            if n:
                smaller = await encode(cleared)
                applied.append({"type": e["type"], "cleared_tool_uses": n,
                                "cleared_input_tokens": len(prompt) - len(smaller)})
                messages, prompt = cleared, smaller
    if req.context_management is not None:
        prompt.edits = applied
    return prompt


def content_of(text: str, stop_reason: str | None,
               calling: bool) -> tuple[list[dict[str, Any]], str | None]:
    """A response's content blocks (a text block for its text, then a tool_use block per
    call when tools may be called) and its stop_reason (tool_use when it ends with whole
    calls; a response whose calls do not all parse, e.g. cut off by max_tokens, stays text)."""
    got = tools.whole_calls(text) if calling else None
    if got is None:
        return [{"type": "text", "text": text}], stop_reason
    prose, calls = got
    blocks = [{"type": "text", "text": prose}] if prose else []
    blocks += [{"type": "tool_use", "id": "toolu_" + secrets.token_hex(12), "name": c.name,
                "input": value} for c, value in calls]
    return blocks, "tool_use" if stop_reason == "end_turn" else stop_reason


def usage_of(core: Core, gen: Generation) -> dict[str, int]:
    """The Messages API's usage of the prompt (once the engine admitted it, once per
    request): input_tokens, cache_creation_input_tokens, cache_read_input_tokens."""
    return prompt_cache(core).usage(gen.prompt, gen.cached_tokens or 0)


def message_object(core: Core, gen: Generation, text: str, ev: Event, calling: bool,
                   model: str) -> dict[str, Any]:
    """A whole (non-streamed) Messages API response for a finished generation; `model`:
    the id the request named (one this server answers to)."""
    content, stop_reason = content_of(text, ev.stop_reason, calling)
    out = {"id": "msg_" + secrets.token_hex(12), "type": "message", "role": "assistant",
           "model": model, "content": content,
           "stop_reason": stop_reason, "stop_sequence": ev.stop_sequence,
           "usage": {**usage_of(core, gen), "output_tokens": ev.output_tokens}}
    if gen.prompt.edits is not None:
        out["context_management"] = {"applied_edits": gen.prompt.edits}
    return out


def register(app: FastAPI, core: Core) -> None:
    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        key, req = await core.parse(request, MessagesRequest)
        note_betas(core, request)
        sampling = req.sampling()
        gen = core.start(await prompt_of(core, req), sampling, key, fit_window=True,
                         tools=req.callable_tools)
        msg_id = "msg_" + secrets.token_hex(12)
        calling = bool(req.callable_tools)  # a tool may be called

        limits = core.rate_limit_headers(key)  # after this request's tokens are taken
        if not req.stream:
            text, ev = await core.complete(request, gen)
            return JSONResponse(message_object(core, gen, text, ev, calling, req.model), headers=limits)

        async def events():
            await gen.admitted()  # the usage says what the engine found cached
            usage_in = usage_of(core, gen)
            yield _sse("message_start", {"type": "message_start", "message": {
                "id": msg_id, "type": "message", "role": "assistant", "model": req.model,
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {**usage_in, "output_tokens": 0}}})
            reader, index, block, called = tools.CallReader(), -1, None, False

            def start(kind: str, **fields: Any):
                nonlocal index, block
                index, block = index + 1, kind
                out = [_sse("content_block_stop", {"type": "content_block_stop", "index": index - 1})
                       ] if index > 0 else []
                out.append(_sse("content_block_start", {"type": "content_block_start", "index": index,
                                                        "content_block": {"type": kind, **fields}}))
                return out + ([_sse("ping", {"type": "ping"})] if index == 0 else [])

            def delta(kind: str, s: str) -> bytes:
                d = {"type": "text_delta", "text": s} if kind == "text" else \
                    {"type": "input_json_delta", "partial_json": s}
                return _sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                                    "delta": d})

            async for ev in gen.events():
                pieces = (reader.push(ev.text) + (reader.flush() if ev.done else [])) if calling \
                    else [("text", ev.text)] if ev.text else []
                for kind, s in pieces:
                    if kind == "text":
                        if block != "text":
                            for chunk in start("text", text=""):
                                yield chunk
                        yield delta("text", s)
                    elif kind == "name":
                        called = True
                        for chunk in start("tool_use", id="toolu_" + secrets.token_hex(12), name=s,
                                           input={}):
                            yield chunk
                    else:
                        yield delta("input", s)
            failed = core.failure(gen, ev)
            if failed:
                yield _sse("error", {"type": "error", "error": {
                    "type": STATUS_TYPES[failed.status], "message": failed.message}})
                return
            if block is None:  # nothing was said: an empty text block, as before
                for chunk in start("text", text=""):
                    yield chunk
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": index})
            stop = "tool_use" if called and ev.stop_reason == "end_turn" else ev.stop_reason
            final = {"type": "message_delta",
                     "delta": {"stop_reason": stop, "stop_sequence": ev.stop_sequence},
                     "usage": {**usage_in, "output_tokens": gen.n_out}}
            if gen.prompt.edits is not None:
                final["context_management"] = {"applied_edits": gen.prompt.edits}
            yield _sse("message_delta", final)
            yield _sse("message_stop", {"type": "message_stop"})

        return core.stream(gen, events(), {"cache-control": "no-cache", **limits})

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        _, req = await core.parse(request, CountTokensRequest)
        note_betas(core, request)
        return JSONResponse({"input_tokens": len(await prompt_of(core, req))})  # cached or not
