"""Checkpoints of a training run: Orbax saves verified by a manifest, restored onto any
mesh, Orbax's own reports routed to a file. The in-memory tier of the same checkpoints is
`train.memory_tier`; the run directory and its tokenizer are `megamesh.rundir`.

Layout of one: OUT/checkpoints/<step>/{state, meta}. `state` is the train state (params,
optimizer state, counters) as sharded arrays; `meta` is JSON: the model and train
configs, the data position (batches consumed) and the corpus fingerprint.

Orbax writes each step into a temporary directory and renames it into place only when
every array is on disk, so a save interrupted at any moment (SIGKILL included) leaves
no directory that `latest_step` would pick: restore falls back to the previous good
checkpoint. Restoring takes target shardings, so a checkpoint written on one mesh or
device count restores onto another (Orbax reshards).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
import traceback
import warnings
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from megamesh.config import LEGACY_KEYS
from megamesh.errors import MegameshError


class CheckpointMismatch(MegameshError):
    """The checkpoint is of a different model than the one asked for."""


class CheckpointError(MegameshError):
    """A checkpoint cannot be written, or no checkpoint of a run can be read (one line)."""

    exit_code = 1


MANIFEST = "megamesh_manifest.json"  # in each step directory, written once Orbax committed it


def file_crc32(path: Path) -> str:
    """CRC-32 of a file's bytes as 8 hex digits (read in 4 MiB chunks): the checksum of
    checkpoint manifests and of the packed corpus."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: Path) -> None:
    """Record the size and CRC-32 of every file of a committed checkpoint (atomically)."""
    files = {str(p.relative_to(step_dir)): [p.stat().st_size, file_crc32(p)] for p in _files(step_dir)}
    tmp = step_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST)


def verify(step_dir: Path, *, full: bool = True) -> str | None:
    """Why the checkpoint in `step_dir` is not intact (None: it is): a file missing, added,
    of another size or (with `full`) another CRC-32 than its manifest records."""
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return "no manifest (not verified after saving)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its manifest is unreadable ({type(e).__name__})"
    for rel, (size, crc) in files.items():
        p = step_dir / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size:,} bytes, {size:,} when saved"
        if full and file_crc32(p) != crc:
            return f"{rel} does not match its checksum"
    extra = [str(p.relative_to(step_dir)) for p in _files(step_dir) if str(p.relative_to(step_dir))
             not in files]
    if extra:
        return f"{extra[0]} was not part of it when saved"
    return None


class _ToFile(logging.Handler):
    """Orbax's own error reports (tracebacks from its background threads) go to a file in
    the run, not the terminal: megamesh prints one line; the details stay on disk."""

    def __init__(self, path: Path):
        super().__init__(logging.WARNING)
        self.path = path
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with open(self.path, "a") as f:
                f.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 -- a full disk, or at exit a torn-down module
            pass  # the disk this is about may be full: the one-line error still says why


_ROUTED: dict[Path, int] = {}  # files Orbax's reports go to now, and how many blocks route there


@contextlib.contextmanager
def orbax_log_to(path: Path):
    """Within the block, Orbax's warnings and errors (its absl logging, asyncio's reports of
    its failed writer tasks, exceptions its threads print, the RuntimeWarning for a writer
    coroutine abandoned by a failed save) go to `path`, not stderr: megamesh prints one
    line, the details stay on disk. Reentrant: a block inside another routing to the same
    file adds nothing (one handler per file). `megamesh train` routes for the whole process
    (`cli.train`): a failed save's abandoned writers are reported when they are collected,
    up to exit."""
    path = Path(path).absolute()
    if _ROUTED.get(path):
        _ROUTED[path] += 1
        try:
            yield
        finally:
            _ROUTED[path] -= 1
        return
    # absl: Orbax's logging; asyncio: "Task exception was never retrieved" from its writers
    loggers = [logging.getLogger(n) for n in ("absl", "asyncio")]
    handler, hook = _ToFile(path), sys.excepthook
    propagate = [lg.propagate for lg in loggers]

    # what the hooks call, bound now: at exit they run after module globals are cleared
    record, fmt = logging.LogRecord, traceback.format_exception
    error, warning = logging.ERROR, logging.WARNING

    def to_file(kind: Any, value: Any, tb: Any) -> None:  # errors tensorstore's threads print
        try:
            handler.emit(record("thread", error, "", 0, "".join(fmt(kind, value, tb)), None, None))
        except Exception:  # noqa: BLE001 -- a report must never become a second error
            pass

    def unraisable(u: Any) -> None:
        to_file(u.exc_type, u.exc_value, u.exc_traceback)

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:  # Orbax's abandoned writer coroutines, collected at exit
        if issubclass(category, RuntimeWarning) and "was never awaited" in str(message):
            try:
                handler.emit(record("warnings", warning, filename, lineno,
                                    f"{category.__name__}: {message}", None, None))
            except Exception:  # noqa: BLE001
                pass
        else:
            shown(message, category, filename, lineno, file, line)

    for lg in loggers:
        lg.addHandler(handler)
        lg.propagate = False
    sys.excepthook, unraisable_hook = to_file, sys.unraisablehook
    sys.unraisablehook = unraisable
    shown, warnings.showwarning = warnings.showwarning, show
    _ROUTED[path] = 1
    try:
        yield
    finally:
        # locals only, first: a route kept for the whole process (`cli.train`) is undone
        # when its generator is collected at exit, after module globals may be gone
        for lg, p in zip(loggers, propagate):
            lg.removeHandler(handler)
            lg.propagate = p
        sys.excepthook, sys.unraisablehook = hook, unraisable_hook
        warnings.showwarning = shown
        try:
            del _ROUTED[path]
        except Exception:  # noqa: BLE001 -- at exit the module's dict may already be cleared
            pass


