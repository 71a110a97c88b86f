"""Writing output files without ever losing data: never overwrite, never leave half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
