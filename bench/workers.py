"""Measurements in child processes that cannot waste a rarely lent accelerator's time.

Used by bench/gpu_train.py and bench/gpu_serve.py (run as scripts: this directory is on
sys.path). Each measurement is one child process with a fresh allocator: an
out-of-memory or a crash ends that row only; a hung compile or kernel is killed, with
its whole process group (torch.compile's workers too), when its timeout passes; and each
finished row is appended to a JSONL file at once, so a run cut short still brings back
everything it measured. A budget for the whole run stops new rows from starting when
too little time is left for them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def error_row(e: BaseException) -> dict:
    """What a worker prints when its measurement raised: out of memory is a result too."""
    msg = str(e) or type(e).__name__
    oom = "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()
    return {"error": ("out of memory: " if oom else "") + msg[:400], "oom": oom}


def emit(row: dict) -> None:
    """A worker's one result line (the parent reads the last line starting with '{')."""
    print(json.dumps(row), flush=True)


# What the GPU machine's image lacks among megamesh's dependencies (its package list as
# read in 2026-11: Python 3.12, jax 0.11.2, torch, transformers, optax, orbax, flax;
# bench/gpu_wheels.sh builds these as wheels to carry). The benchmark
# workers that measure the step and the engine must load none of them.
NOT_ON_GPU_IMAGE = ("grain", "llguidance", "fastapi", "uvicorn", "starlette", "pydantic",
                    "anthropic", "jsonschema", "tensorboardX")


def not_loaded(*modules: str) -> list[str]:
    """Which of `modules` (default: NOT_ON_GPU_IMAGE) this process has imported."""
    return sorted(m for m in modules or NOT_ON_GPU_IMAGE if m in sys.modules)


def timeouts_for(default: float, items: list[str], systems: tuple[str, ...]) -> dict[str, float]:
    """Each system's worker timeout: `default`, or S from a `--timeout-for SYSTEM=S` item.
    A bad item exits with status 2 and a line naming it."""
    out = dict.fromkeys(systems, default)
    for item in items:
        name, _, sec = item.partition("=")
        try:
            seconds = float(sec)
        except ValueError:
            seconds = -1.0
        if name not in systems or seconds <= 0:
            print(f"--timeout-for {item!r} is not allowed: SYSTEM=SECONDS with SYSTEM one of "
                  f"{', '.join(systems)} and SECONDS > 0", file=sys.stderr)
            raise SystemExit(2)
        out[name] = seconds
    return out


class Budget:
    """Seconds left for the whole run; a row starts only if `min_start_s` remain."""

    def __init__(self, seconds: float | None, min_start_s: float = 20.0):
        self.end = None if seconds is None else time.monotonic() + seconds
        self.min_start_s = min_start_s

    def timeout(self, row_timeout_s: float) -> float | None:
        """The row's timeout within the budget; None: too little left to start it."""
        if self.end is None:
            return row_timeout_s
        left = self.end - time.monotonic()
        return None if left < self.min_start_s else min(row_timeout_s, left)


def run_worker(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> dict:
    """Run one worker; its last JSON line, or an error row (timed out, crashed)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=env)
    try:
        out, err = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = p.communicate()
        return {"error": f"timed out after {timeout_s:g} s (killed)", "timed_out": True,
                "oom": False, "wall_s": time.monotonic() - t0, "stderr_tail": err[-400:]}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": f"exit {p.returncode}: {err[-600:]}", "oom": False,
                "wall_s": time.monotonic() - t0}
    row = json.loads(lines[-1])
    row["wall_s"] = time.monotonic() - t0
    return row


class Rows:
    """A JSONL results file: a header line, then one line per measurement, each written
    and flushed as soon as it exists. An existing file is never overwritten."""

    def __init__(self, path: str | None, header: dict[str, Any]):
        self.path = Path(path) if path else None
        self.rows: list[dict] = []
        if self.path is not None:
            if self.path.exists():
                raise SystemExit(f"--out {str(self.path)!r} exists: results are never "
                                 "overwritten; choose another file")
            self._write({"header": header})

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is not None:
            self._write(row)

    def _write(self, obj: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(obj) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_rows(path: str) -> tuple[dict, list[dict]]:
    """(header, rows) of a results file; a last line cut short by a kill is ignored."""
    header, rows = {}, []
    for line in Path(path).read_text().splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "header" in obj:
            header = obj["header"]
        else:
            rows.append(obj)
    return header, rows


def compilation_cache_env(directory: str | None) -> dict[str, str]:
    """The environment for workers: jax's persistent compilation cache in `directory`
    (a repeated row of the same shape does not compile again)."""
    env = dict(os.environ)
    if directory:
        env["JAX_COMPILATION_CACHE_DIR"] = directory
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    return env
