"""Tool use and structured output, for both APIs: tools rendered into the chat template,
the grammar that constrains the model's output (llguidance, `serve.engine`), and the
reading of that output back into a tool call.

The format megamesh's chat template uses (its own models are trained on nothing else;
the grammar guarantees it whatever the model):

    <tool_call>NAME
    {the tool's input: JSON valid for its input_schema}

A response is either such a call (its first characters are the trigger) or plain text
(it cannot start with "<"); one call per response. An input's objects that list their
properties are closed while decoding (`closed`), their properties in the schema's order.
tool_choice: auto (either), any (a
call to any tool), tool (a call to that one), none (text; the tools stay in the prompt).
Earlier turns render a call the same way and a tool's result as
`<tool_result>...</tool_result>` in the user turn.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from megamesh.serve.text import END

TRIGGER = "<tool_call>"
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


class ToolError(ValueError):
    """A tool definition or choice that cannot be used (HTTP 400; `where` names the field)."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    schema: dict[str, Any]  # the input's JSON schema (as given: rendered, and checked after)
    cache_ttl: str | None = None  # a cache_control breakpoint after this tool's definition

    @property
    def enforced(self) -> dict[str, Any]:
        """The part of `schema` the grammar engine enforces while decoding, its objects
        closed (`closed`)."""
        return closed(enforceable(self.schema)[0])


# JSON Schema keywords whose values are subschemas (or maps or lists of them): where a
# keyword the grammar engine cannot enforce may sit
_SUBSCHEMA = ("additionalProperties", "items", "not", "if", "then", "else", "contains",
              "propertyNames", "unevaluatedItems", "unevaluatedProperties", "additionalItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_UNIMPLEMENTED = re.compile(r"Unimplemented keys: (\[[^\]]*\])")


def _without(schema: Any, drop: frozenset[str]) -> Any:
    """`schema` with the keywords in `drop` removed wherever a subschema may be (never a
    property that happens to bear such a name)."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in drop:
            continue
        if k in _SUBSCHEMA:
            v = _without(v, drop)
        elif k in _SUBSCHEMA_MAPS and isinstance(v, dict):
            v = {name: _without(sub, drop) for name, sub in v.items()}
        elif k in _SUBSCHEMA_LISTS and isinstance(v, list):
            v = [_without(sub, drop) for sub in v]
        out[k] = v
    return out


_OPEN_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def closed(schema: Any) -> Any:
    """`schema` with every object that lists `properties` and says nothing of others
    (`additionalProperties`, `patternProperties`, `unevaluatedProperties`) closed to
    them, as xgrammar's strict mode and OpenAI's strict outputs do: under JSON Schema's
    open default a weak model's call never ends (it invents key after key). An object
    with no `properties` (any object) stays open."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in _SUBSCHEMA:
            v = closed(v)
        elif k in _SUBSCHEMA_MAPS and isinstance(v, dict):
            v = {name: closed(sub) for name, sub in v.items()}
        elif k in _SUBSCHEMA_LISTS and isinstance(v, list):
            v = [closed(sub) for sub in v]
        out[k] = v
    if isinstance(out.get("properties"), dict) and not any(k in out for k in _OPEN_KEYS):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=1024)
def _enforceable(text: str) -> tuple[str, tuple[str, ...]]:
    import llguidance

    schema, dropped = json.loads(text), ()
    current = schema
    for _ in range(16):
        err = llguidance.LLMatcher.validate_grammar(f"start: value\nvalue: %json {_compact(current)}\n",
                                                    None)
        found = _UNIMPLEMENTED.search(err or "")
        new = [k for k in (json.loads(found.group(1)) if found else []) if k not in dropped]
        if not new:
            break
        dropped += tuple(new)
        current = _without(schema, frozenset(dropped))
    return json.dumps(current), dropped


