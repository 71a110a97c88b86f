"""The OpenAI API over the request core: POST /v1/chat/completions and the legacy
POST /v1/completions (a raw prompt continued), plain and streaming, so OpenAI SDKs and
tools work against megamesh unchanged."""

from __future__ import annotations

import json
import secrets
import time
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from megamesh.serve import tools
from megamesh.serve.core import (
    FAIL_FAST,
    INT32_MAX,
    STATUS_TYPES,
    ApiError,
    Core,
    OpenSchema,
    Prompt,
    clip,
    sse_json,
    text_of,
)
from megamesh.serve.engine import SamplingParams

MAX_N = 16  # choices per request (each a generation in the engine, sharing the prompt's pages)
# the engine's stop reasons in OpenAI's words
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
          "model_context_window_exceeded": "length"}


class OpenAIMessage(OpenSchema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[dict[str, Any]], FAIL_FAST] | None = None
    tool_calls: Annotated[list[dict[str, Any]], FAIL_FAST] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this is the result of


class _Sampled(OpenSchema):
    """What both routes take: the model, sampling, `n` choices, streaming, and the fields
    accepted only at the values that change nothing."""

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=INT32_MAX)
    stop: str | Annotated[list[str], FAIL_FAST] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None  # accepted: an end-user id changes no output
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    ignore_eos: bool = False

    def samplings(self, max_tokens: int, grammar: str | None = None,
                  logprobs: int | None = None) -> list[SamplingParams]:
        """The sampling of each of the `n` choices: with a `seed`, choice i draws from
        seed + i (each reproducible, the choices different); without, each its own.
        `grammar`: the chat route's `tool_setup`'s; `logprobs`: its `logprobs_asked`."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return [SamplingParams(max_tokens=max_tokens,
                               temperature=1.0 if self.temperature is None else self.temperature,
                               top_k=self.top_k or 0, top_p=1.0 if self.top_p is None else self.top_p,
                               seed=None if self.seed is None else (self.seed + i + 2**63) % 2**64 - 2**63,
                               stop=stop, ignore_eos=self.ignore_eos, grammar=grammar, logprobs=logprobs)
                for i in range(self.n)]

    def _refuse(self, checks: list[tuple[str, bool, str]]) -> None:
        """400 for a declared field at a value this server would not honour (`checks`: the
        route's own, then the shared ones)."""
        checks = checks + [
            ("presence_penalty", self.presence_penalty not in (None, 0), "penalties"),
            ("frequency_penalty", self.frequency_penalty not in (None, 0), "penalties"),
            ("logit_bias", bool(self.logit_bias), "logit bias"),
            ("stream_options", bool(set(self.stream_options or {}) - {"include_usage"}),
             "stream options other than include_usage"),
        ]
        for name, bad, what in checks:
            if bad:
                raise ApiError(400, f"{name}: {what} is not supported by this server")


class ChatRequest(_Sampled):
    messages: list[OpenAIMessage] = Field(min_length=1, fail_fast=True)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None  # [{"type": "function", "function": {name, description, parameters}}]
    tool_choice: str | dict[str, Any] | None = None  # none | auto | required | {"function": {name}}
    parallel_tool_calls: bool | None = None  # false: at most one call per choice
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None  # each output token's log-probability
    top_logprobs: int | None = Field(default=None, ge=0, le=20)  # and this many alternatives

    def refuse_unsupported(self) -> None:
        self._refuse([
            ("response_format", bool(self.response_format) and self.response_format.get("type")
             not in ("text", "json_object", "json_schema"), "this response format"),
        ])

    def logprobs_asked(self, most: int) -> int | None:
        """How many alternatives each token's log-probability comes with (None: none asked);
        `most`: what the engine computes (megamesh serve --max-logprobs)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs: true")
        if not self.logprobs:
            return None
        if not most:
            raise ApiError(400, "logprobs: this server computes none (megamesh serve --max-logprobs "
                                "N turns them on)")
        if (self.top_logprobs or 0) > most:
            raise ApiError(400, f"top_logprobs: {self.top_logprobs} is more than this server's "
                                f"{most} (megamesh serve --max-logprobs)")
        return self.top_logprobs or 0

    def tool_setup(self) -> tuple[list[tools.Tool], str | None]:
        """The tools (as serve.tools has them) and the grammar on the output: from
        tool_choice, or from response_format (json_object, json_schema)."""
        raw = []
        for i, t in enumerate(self.tools or []):
            fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
            if not isinstance(fn, dict):
                raise ApiError(400, f"tools.{i}: must be {{\"type\": \"function\", \"function\": "
                                    "{name, description, parameters}}")
            raw.append({"name": fn.get("name"), "description": fn.get("description", ""),
                        "input_schema": fn.get("parameters", {"type": "object", "properties": {}})})
        try:
            found = tools.check_tools(raw)
        except tools.ToolError as e:
            raise ApiError(400, str(e).replace("input_schema", "function.parameters")) from None
        choice, name = self.tool_choice or ("auto" if found else "none"), None
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            if choice.get("type") != "function" or name not in {t.name for t in found}:
                raise ApiError(400, f"tool_choice: {clip(choice)} does not name one of the tools")
            choice = "tool"
        elif choice not in ("none", "auto", "required"):
            raise ApiError(400, f"tool_choice: {clip(choice)} is not allowed: none, auto, required or "
                                "a function")
        if choice == "required" and not found:
            raise ApiError(400, "tool_choice: 'required' needs tools")
        fmt = self.response_format or {}
        if fmt.get("type") in ("json_object", "json_schema"):
            if found and choice != "none":
                raise ApiError(400, "response_format: JSON output and tool calls cannot both be asked")
            schema = {"type": "object"}
            if fmt["type"] == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema")
                if not isinstance(schema, dict):
                    raise ApiError(400, "response_format.json_schema.schema: must be a JSON schema object")
            return found, tools.json_grammar(schema)
        kind = {"required": "any"}.get(choice, choice)
        return found, tools.grammar(found, kind, name, parallel=self.parallel_tool_calls is not False)



class CompletionRequest(_Sampled):
    """POST /v1/completions: a raw prompt continued (no chat template, no tools)."""

    prompt: str | Annotated[list[str], FAIL_FAST] | Annotated[list[int], FAIL_FAST]
    max_tokens: int = Field(default=16, ge=0)  # OpenAI's default for this route
    echo: bool = False
    # accepted only at the values that change nothing; anything else is refused
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def refuse_unsupported(self) -> None:
        self._refuse([
            ("suffix", bool(self.suffix), "insertion (suffix)"),
            ("best_of", self.best_of not in (None, 1), "best_of other than 1"),
            ("logprobs", self.logprobs not in (None, 0), "log probabilities"),
        ])
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ApiError(400, f"prompt: a list of {len(self.prompt)} prompts is not supported "
                                    "(one prompt per request)")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ApiError(400, "prompt: must not be empty")


def _sse(body: dict[str, Any]) -> bytes:
    return f"data: {sse_json(body)}\n\n".encode()


def _stream_end(gens: list, head: dict[str, Any], usage: Any, include_usage: bool,
                failed: ApiError | None) -> list[bytes]:
    """A stream's last events: the error of a failed generation, or the usage chunk (when
    asked: `usage(output tokens of every choice)` under the chunks' `head`) and [DONE]."""
    if failed:
        return [_sse({"error": {"type": STATUS_TYPES[failed.status], "message": failed.message}})]
    tail = [_sse({**head, "choices": [], "usage": usage(sum(g.n_out for g in gens))})
            ] if include_usage else []
    return tail + [b"data: [DONE]\n\n"]


def logprobs_json(entries: list, tokenizer: Any) -> dict[str, Any]:
    """OpenAI's `logprobs` of a choice (or a chunk's delta): `content`, one entry per output
    token with its text, UTF-8 bytes, log-probability under the model (its softmax, before
    temperature and any grammar) and the most likely alternatives."""
    def one(tok: int, lp: float) -> dict[str, Any]:
        text = tokenizer.decode([tok])
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**one(tok, lp), "top_logprobs": [one(i, v) for i, v in alts]}
                        for tok, lp, alts in entries]}


