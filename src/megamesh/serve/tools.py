"""Tool use and structured output, for both APIs: tools rendered into the chat template,
the grammar that constrains the model's output (llguidance, `serve.engine`), and the
reading of that output back into tool calls.

The format megamesh's chat template uses (its own models are trained on nothing else;
the grammar guarantees it whatever the model):

    <tool_call>NAME
    {the tool's input: JSON valid for its input_schema}

A response is plain text (it cannot start with "<"), or calls: optionally a preface of
text without "<" ("Let me look at both files."), then one call or several back to back
(`parallel`: the Messages API's default, OpenAI's parallel_tool_calls; one when a client
turns it off). An input's objects that list their properties are closed while decoding
(`closed`), their properties in the schema's order. tool_choice: auto (text or calls),
any (calls of any tool, no preface), tool (calls of that one), none (text; the tools stay
in the prompt). Earlier turns render calls the same way and a tool's result as
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


def grammar(tools: list[Tool], choice: str, name: str | None = None, parallel: bool = True) -> str | None:
    """The llguidance (Lark) grammar for a response under `choice` (auto, any, tool, none);
    `parallel`: several calls may follow one another (else at most one)."""
    if not tools or choice == "none":
        return None
    chosen = [t for t in tools if name is None or t.name == name]
    calls = " | ".join(f'"{t.name}\\n" input_{i}' for i, t in enumerate(chosen))
    rules = "\n".join(f"input_{i}: %json {_compact(t.enforced)}" for i, t in enumerate(chosen))
    if choice == "auto":
        start = f"PREFACE? calls{_END_OK} | PROSE"
    else:
        start = f"calls{_END_OK}"
    return (f"start: {start}\ncalls: {'call+' if parallel else 'call'}\n"
            f'call: "{TRIGGER}" named\nnamed: {calls}\n{rules}\n'
            "PROSE: /[^<](?s:.*)/\nPREFACE: /[^<]+/\n")


# The chat template's end marker may follow a call or a JSON answer (the template renders
# an assistant turn as its text then the marker, so a model trained on it writes the
# marker next, often in one token with the JSON's last characters, e.g. `"}<|`); it ends
# the response there (serve.engine's stop matcher) and is not part of the output.
_END_OK = f' "{END}"?'


def json_grammar(schema: dict[str, Any]) -> str:
    """The grammar of a response that is one JSON value valid for `schema`."""
    return f"start: value{_END_OK}\nvalue: %json {_compact(closed(enforceable(schema)[0]))}\n"


class CallReader:
    """Reads a response as it streams: `push(text)` returns its new pieces: ("text", s) for
    prose (a preface, or a whole text answer), and per call ("name", tool) then ("input",
    json fragment)... The first "<" decides: the trigger starts calls (each input ends
    where its JSON object closes, so a "<tool_call>" inside an input's strings is input);
    any other "<" makes the rest text."""

    def __init__(self) -> None:
        self.buf = ""
        self.mode = "text"  # text (calls may follow), prose (text to the end), name, input, gap
        self.depth, self.in_string, self.escaped = 0, False, False

    def push(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while self.buf:
            if self.mode == "prose":
                out.append(("text", self.buf))
                self.buf = ""
            elif self.mode in ("text", "gap"):
                at = self.buf.find("<") if self.mode == "text" else 0
                if at < 0:
                    out.append(("text", self.buf))
                    self.buf = ""
                    break
                if at:
                    out.append(("text", self.buf[:at]))
                    self.buf = self.buf[at:]
                if len(self.buf) < len(TRIGGER) and TRIGGER.startswith(self.buf):
                    break  # could still be the trigger
                if self.buf.startswith(TRIGGER):
                    self.buf, self.mode = self.buf[len(TRIGGER):], "name"
                else:  # not a call after all: text to the end
                    self.mode = "prose"
            elif self.mode == "name":
                if "\n" not in self.buf:
                    break
                name, self.buf = self.buf.split("\n", 1)
                out.append(("name", name))
                self.mode, self.depth, self.in_string, self.escaped = "input", 0, False, False
            else:  # input: up to the end of its JSON value
                end = self._json_end(self.buf)
                piece = self.buf if end is None else self.buf[:end]
                if piece:
                    out.append(("input", piece))
                if end is None:
                    self.buf = ""
                    break
                self.buf, self.mode = self.buf[end:], "gap"
        return out

    def _json_end(self, s: str) -> int | None:
        """Where in `s` the current input's JSON value ends (None: not in `s`), carrying
        the nesting and string state across pushes."""
        for i, c in enumerate(s):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None

    def flush(self) -> list[tuple[str, str]]:
        """What is left at the end (a response shorter than the trigger is text)."""
        if self.mode in ("text", "gap", "prose") and self.buf:
            out, self.buf = [("text", self.buf)], ""
            return out
        return []


@dataclass
class Call:
    name: str
    args: str  # the input's JSON text, as generated (may be cut off)


def parse(text: str) -> tuple[str, list[Call]]:
    """A whole response: (its text, the calls in order). A call cut off before its name
    line ended has that name and no input."""
    r = CallReader()
    prose, calls = [], []
    for kind, s in r.push(text) + r.flush():
        if kind == "text":
            prose.append(s)
        elif kind == "name":
            calls.append(Call(s, ""))
        else:
            calls[-1].args += s
    if r.mode == "name":  # cut off before the name line ended
        calls.append(Call(r.buf, ""))
    return "".join(prose), calls


def whole_calls(text: str) -> tuple[str, list[tuple[Call, Any]]] | None:
    """A finished response read as calls: (its preface, each call with its parsed input),
    or None when it holds no call or one whose input does not parse (cut off by
    max_tokens: the response stays text)."""
    prose, calls = parse(text)
    try:
        inputs = [json.loads(c.args) for c in calls]
    except json.JSONDecodeError:
        return None
    return (prose, list(zip(calls, inputs))) if calls else None
