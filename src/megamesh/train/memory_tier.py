"""The in-memory checkpoint tier: a copy of the train state in host RAM every few steps,
recoverable from a peer when the host itself is lost.

Multi-tier checkpointing as GKE's multi-tier checkpoints and Orbax's emergency
checkpointing do it, built on Orbax's own P2P emergency checkpoint manager
(`orbax.checkpoint.experimental.emergency.p2p`, in the pinned orbax-checkpoint):

  tier 1, own RAM     every `checkpoint.ram_every` steps each process writes the shards it
                      holds to a memory-backed directory (/dev/shm by default: it outlives
                      the process, not the host)
  tier 2, a peer      a process whose RAM copy is gone (a replaced host) fetches the same
                      shards over TCP from a process of another replica that holds them:
                      data-parallel replicas across the replica axis (`dcn`, else `data`)
                      hold identical state, so every replica is the others' backup
  tier 3, persistent  the Orbax checkpoint under OUT/checkpoints (`train.checkpoint.Checkpointer`),
                      written every `checkpoint.every` steps

Restore order (`train.loop`): the newest of RAM/peer and persistent; RAM or peer when it
is newer; if any process cannot read its RAM or peer copy, every process falls back to the
persistent checkpoint together. With one replica (no data-parallel axis across processes)
a lost host's shards exist nowhere else: tier 2 cannot help and the persistent checkpoint
is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.experimental.emergency.p2p import args as p2p_args
from orbax.checkpoint.experimental.emergency.p2p import checkpoint_manager as p2p
from orbax.checkpoint.experimental.emergency.p2p import options as p2p_options

from megamesh.errors import ConfigError

SHM = Path("/dev/shm")
REPLICA_AXES = ("dcn", "data")  # mesh axes across which the train state is replicated


def process_directory(out: Path, base: str = "") -> Path:
    """Where this process keeps its RAM copy: BASE/process-<i>, one directory per process
    as each host has its own RAM. BASE (`train.checkpoint.ram_dir`) defaults to
    /dev/shm/megamesh-<hash of OUT> (memory-backed); without /dev/shm, OUT/ram (on disk,
    which the run says)."""
    if not base:
        key = hashlib.sha1(str(Path(out).absolute()).encode()).hexdigest()[:12]
        shm = SHM.is_dir() and os.access(SHM, os.W_OK)
        base = str(SHM / f"megamesh-{key}" if shm else Path(out) / "ram")
    return Path(base) / f"process-{jax.process_index()}"


def replica_axis(mesh: Any) -> int:
    """The mesh axis whose replicas back each other up: the first of REPLICA_AXES that has
    more than one member (0, `dcn`, when none does: one replica, no peer copy)."""
    for name in REPLICA_AXES:
        if mesh.shape[name] > 1:
            return list(mesh.axis_names).index(name)
    return list(mesh.axis_names).index(REPLICA_AXES[0])


class MemoryTier:
    """Tiers 1 and 2 (module docstring) for one run; every process creates one."""

    def __init__(self, directory: str | Path, mesh: Any, abstract_state: Any, *, every: int,
                 keep: int = 1, fresh: bool = False):
        self.directory = Path(directory).absolute()
        self.every = every
        self.abstract_state = abstract_state
        if fresh and self.directory.exists():  # an earlier attempt at a run now started anew
            shutil.rmtree(self.directory, ignore_errors=True)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"train.checkpoint.ram_dir {str(self.directory)!r} cannot be "
                              f"written: {e.strerror or e}") from None
        self.on_disk = not str(self.directory).startswith(str(SHM) + os.sep)
        options = p2p_options.CheckpointManagerOptions(
            local=p2p_options.LocalCheckpointOptions(save_interval_steps=every, max_to_keep=keep),
            replica_axis_index=replica_axis(mesh))
        self.manager = p2p.CheckpointManager(mesh, abstract_state, self.directory, None,
                                             options=options)

    def save(self, step: int, state: Any) -> float:
        """Start writing `state` as `step` (asynchronous); the seconds the caller waited."""
        t0 = time.perf_counter()
        self.manager.save(step, args=p2p_args.Composite(state=ocp.args.PyTreeSave(state)),
                          force=True)
        return time.perf_counter() - t0

    def latest_step(self) -> int | None:
        """The newest step of which every shard is held by some process (the same answer on
        every process: the holdings are exchanged when the manager starts)."""
        return self.manager.latest_step()

    def holds(self, step: int) -> bool:
        """Whether this process's own RAM copy holds `step` (else it comes from a peer)."""
        return (self.directory / str(step) / "state").is_dir()

    def restore(self, step: int) -> Any:
        """The state of `step` from own RAM or a peer, on the shardings of abstract_state."""
        out = self.manager.restore(step, args=p2p_args.Composite(
            state=ocp.args.PyTreeRestore(self.abstract_state)))
        return out["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self, *, discard: bool = False) -> None:
        """Finish pending writes; `discard`: free the RAM (the run is complete)."""
        try:
            self.manager.close()
        finally:
            if discard:
                shutil.rmtree(self.directory, ignore_errors=True)
                with contextlib.suppress(OSError):  # the run's directory, once every process left
                    self.directory.parent.rmdir()
