"""The Messages API's context management edits (`context_management`, the
context-management-2025-06-27 beta Claude Code sends), applied to the prompt this server
builds and reported in the response as the API reports them (`applied_edits`).

- `clear_tool_uses_20250919`: once the prompt is past `trigger` input tokens (default
  100,000), the results of all but the last `keep` tool uses (default 3) are replaced by
  a placeholder (and their calls' inputs too with `clear_tool_inputs`), tools in
  `exclude_tools` never; reported as cleared_tool_uses and cleared_input_tokens (counted
  with this model's tokenizer). `clear_at_least` is accepted; when clearing every
  eligible result frees less, the edit is still applied (and says how much it freed).
- `clear_thinking_20251015`: thinking blocks of earlier turns never reach this server's
  prompt (its models do not think; `anthropic_content.content_text`), so the edit frees
  no tokens; it reports the assistant turns whose thinking it would clear (all but the
  last `keep` turns with thinking; `keep: "all"` clears none).
"""

from __future__ import annotations

import copy
from typing import Any

from megamesh.serve.core import UNSUPPORTED, ApiError, clip

CLEAR_TOOL_USES = "clear_tool_uses_20250919"
CLEAR_THINKING = "clear_thinking_20251015"
PLACEHOLDER = "[this tool result was cleared to save context]"
_FIELDS = {CLEAR_TOOL_USES: {"type", "trigger", "keep", "clear_at_least", "exclude_tools",
                             "clear_tool_inputs"},
           CLEAR_THINKING: {"type", "keep"}}


def _count(value: Any, where: str, kind: str, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, dict) or value.get("type") != kind or set(value) != {"type", "value"} \
            or not isinstance(value["value"], int) or isinstance(value["value"], bool) \
            or value["value"] < 0:
        raise ApiError(400, f"{where}: must be {{\"type\": \"{kind}\", \"value\": N}} with N >= 0")
    return value["value"]


def parse(cm: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The request's edits, checked (400 naming what is wrong)."""
    if cm is None:
        return []
    if not isinstance(cm, dict) or set(cm) - {"edits"} or not isinstance(cm.get("edits", []), list):
        raise ApiError(400, "context_management: must be {\"edits\": [...]}")
    edits = []
    for i, e in enumerate(cm.get("edits", [])):
        where = f"context_management.edits.{i}"
        kind = e.get("type") if isinstance(e, dict) else None
        if kind not in _FIELDS:
            raise ApiError(400, f"{where}.type: {clip(kind)} is not allowed: {CLEAR_TOOL_USES} or "
                                f"{CLEAR_THINKING}")
        extra = sorted(set(e) - _FIELDS[kind])
        if extra:
            raise ApiError(400, f"{where}.{clip(extra[0], quote=False)}: this field {UNSUPPORTED}")
        if kind == CLEAR_THINKING:
            keep = e.get("keep", {"type": "thinking_turns", "value": 1})
            edits.append({"type": kind, "keep": None if keep == "all" else
                          _count(keep, f"{where}.keep", "thinking_turns", 1)})
            continue
        exclude = e.get("exclude_tools") or []
        if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
            raise ApiError(400, f"{where}.exclude_tools: must be a list of tool names")
        if not isinstance(e.get("clear_tool_inputs", False), bool):
            raise ApiError(400, f"{where}.clear_tool_inputs: must be true or false")
        edits.append({"type": kind,
                      "trigger": _count(e.get("trigger"), f"{where}.trigger", "input_tokens", 100_000),
                      "keep": _count(e.get("keep"), f"{where}.keep", "tool_uses", 3),
                      "clear_at_least": _count(e.get("clear_at_least"), f"{where}.clear_at_least",
                                               "input_tokens", 0),
                      "exclude_tools": set(exclude),
                      "clear_tool_inputs": e.get("clear_tool_inputs", False)})
    return edits


def thinking_turns(messages: list[Any], keep: int | None) -> int:
    """Assistant turns with thinking blocks that `clear_thinking` would clear."""
    turns = [m for m in messages if m.role == "assistant" and isinstance(m.content, list)
             and any(isinstance(b, dict) and b.get("type") in ("thinking", "redacted_thinking")
                     for b in m.content)]
    return 0 if keep is None else max(0, len(turns) - keep)


def clear_tool_uses(messages: list[Any], edit: dict[str, Any]) -> tuple[list[Any], int]:
    """`messages` with the results (and, if asked, the inputs) of all but the last `keep`
    tool uses cleared, and how many uses were cleared. The messages are copies."""
    names: dict[str, str] = {}  # tool_use id -> tool name
    uses: list[str] = []  # ids in order
    for m in messages:
        if isinstance(m.content, list):
            for b in m.content:
                if isinstance(b, dict) and b.get("type") == "tool_use":
                    names[b.get("id")] = b.get("name")
                    uses.append(b.get("id"))
    kept = set(uses[max(0, len(uses) - edit["keep"]):])
    clear = {u for u in uses if u not in kept and names.get(u) not in edit["exclude_tools"]}
    if not clear:
        return messages, 0
    out = []
    for m in messages:
        if isinstance(m.content, list):
            m = m.model_copy(update={"content": copy.deepcopy(m.content)})
            for b in m.content:
                if not isinstance(b, dict):
                    continue
                if b.get("type") == "tool_result" and b.get("tool_use_id") in clear:
                    b["content"] = PLACEHOLDER
                elif b.get("type") == "tool_use" and b.get("id") in clear and edit["clear_tool_inputs"]:
                    b["input"] = {}
        out.append(m)
    return out, len(clear)