def enforceable(schema: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(`schema` less the keywords llguidance does not implement, those keywords): what
    constrained decoding enforces. The full schema is checked on the finished input
    (`check_input`): a keyword such as `propertyNames` (Claude Code's tools have it) is
    never a 400."""
    # the schema's own key order: llguidance writes an object's listed properties in the
    # order the schema lists them (sorted keys made a model trained on the schema as shown
    # write `{"n": .., "path": ..}` for properties listed path, n)
    text, dropped = _enforceable(json.dumps(schema))
    return json.loads(text), dropped


def check_input(tool: Tool, tool_input: Any) -> str | None:
    """Where a finished tool input breaks its full schema (None when it does not): only
    the keywords decoding could not enforce can be broken."""
    import jsonschema

    validator = jsonschema.validators.validator_for(tool.schema)(tool.schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(tool_input))
    return None if error is None else f"{'/'.join(map(str, error.absolute_path)) or 'input'}: {error.message}"


def check_tools(raw: list[Any], where: str = "tools") -> list[Tool]:
    out = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise ToolError(f"{where}.{i}", "must be an object")
        name, schema = t.get("name"), t.get("input_schema")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"{where}.{i}.name", "1 to 64 letters, digits, _ or -")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise ToolError(f"{where}.{i}.input_schema", 'must be a JSON schema of "type": "object"')
        desc = t.get("description", "")
        if not isinstance(desc, str):
            raise ToolError(f"{where}.{i}.description", "must be a string")
        ttl = None
        if t.get("cache_control") is not None:  # the Messages API's prompt caching
            cc = t["cache_control"]
            if not (isinstance(cc, dict) and cc.get("type") == "ephemeral" and set(cc) <= {"type", "ttl"}
                    and cc.get("ttl", "5m") in ("5m", "1h")):
                raise ToolError(f"{where}.{i}.cache_control",
                                'must be {"type": "ephemeral"} (with an optional "ttl": "5m" or "1h")')
            ttl = cc.get("ttl", "5m")
        out.append(Tool(name, desc, schema, ttl))
    if len({t.name for t in out}) != len(out):
        raise ToolError(where, "tool names must be unique")
    return out


def render_tools(tools: list[Tool], mark: Any = None) -> str:
    """The tools' part of the system prompt; `mark(ttl)`: the text that puts a cache
    breakpoint after a tool whose definition carries cache_control (the prefix through
    that tool's line, as the Messages API caches the tools up to the marked one)."""
    lines = [f"Tools (to call one, answer {TRIGGER}NAME, a new line, its input as JSON):"]
    for t in tools:
        lines.append(json.dumps({"name": t.name, "description": t.description,
                                 "input_schema": t.schema}, separators=(",", ":"))
                     + (mark(t.cache_ttl) if mark is not None and t.cache_ttl else ""))
    return "\n".join(lines)


def render_call(name: str, tool_input: Any) -> str:
    return f"{TRIGGER}{name}\n{json.dumps(tool_input, separators=(',', ':'))}"


def render_result(content: str, is_error: bool = False) -> str:
    return f"<tool_result{' error' if is_error else ''}>{content}</tool_result>"


def _compact(schema: dict[str, Any]) -> str:
    """A schema for llguidance's %json, without free whitespace (one canonical spelling)."""
    return json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}})


def grammar(tools: list[Tool], choice: str, name: str | None = None) -> str | None:
    """The llguidance (Lark) grammar for a response under `choice` (auto, any, tool, none)."""
    if not tools or choice == "none":
        return None
    chosen = [t for t in tools if name is None or t.name == name]
    calls = " | ".join(f'"{t.name}\\n" input_{i}' for i, t in enumerate(chosen))
    rules = "\n".join(f"input_{i}: %json {_compact(t.enforced)}" for i, t in enumerate(chosen))
    start = f'"{TRIGGER}" call{_END_OK}' + (" | PROSE" if choice == "auto" else "")
    return f"start: {start}\ncall: {calls}\n{rules}\nPROSE: /[^<](?s:.*)/\n"


# The chat template's end marker may follow a call or a JSON answer (the template renders
# an assistant turn as its text then the marker, so a model trained on it writes the
# marker next, often in one token with the JSON's last characters, e.g. `"}<|`); it ends
# the response there (serve.engine's stop matcher) and is not part of the output.
_END_OK = f' "{END}"?'


def json_grammar(schema: dict[str, Any]) -> str:
    """The grammar of a response that is one JSON value valid for `schema`."""
    return f"start: value{_END_OK}\nvalue: %json {_compact(closed(enforceable(schema)[0]))}\n"


class CallReader:
    """Reads a response as it streams: `push(text)` returns its new pieces, ("text", s) for
    prose and ("name", tool) then ("input", json fragment)... for a call."""

    def __init__(self) -> None:
        self.buf, self.mode = "", None  # mode: None (undecided), "text", "name", "input"

    def push(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        if self.mode is None:
            if TRIGGER.startswith(self.buf[:len(TRIGGER)]) and len(self.buf) < len(TRIGGER):
                return out  # could still be the trigger
            self.mode = "name" if self.buf.startswith(TRIGGER) else "text"
            if self.mode == "name":
                self.buf = self.buf[len(TRIGGER):]
        if self.mode == "text":
            out.append(("text", self.buf)) if self.buf else None
            self.buf = ""
        if self.mode == "name" and "\n" in self.buf:
            name, self.buf = self.buf.split("\n", 1)
            out.append(("name", name))
            self.mode = "input"
        if self.mode == "input" and self.buf:
            out.append(("input", self.buf))
            self.buf = ""
        return out

    def flush(self) -> list[tuple[str, str]]:
        """What is left at the end (a response shorter than the trigger is text)."""
        if self.mode is None:
            self.mode = "text"
            return [("text", self.buf)] if self.buf else []
        return []


def parse(text: str) -> tuple[str, str | None, str]:
    """A whole response: (prose, tool name or None, the input's JSON text)."""
    r = CallReader()
    pieces = r.push(text) + r.flush()
    prose = "".join(s for k, s in pieces if k == "text")
    name = next((s for k, s in pieces if k == "name"), None)
    if name is None and r.mode == "name":  # cut off before the name line ended
        name = r.buf
    return prose, name, "".join(s for k, s in pieces if k == "input")
