"""The Messages API's content blocks and prompt caching, for the Anthropic adapter
(`serve.anthropic`) and its batches: text blocks with `cache_control` breakpoints, tool_use
and tool_result blocks in the chat template, and the cache usage a response reports
(`PromptCache`, accounted over the engine's prefix cache)."""

from __future__ import annotations

import hashlib
import time
import weakref
from typing import Any

import numpy as np

from megamesh.serve.core import UNSUPPORTED, ApiError, Core, Prompt, clip, text_block
from megamesh.serve.text import merge_turns, render_chat

# Marks a cache_control breakpoint in rendered text until the prompt is tokenized
# (`encode_prompt` removes it and keeps its offset); client text holding it is refused.
BREAKPOINT = "\x00megamesh-cache-breakpoint\x00"
CACHE_TTL_S = {"5m": 300, "1h": 3600}  # the Messages API's two cache lifetimes
MAX_BREAKPOINTS = 4  # the Messages API's limit per request


def content_text(content: str | list[dict[str, Any]] | None, where: str, *, caching: bool = False,
                 tool_blocks: bool = False, thinking_blocks: bool = False) -> str:
    """The text of a message's content; any block other than text is refused (never
    silently dropped). With `caching`, a block's `cache_control` ({"type": "ephemeral"},
    optional "ttl" 5m or 1h) puts a breakpoint marker (`BREAKPOINT` + ttl) after its text.
    With `tool_blocks`, tool_use and tool_result blocks are rendered as `serve.tools` writes
    them. With `thinking_blocks` (an assistant turn), its thinking and redacted_thinking
    blocks are accepted and left out of the prompt, as the Messages API leaves earlier
    turns' thinking out of the context."""
    if content is None:
        return ""
    if isinstance(content, str):
        if BREAKPOINT in content:
            raise ApiError(400, f"{where}.content: holds a sequence this server reserves")
        return content
    parts = []
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if thinking_blocks and kind in ("thinking", "redacted_thinking"):
            continue
        if tool_blocks and kind in ("tool_use", "tool_result"):
            parts.append(_tool_block(block, f"{where}.content.{i}", caching))
            continue
        text = text_block(block, f"{where}.content.{i}",
                          frozenset({"cache_control"}) if caching else frozenset())
        if BREAKPOINT in text:
            raise ApiError(400, f"{where}.content.{i}.text: holds a sequence this server reserves")
        parts.append(text)
        if block.get("cache_control") is not None:
            parts.append(BREAKPOINT + _cache_ttl(block["cache_control"], f"{where}.content.{i}"))
    return "".join(parts)


def _tool_block(block: dict[str, Any], where: str, caching: bool) -> str:
    """A tool_use block (an earlier call) or tool_result block as the chat template has it."""
    from megamesh.serve import tools

    allowed = {"tool_use": {"type", "id", "name", "input"},
               "tool_result": {"type", "tool_use_id", "content", "is_error"}}[block["type"]]
    extra = sorted(set(block) - allowed - ({"cache_control"} if caching else set()))
    if extra:
        raise ApiError(400, f"{where}.{extra[0]}: this field {UNSUPPORTED}")
    mark = (BREAKPOINT + _cache_ttl(block["cache_control"], where)
            if caching and block.get("cache_control") is not None else "")
    if block["type"] == "tool_use":
        if not isinstance(block.get("name"), str) or not isinstance(block.get("input"), dict):
            raise ApiError(400, f"{where}: a tool_use block needs a name and an input object")
        return tools.render_call(block["name"], block["input"]) + mark
    if not isinstance(block.get("tool_use_id"), str):
        raise ApiError(400, f"{where}.tool_use_id: must be a string")
    body = block.get("content", "")
    text = content_text(body, where)  # text blocks only (a string is checked too)
    return tools.render_result(text, bool(block.get("is_error"))) + mark


