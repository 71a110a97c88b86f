"""Multi-host start-up: `jax.distributed.initialize` from environment variables.

The same `megamesh train` command runs on every host. Set
  MEGAMESH_COORDINATOR=host:port  MEGAMESH_NUM_PROCESSES=N  MEGAMESH_PROCESS_ID=i
(or JAX's own JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
MEGAMESH_HEARTBEAT_TIMEOUT=S (default jax's 100): seconds after which a process that has
lost a peer gives up; jax then ends it, and the job restarts from its checkpoints (the
in-memory tier first: train.memory_tier). On a
multi-host TPU slice with none of these set, jax finds the coordinator itself (TPU
metadata). CPU processes talk through gloo collectives.
"""

from __future__ import annotations

import os

import jax

from megamesh.errors import ConfigError


def initialize_from_env() -> bool:
    """Join the job if the environment describes one; True when multi-process."""
    env = os.environ
    addr = env.get("MEGAMESH_COORDINATOR") or env.get("JAX_COORDINATOR_ADDRESS")
    n = env.get("MEGAMESH_NUM_PROCESSES") or env.get("JAX_NUM_PROCESSES")
    pid = env.get("MEGAMESH_PROCESS_ID") or env.get("JAX_PROCESS_ID")
    if addr:
        try:
            n_i, pid_i = int(n or ""), int(pid or "")
        except ValueError:
            raise ConfigError("MEGAMESH_COORDINATOR is set, so MEGAMESH_NUM_PROCESSES and "
                              "MEGAMESH_PROCESS_ID must be integers") from None
        if not 0 <= pid_i < n_i:
            raise ConfigError(f"MEGAMESH_PROCESS_ID={pid_i} is not allowed: must be in [0, {n_i})")
        if env.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=addr, num_processes=n_i, process_id=pid_i,
                                   heartbeat_timeout_seconds=_heartbeat(env))
        return n_i > 1
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize(heartbeat_timeout_seconds=_heartbeat(env))
        return True
    return False


def _heartbeat(env: dict[str, str]) -> int:
    raw = env.get("MEGAMESH_HEARTBEAT_TIMEOUT", "100")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"MEGAMESH_HEARTBEAT_TIMEOUT={raw!r} is not allowed: a whole number "
                          "of seconds >= 1")
    return value