def choice_message(text: str, stop_reason: str, calling: bool) -> tuple[dict[str, Any], str]:
    """A finished choice's message and finish_reason: its text, or, when tools may be
    called and it holds calls that all parse, its preface as content and a tool_calls
    entry per call (finish_reason tool_calls when it ended with them)."""
    reason = FINISH[stop_reason]
    got = tools.whole_calls(text) if calling else None
    if got is None:
        return {"role": "assistant", "content": text}, reason
    prose, calls = got
    return {"role": "assistant", "content": prose or None, "tool_calls": [
        {"id": "call_" + secrets.token_hex(12), "type": "function",
         "function": {"name": c.name, "arguments": c.args}} for c, _ in calls]}, \
        "tool_calls" if stop_reason == "end_turn" else reason


def register(app: FastAPI, core: Core) -> None:
    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        key, req = await core.parse(request, ChatRequest)
        req.refuse_unsupported()
        found, grammar = req.tool_setup()
        system, turns = [], []
        for i, m in enumerate(req.messages):
            if m.role != "assistant" and m.tool_calls:
                raise ApiError(400, f"messages.{i}.tool_calls: only assistant messages make calls")
            text = text_of(m.content, f"messages.{i}")
            for j, c in enumerate(m.tool_calls or []):
                fn = c.get("function") if isinstance(c, dict) else None
                try:
                    args = json.loads(fn["arguments"]) if isinstance(fn, dict) else None
                except (json.JSONDecodeError, KeyError, TypeError):
                    args = None
                if not isinstance(args, dict) or not isinstance(fn.get("name"), str):
                    raise ApiError(400, f"messages.{i}.tool_calls.{j}: a function call needs a name "
                                        "and arguments that are a JSON object")
                text += tools.render_call(fn["name"], args)
            if m.role in ("system", "developer"):
                system.append(text)
            elif m.role == "tool":
                if not m.tool_call_id:
                    raise ApiError(400, f"messages.{i}.tool_call_id: a tool message needs it")
                turns.append(("user", tools.render_result(text)))
            else:
                turns.append((m.role, text))
        calling = bool(found) and grammar is not None and not req.response_format
        if calling:
            system.append(tools.render_tools(found))
        prompt = await core.encode_chat("\n\n".join(system) or None, turns)
        max_tokens = req.max_completion_tokens or req.max_tokens or max(core.engine.max_len - len(prompt), 1)
        asked = req.logprobs_asked(core.engine.max_logprobs)
        gens = core.start_n(prompt, req.samplings(max_tokens, grammar, asked), key,
                            tools=found if calling else [])
        tokenizer = core.model.tokenizer
        cid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())

        def usage(n_out: int) -> dict[str, Any]:
            # OpenAI caches prompt prefixes automatically and reports what was reused
            return {"prompt_tokens": len(prompt), "completion_tokens": n_out,
                    "total_tokens": len(prompt) + n_out,
                    "prompt_tokens_details": {"cached_tokens": gens[0].cached_tokens or 0}}

        if not req.stream:
            choices = []
            for i, (text, ev) in enumerate(await core.complete_n(request, gens)):
                message, reason = choice_message(text, ev.stop_reason, calling)
                choices.append({"index": i, "message": message, "finish_reason": reason,
                                "logprobs": None if asked is None
                                else logprobs_json(gens[i].logprobs, tokenizer)})
            return JSONResponse({
                "id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": choices, "usage": usage(sum(g.n_out for g in gens))})

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model}

        def chunk(i: int, delta: dict[str, Any], reason: str | None, lps: list | None = None) -> bytes:
            return _sse({**head, "choices": [{"index": i, "delta": delta, "finish_reason": reason,
                                              "logprobs": logprobs_json(lps, tokenizer) if lps else None}]})

        async def events():
            for i in range(len(gens)):
                yield chunk(i, {"role": "assistant", "content": ""}, None)
            readers = [tools.CallReader() for _ in gens]
            called = [0] * len(gens)  # calls begun per choice
            failed = None
            async for i, ev in core.events_n(gens):
                pieces = (readers[i].push(ev.text) + (readers[i].flush() if ev.done else [])) \
                    if calling else [("text", ev.text)] if ev.text else []
                lps = ev.logprobs  # the event's tokens' log-probabilities: with its first chunk
                if lps and not pieces:
                    pieces = [("text", "")]
                for kind, piece in pieces:
                    if kind == "text":
                        yield chunk(i, {"content": piece}, None, lps)
                    elif kind == "name":
                        called[i] += 1
                        yield chunk(i, {"tool_calls": [{"index": called[i] - 1,
                                                        "id": "call_" + secrets.token_hex(12),
                                                        "type": "function",
                                                        "function": {"name": piece, "arguments": ""}}]}, None,
                                    lps)
                    else:
                        yield chunk(i, {"tool_calls": [{"index": called[i] - 1,
                                                        "function": {"arguments": piece}}]}, None, lps)
                    lps = None
                if not ev.done:
                    continue
                failed = core.failure(gens[i], ev)
                if failed:
                    break
                called_all = called[i] and ev.stop_reason == "end_turn"
                yield chunk(i, {}, "tool_calls" if called_all else FINISH[ev.stop_reason])
            for end in _stream_end(gens, head, usage, include_usage, failed):
                yield end

        return core.stream_n(gens, events(), {"cache-control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        key, req = await core.parse(request, CompletionRequest)
        req.refuse_unsupported()
        if isinstance(req.prompt, list) and isinstance(req.prompt[0], int):
            vocab = core.engine.cfg.vocab_size
            bad = next((t for t in req.prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise ApiError(400, f"prompt: token id {bad} is not in this model's vocabulary "
                                    f"(0..{vocab - 1})")
            prompt = Prompt(list(req.prompt), [])
            prompt_text = core.model.tokenizer.decode(req.prompt)
        else:
            prompt_text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
            prompt = await core.encode(prompt_text)
        echo = prompt_text if req.echo else ""
        cid, created = "cmpl-" + secrets.token_hex(12), int(time.time())

        def usage(n_out: int) -> dict[str, Any]:
            return {"prompt_tokens": len(prompt), "completion_tokens": n_out,
                    "total_tokens": len(prompt) + n_out}

        if req.max_tokens == 0:  # nothing to generate: the prompt (echoed) alone
            return JSONResponse({"id": cid, "object": "text_completion", "created": created,
                                 "model": req.model, "choices": [{"text": echo, "index": i,
                                 "logprobs": None, "finish_reason": "length"} for i in range(req.n)],
                                 "usage": usage(0)})
        gens = core.start_n(prompt, req.samplings(req.max_tokens), key)
        if not req.stream:
            done = await core.complete_n(request, gens)
            return JSONResponse({
                "id": cid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [{"text": echo + text, "index": i, "logprobs": None,
                             "finish_reason": FINISH[ev.stop_reason]} for i, (text, ev) in enumerate(done)],
                "usage": usage(sum(ev.output_tokens for _, ev in done))})

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        head = {"id": cid, "object": "text_completion", "created": created, "model": req.model}

        def chunk(i: int, text: str, reason: str | None) -> bytes:
            return _sse({**head, "choices": [{"text": text, "index": i, "logprobs": None,
                                              "finish_reason": reason}]})

        async def events():
            if echo:
                for i in range(len(gens)):
                    yield chunk(i, echo, None)
            failed = None
            async for i, ev in core.events_n(gens):
                if ev.text:
                    yield chunk(i, ev.text, None)
                if not ev.done:
                    continue
                failed = core.failure(gens[i], ev)
                if failed:
                    break
                yield chunk(i, "", FINISH[ev.stop_reason])
            for end in _stream_end(gens, head, usage, include_usage, failed):
                yield end

        return core.stream_n(gens, events(), {"cache-control": "no-cache"})
