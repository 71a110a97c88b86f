"""Checkpoint save and restore times per GB, by tier, measured on this machine.

Two localhost processes x 2 CPU devices, mesh dcn=2,fsdp=2: each process is one
data-parallel replica and holds a full copy of a train state of --gb GB (float32, split
over its 2 devices), as a 2-slice job holds it. Per run, in fresh processes each phase:

  save        the in-memory tier (megamesh.train.memory_tier, Orbax's P2P emergency
              manager writing to /dev/shm) and the persistent tier (megamesh.train.checkpoint.Checkpointer:
              Orbax to disk, then the manifest's CRC-32 of every file), each until on disk
  own RAM     both processes restore from their own RAM copy
  peer        process 1's RAM copy is deleted (a replaced host): it fetches process 0's
              copy over TCP (127.0.0.1 here; the data-center network on real hardware)
  persistent  both restore from the Orbax checkpoint on disk

Times include creating the manager (which exchanges the holdings between processes and,
for a peer restore, starts the fetch). Reported: median over --runs of seconds per GB held
by one process, and each tier's ratio to the persistent tier in the same run. What it does
not measure: device-to-host copies (CPU arrays are already in host memory) and a real
network (localhost TCP is a memory copy; `fleet` scales peer restores by the chip's DCN
bandwidth instead). Usage:

    python bench/recovery.py --gb 1 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(phase: str, work: Path, gb: float) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from megamesh.sharding.mesh import make_mesh
    from megamesh.train.checkpoint import Checkpointer
    from megamesh.train.distributed import initialize_from_env
    from megamesh.train.memory_tier import MemoryTier

    initialize_from_env()
    mesh = make_mesh("dcn=2,fsdp=2")
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp"))
    n = int(gb * 2**30 / 4 / 1024) // 2 * 2  # rows of 1024 float32, even (2 devices)
    abstract = {"w": jax.ShapeDtypeStruct((1024, n), jnp.float32, sharding=sharding)}
    ram_dir = work / "ram" / f"process-{jax.process_index()}"
    result: dict[str, float] = {"bytes": 1024 * n * 4}
    t0 = time.perf_counter()
    if phase == "save":
        state = {"w": jax.jit(lambda: jnp.full((1024, n), 1.5, jnp.float32),
                              out_shardings=sharding)()}
        jax.block_until_ready(state)
        tier = MemoryTier(ram_dir, mesh, abstract, every=1)
        t0 = time.perf_counter()
        tier.save(1, state)
        tier.wait()
        result["ram_save_s"] = time.perf_counter() - t0
        tier.close()
        ckpt = Checkpointer(work / "persistent", keep=1, log=lambda m: None)
        t0 = time.perf_counter()
        ckpt.save(1, state, {"data_step": 1}, wait=True)
        ckpt.close()
        result["persistent_save_s"] = time.perf_counter() - t0
    elif phase in ("own", "peer"):
        tier = MemoryTier(ram_dir, mesh, abstract, every=1)
        step = tier.latest_step()
        held = tier.holds(step)
        result[f"{phase}_setup_s"] = time.perf_counter() - t0
        state = tier.restore(step)
        jax.block_until_ready(state)
        result[f"{phase}_restore_s"] = time.perf_counter() - t0
        result["held"] = held
        assert float(np.asarray(state["w"].addressable_shards[0].data)[0, 0]) == 1.5
        tier.close()
    else:
        ckpt = Checkpointer(work / "persistent", keep=1, log=lambda m: None)
        state, _ = ckpt.restore(1, abstract)
        jax.block_until_ready(state)
        result["persistent_restore_s"] = time.perf_counter() - t0
        ckpt.close()
    print("RESULT " + json.dumps(result), flush=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phase(name: str, work: Path, gb: float) -> list[dict]:
    port, procs = _port(), []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   MEGAMESH_COORDINATOR=f"127.0.0.1:{port}", MEGAMESH_NUM_PROCESSES="2",
                   MEGAMESH_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", name, "--work",
                                       str(work), "--gb", str(gb)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        if p.returncode:
            sys.exit(f"{name} phase failed:\n{stderr[-3000:]}")
        out.append(json.loads(next(x for x in stdout.splitlines() if x.startswith("RESULT "))[7:]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="state held by each process, GB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--worker")
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, Path(args.work), args.gb)
    rows = []
    for _ in range(args.runs):
        work = Path(tempfile.mkdtemp(prefix="megamesh-recovery-", dir="/dev/shm"
                                     if os.path.isdir("/dev/shm") else None))
        persistent_root = Path(tempfile.mkdtemp(prefix="megamesh-recovery-disk-"))
        try:
            (work / "persistent").symlink_to(persistent_root)  # the persistent tier on disk
            save = phase("save", work, args.gb)
            own = phase("own", work, args.gb)
            shutil.rmtree(work / "ram" / "process-1")  # process 1's host is replaced
            peer = phase("peer", work, args.gb)
            persistent = phase("persistent", work, args.gb)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(persistent_root, ignore_errors=True)
        gb_held = save[0]["bytes"] / 1e9
        assert own[1]["held"] and not peer[1]["held"], "process 1 should have fetched from its peer"
        rows.append({
            "ram_save": max(r["ram_save_s"] for r in save) / gb_held,
            "persistent_save": max(r["persistent_save_s"] for r in save) / gb_held,
            "own_ram_restore": max(r["own_restore_s"] for r in own) / gb_held,
            "peer_restore": peer[1]["peer_restore_s"] / gb_held,
            "persistent_restore": max(r["persistent_restore_s"] for r in persistent) / gb_held,
        })
        print(json.dumps({k: round(v, 3) for k, v in rows[-1].items()}), flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    import jax
    import orbax.checkpoint as ocp
    print(f"\nseconds per GB held by one process, median of {len(rows)} runs "
          f"({args.gb:g} GB per process; jax {jax.__version__}, orbax-checkpoint {ocp.__version__}):")
    for k, v in med.items():
        base = med["persistent_save"] if "save" in k else med["persistent_restore"]
        print(f"  {k:20s} {v:7.3f} s/GB   {v / base:5.2f}x of persistent")


if __name__ == "__main__":
    main()
