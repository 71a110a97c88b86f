"""Files: reading JSON/YAML inputs with clear errors, and writing outputs without ever
losing data (never overwrite, never leave half a file)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from megamesh.errors import ConfigError


def write_new_file(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to a new file at `path` atomically; an existing file is an error."""
    p = Path(path)
    if p.exists():
        raise ConfigError(f"{p} already exists: megamesh does not overwrite outputs; choose "
                          "another path or remove it")
    p.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, p)  # fails if p appeared meanwhile: never clobbers
    finally:
        os.unlink(tmp)
    return p


def read_json_or_yaml(path: str | Path, what: str) -> Any:
    """The data in a `.json` file, or YAML for any other suffix; a missing or unparsable
    file is a ConfigError naming `what` (e.g. "config file", "--scenario")."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    text = p.read_text()
    kind = "JSON" if p.suffix == ".json" else "YAML"
    try:
        if kind == "JSON":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 -- json.JSONDecodeError, yaml.YAMLError: the user's file
        raise ConfigError(f"{what} {str(p)!r} is not valid {kind}: {e}") from None
