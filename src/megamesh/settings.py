"""The one config engine: dataclasses built from mappings, values coerced to their field
types, dotted overrides checked against the fields.

Used by every configuration megamesh reads (the model config, the training config, the
run spec, the fleet scenario), so each one reports a bad key or value the same way: the
error names the full key (`moe.top_k`, `jobs[1].chips`, `optimizer.lr`) and what is
allowed. Pure Python (plan and fleet import this).

- `build(cls, data)`: a mapping (from JSON, YAML or Python) into a dataclass; nested
  dataclass fields (`X`, `X | None`) and lists of dataclasses (`list[X]`) are built
  recursively; an unknown key or a missing required one is an error.
- `coerce(value, type, name)`: a value checked against a field's type; strings (from the
  command line or a YAML file) are converted (`"4"` -> 4, `"1e-3"` -> 0.001, `"true"`,
  `"none"`).
- `apply_overrides(cfg, {"moe.top_k": "1"})`: a frozen dataclass with dotted keys replaced;
  an unknown key lists the allowed ones and, when the key names a field of a section
  (`lr` in `optimizer`), where it lives.
- `dotted(data)`: a nested mapping as dotted keys, for `base:` files that start from a preset.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from megamesh.errors import ConfigError


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise `name=value is not allowed: must be <allowed>` unless ok."""
    if not ok:
        raise ConfigError(f"{name}={value!r} is not allowed: must be {allowed}")


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(typ: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(typ))
    return typ, False


def section(typ: Any) -> type | None:
    """The dataclass a field holds (through `X | None`), or None for plain fields."""
    inner, _ = _optional(typ)
    return inner if dataclasses.is_dataclass(inner) else None


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def build(cls: type, data: Any, where: str = "") -> Any:
    """An instance of dataclass `cls` from a mapping (`where`: the key prefix for errors,
    ending in "." or empty)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key {where + str(unknown[0])!r}: allowed keys are "
                          f"{', '.join(fields)}{_moved_hint(cls, str(unknown[0]), where)}")
    missing = [n for n, f in fields.items() if n not in data and _is_required(f)]
    if missing:
        raise ConfigError(f"{where.rstrip('.') or 'config'} is missing required keys: {', '.join(missing)}")
    th = hints(cls)
    kwargs = {k: coerce(v, th[k], where + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - the checks above cover missing and unknown keys
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {e}") from None


def coerce(value: Any, typ: Any, name: str) -> Any:
    """Check (and, for strings from the command line or YAML, convert) a value to a field's type."""
    typ, nullable = _optional(typ)
    if nullable and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    origin = typing.get_origin(typ)
    if dataclasses.is_dataclass(typ):
        return build(typ, value, name + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}={value!r} is not allowed: must be a list")
        (item,) = typing.get_args(typ) or (Any,)
        return [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}={value!r} is not allowed: must be a list")
        return tuple(coerce(v, float, f"{name}[{i}]") for i, v in enumerate(value))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"{name}={value!r} is not allowed: must be true or false")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is not allowed: must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if f.is_integer():
                return int(f)
        raise ConfigError(f"{name}={value!r} is not allowed: must be an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}={value!r} is not allowed: must be a number")
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} is not allowed: must be a string")
        return value
    return value


def _moved_hint(cls: type, key: str, where: str) -> str:
    """`; did you mean optimizer.lr?` when `key` is a field of one of cls's sections."""
    for name, typ in hints(cls).items():
        sub = section(typ)
        if sub is not None and key in {f.name for f in dataclasses.fields(sub)}:
            return f"; did you mean {where}{name}.{key}?"
    return ""


def apply_overrides(cfg: Any, overrides: dict[str, Any], where: str = "") -> Any:
    """Apply dotted-key overrides (`n_layers=4`, `moe.top_k=1`) to a frozen config dataclass.

    Values from the command line are strings and are converted to each field's type; an
    unknown key is an error listing the allowed ones.
    """
    cls = type(cfg)
    th = hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in fields:
            raise ConfigError(f"unknown override key {where + key!r}: allowed keys are "
                              f"{', '.join(where + f for f in fields)}{_moved_hint(cls, head, where)}")
        if rest:
            if section(th[head]) is None:
                raise ConfigError(f"unknown override key {where + key!r}: {where + head!r} has no sub-keys")
            nested.setdefault(head, {})[rest] = value
        else:
            changes[head] = coerce(value, th[head], where + key)
    for head, sub in nested.items():
        current = changes.get(head, getattr(cfg, head))
        if current is None:
            raise ConfigError(f"cannot override {where + head}.* on a config without {where + head}; "
                              f"set {where + head} first")
        changes[head] = apply_overrides(current, sub, where + head + ".")
    try:
        return dataclasses.replace(cfg, **changes)
    except TypeError as e:  # pragma: no cover
        raise ConfigError(str(e)) from e


def dotted(data: dict[str, Any], cls: type, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted override keys (`{"moe": {"top_k": 1}}` -> `moe.top_k`);
    only the sections of `cls` are opened, other mappings stay values."""
    th = hints(cls)
    out: dict[str, Any] = {}
    for k, v in data.items():
        sub = section(th[k]) if k in th else None
        if isinstance(v, dict) and sub is not None:
            out.update(dotted(v, sub, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def parse_overrides(items: list[str], prefix: str = "") -> dict[str, str]:
    """Parse `key=value` strings (optionally with a required `prefix.`) into a dict."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not allowed: must look like key=value")
        key = key.lstrip("-")
        if prefix:
            if not key.startswith(prefix + "."):
                raise ConfigError(f"override {item!r} must start with {prefix}.")
            key = key[len(prefix) + 1:]
        out[key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass as plain JSON-ready values (tuples as lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))