def _cache_ttl(cc: Any, where: str) -> str:
    """The ttl of a valid cache_control value, else a 400 naming what is wrong."""
    if not isinstance(cc, dict) or cc.get("type") != "ephemeral":
        raise ApiError(400, f"{where}.cache_control: must be {{\"type\": \"ephemeral\"}} "
                            "(with an optional \"ttl\": \"5m\" or \"1h\")")
    extra = sorted(set(cc) - {"type", "ttl"})
    if extra:
        raise ApiError(400, f"{where}.cache_control.{clip(extra[0], quote=False)}: this field {UNSUPPORTED}")
    ttl = cc.get("ttl", "5m")
    if ttl not in CACHE_TTL_S:
        raise ApiError(400, f"{where}.cache_control.ttl: {clip(ttl)} is not allowed: \"5m\" or \"1h\"")
    return ttl


class PromptCache:
    """The Messages API's prompt caching, accounted over the engine's prefix cache: a
    breakpoint's prefix is written when a request carrying it is served (if at least
    `min_tokens` long) and lives `ttl` after its last use. A request reads the longest of
    its breakpoint prefixes that is written, unexpired, and whose whole KV pages the engine
    actually reused; from there to its last breakpoint is written (cache creation); the
    rest is plain input. (The engine reuses pages of any shared prefix, breakpoint or not;
    this is only what is reported, as the Messages API reports it.)"""

    def __init__(self, min_tokens: int, page_size: int):
        self.min_tokens, self.page_size = min_tokens, page_size
        self.expiry: dict[bytes, float] = {}

    @staticmethod
    def _key(ids: list[int]) -> bytes:
        return hashlib.blake2b(np.asarray(ids, np.int32).tobytes(), digest_size=16).digest()

    def usage(self, prompt: Prompt, reused: int) -> dict[str, int]:
        """input_tokens, cache_creation_input_tokens, cache_read_input_tokens of a request
        whose first `reused` prompt tokens' KV came from the engine's cache; records what
        it wrote."""
        now = time.monotonic()
        if len(self.expiry) > 100_000:
            self.expiry = {k: t for k, t in self.expiry.items() if t > now}
        marks = [(m, ttl) for m, ttl in prompt.breakpoints if m >= self.min_tokens]
        keys = [self._key(prompt.ids[:m]) for m, _ in marks]
        read = 0
        for (m, _), key in zip(reversed(marks), reversed(keys)):
            if self.expiry.get(key, 0.0) > now and m // self.page_size * self.page_size <= reused:
                read = m
                break
        written = max(0, (marks[-1][0] if marks else 0) - read)
        # what was written, by the ttl of the breakpoint that ends each stretch
        by_ttl = dict.fromkeys(CACHE_TTL_S, 0)
        done = read
        for m, ttl in marks:
            if m > done:
                by_ttl[ttl] += m - done
                done = m
        for (_, ttl), key in zip(marks, keys):
            self.expiry[key] = max(self.expiry.get(key, 0.0), now + CACHE_TTL_S[ttl])
        return {"input_tokens": len(prompt) - read - written,
                "cache_creation_input_tokens": written, "cache_read_input_tokens": read,
                "cache_creation": {f"ephemeral_{t}_input_tokens": n for t, n in by_ttl.items()}}


_CACHES: weakref.WeakKeyDictionary[Core, PromptCache] = weakref.WeakKeyDictionary()


def prompt_cache(core: Core) -> PromptCache:
    """The prompt-cache accounting of the server `core` belongs to (one per server)."""
    if core not in _CACHES:
        _CACHES[core] = PromptCache(core.settings.cache_min_tokens, core.engine.page_size)
    return _CACHES[core]


async def encode_prompt(core: Core, system: str | None, turns: list[tuple[str, str]]) -> Prompt:
    """A chat's token ids and cache breakpoints (the markers `content_text` left)."""
    pieces = render_chat(system, merge_turns(turns)).split(BREAKPOINT)
    if len(pieces) - 1 > MAX_BREAKPOINTS:
        raise ApiError(400, f"cache_control: at most {MAX_BREAKPOINTS} blocks may carry it; "
                            f"this request has {len(pieces) - 1}")
    text, marks = pieces[0], []
    for piece in pieces[1:]:
        ttl = next(t for t in CACHE_TTL_S if piece.startswith(t))
        marks.append((len(text), ttl))
        text += piece[len(ttl):]
    return await core.encode(text, marks)