def one_line(e: BaseException) -> str:
    """The cause of a storage error in a few words: the OS error and file when the message
    (tensorstore's, through Orbax) names them, else its first line, shortened."""
    text = str(e).strip()
    code = re.search(r"os_error_code='(\d+)'", text)
    if code:
        where = re.search(r'Failed (?:writing|reading|to open): "([^"]+)"', text)
        return os.strerror(int(code.group(1))) + (f" ({where.group(1)})" if where else "")
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} ({e.filename})" if e.filename else e.strerror
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


class Checkpointer:
    """Orbax checkpoints, each verified after it is committed and before it is restored.

    Every committed step gets a manifest (size and CRC-32 of each file). Restoring walks
    from the newest step down: a checkpoint that fails verification or cannot be read is
    skipped with one line naming it and why (`log`), and the newest good one is used.
    Rotation keeps the newest `keep` verified checkpoints and never deletes the newest
    good one; a checkpoint is written only from a state the caller vouches for (the train
    loop saves finite states only). Process 0 writes manifests and rotates.
    """

    def __init__(self, directory: str | Path, keep: int, use_async: bool = True,
                 log: Any = print):
        self.directory = Path(directory).absolute()
        self.keep, self.log = keep, log
        self._pending: list[int] = []  # saved, not yet rotated
        self._last = "?"  # the step of the newest save started: a failure names it
        self._failed = False  # a failed save was reported: nothing more to say of it
        self._manifested: set[int] = set()  # the pending saves whose manifest is written
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=None,  # rotation: _rotate
                                                     enable_async_checkpointing=use_async,
                                                     create=True),
            )
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoints to {self.directory}: "
                                  f"{e.strerror or e}") from None

    # ------------------------------------------------------------------ what is on disk

    def all_steps(self) -> list[int]:
        """Committed steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        """The newest committed step (verified or not)."""
        steps = self.all_steps()
        return steps[0] if steps else None

    def latest_good_step(self) -> int | None:
        """The newest step whose files match its manifest."""
        return next((s for s in self.all_steps() if verify(self.step_dir(s)) is None), None)

    def candidates(self):
        """Steps to restore from, newest first: verified ones, and ones without a manifest
        (saved by an older megamesh, or cut off between commit and verification: restored
        if they read); a step failing verification is skipped with one line."""
        for step in self.all_steps():
            why = verify(self.step_dir(step))
            if why is None or why.startswith("no manifest"):
                yield step, why is None
            else:
                self.log(f"skipping checkpoint {self.step_dir(step)}: {why}")

    def restore_newest(self, fn: Any) -> tuple[int, Any] | None:
        """fn(step) on the newest checkpoint it succeeds on: (step, result); None when the
        run has no checkpoint; CheckpointError (one line) when none of them can be read."""
        for step, verified in self.candidates():
            if not verified:
                self.log(f"checkpoint {self.step_dir(step)} has no manifest (saved by an older "
                         "megamesh, or stopped before verifying it): restoring it unverified")
            try:
                return step, fn(step)
            except MegameshError:  # the user's mistake (another model, other data): say so
                raise
            except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint: try the older one
                self.log(f"skipping checkpoint {self.step_dir(step)}: cannot read it "
                         f"({one_line(e)})")
        if self.all_steps():
            raise CheckpointError(f"no good checkpoint in {self.directory}: all "
                                  f"{len(self.all_steps())} failed verification or reading "
                                  f"(see above); start a new --out, or remove the bad ones")
        return None

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state: Any, meta: dict[str, Any], *, wait: bool = False) -> float:
        """Start saving (async unless `wait`); returns the seconds the caller was blocked.
        A failed write is a CheckpointError naming the directory and the cause."""
        t0 = time.perf_counter()
        if self._pending:  # a background save still running: its outcome first
            self.wait()
        try:
            self._last = str(step)
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=True)
            self._pending.append(step)
            if wait:
                self.wait()
            else:
                self.poll()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 -- disk full, permissions, storage errors
            raise self._failure(str(step), e) from None
        return time.perf_counter() - t0

    def _failure(self, step: str, e: BaseException | None) -> CheckpointError:
        """The one-line error for a failed save of `step` (cause `e`: its OS error), after
        which this checkpointer reports nothing more of it: a background write fails once,
        but Orbax raises it again from every later wait, and a second report (from `close`
        in the train loop's clean-up) would replace the first."""
        self._pending, self._failed = [], True
        why = one_line(e) if e is not None else "it was never committed"
        return CheckpointError(f"saving checkpoint {self.directory / step} failed: {why}; the "
                               "previous good checkpoint is intact")

    def poll(self) -> None:
        """Report a failed background save now (CheckpointError), and write the manifests
        of saves that have finished. Cheap when nothing finished; call once per step. Local
        to each process (no collective: processes may see a save finish at different
        steps); rotation happens in `wait`, where every process is at the same point."""
        if not self._pending or self.manager.is_saving_in_progress():
            return
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._failure(str(self._pending[-1]), e) from None
        lost = [s for s in self._pending if not self.step_dir(s).is_dir()]
        if lost:  # finished, not committed: its error, if Orbax kept one, says why
            try:
                self.manager.wait_until_finished()
            except Exception as e:  # noqa: BLE001
                raise self._failure(str(lost[0]), e) from None
            raise self._failure(str(lost[0]), None)
        self._write_manifests()

    def _write_manifests(self) -> None:
        """Process 0 records the manifest of every finished save not yet recorded."""
        if jax.process_index() != 0:
            return
        step = None
        try:
            for step in self._pending:
                if step not in self._manifested:
                    write_manifest(self.step_dir(step))
                    self._manifested.add(step)
        except OSError as e:
            raise CheckpointError(f"verifying checkpoint {self.step_dir(step)} failed: "
                                  f"{e.strerror or e}") from None

    def _rotate(self) -> None:
        """Keep the newest `keep` intact checkpoints (sizes checked against manifests); delete
        older ones, never the newest good one. Process 0 decides; every process then deletes
        the same steps in the same order (Orbax's delete is collective)."""
        doomed: list[int] = []
        if jax.process_index() == 0:
            kept = 0
            for step in self.all_steps():
                if kept >= self.keep:
                    doomed.append(step)
                elif verify(self.step_dir(step), full=False) is None:
                    kept += 1
        for step in from_process0(doomed):
            self.manager.delete(step)

    # ------------------------------------------------------------------ reading

    def read_meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore onto the shardings in `abstract_state` (ShapeDtypeStructs with .sharding)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the model parameters of a checkpoint (no optimizer state), cast to the
        dtypes and placed on the shardings of `abstract_params` (serving)."""
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype, global_shape=a.shape),
            abstract_params)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args},
            partial_restore=True)))
        return out["state"]["params"]

    def wait(self) -> None:
        """Block until every save has finished, been verified and rotated. Every process
        calls it at the same point (after the same saves)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            if self._failed:  # reported already (Orbax raises a failed write at every wait)
                self._pending = []
                return
            raise self._failure(str(self._pending[-1]) if self._pending else self._last, e) from None
        if not self._pending:
            return
        self.poll()  # errors, manifests
        self._pending, self._manifested = [], set()
        self._rotate()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def from_process0(values: list[int]) -> list[int]:
    """Process 0's list of (at most 256) non-negative integers on every process, whatever
    the others hold (a broadcast of a fixed-size padded array; local when single)."""
    if jax.process_count() == 1:
        return values
    padded = np.full(256, -1, np.int64)
    padded[:len(values)] = values[:256]
    got = np.asarray(multihost_utils.broadcast_one_to_all(padded))
    return [int(x) for x in got if x >= 0]


def check_same_model(saved: dict[str, Any], wanted: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose model differs in any shape-defining field."""
    # names and the compute dtype do not shape the weights; LEGACY_KEYS were run settings
    ignore = {"name", "description", "compute_dtype", "published_params", "published_source",
              *LEGACY_KEYS}
    diff = sorted(k for k in set(saved) | set(wanted)
                  if k not in ignore and saved.get(k) != wanted.get(k))
    if diff:
        k = diff[0]
        raise CheckpointMismatch(
            f"checkpoint in {where} is of a different model: {k}={saved.get(k)!r} there, "
            f"{wanted.get(k)!r} asked for (use the same --model, or a new --out)")
