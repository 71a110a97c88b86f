"""The host gap per training step: how long the device waits for the host each step.

  python bench/host_gap.py --before DIR [--rounds 3] [--steps 60] [--devices 8]
  python bench/host_gap.py --platform native     # on a GPU (megamesh train needs the
                                                 # wheels of bench/gpu_wheels.sh there)

For each tree (`--before DIR`, a checkout of an earlier megamesh, and this one), in
alternation, `--rounds` times:
- loop: `megamesh train` (that tree's) on `--devices` CPU devices, a small model on the
  test corpus, no checkpoint or evaluation before the end; the loop's time per step is
  the median interval between consecutive metrics records (their `wall_s`) after the
  first 5 steps and before the last 2.
- device: the same jitted step (`build_train_step` of that tree) dispatched back to back
  on one fixed batch, read once at the end: what the devices need per step with no
  host work in between.
Host gap = loop - device, per step (an estimate from timestamps, not a profiler trace;
on CPU the "device" shares the host's cores, so host work also slows the step itself).
Medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "corpus"
MODEL = {"d_model": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 256, "vocab_size": 1024}
BATCH, SEQ = 16, 64


PLATFORM = {"name": "cpu"}  # --platform: cpu (--devices fake devices) or the machine's own


def env_for(tree: Path, devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree / "src"), os.environ.get("PYTHONPATH")) if p)
    if PLATFORM["name"] == "cpu":
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["JAX_PLATFORMS"] = "cpu"
    return env


def loop_seconds(tree: Path, steps: int, devices: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "megamesh.cli", "train", "--out", str(out), "--data", str(CORPUS),
               *[f"--model.{k}={v}" for k, v in MODEL.items()], "--train.data.tokenizer_vocab=1024",
               "--batch", str(BATCH), "--seq", str(SEQ), "--steps", str(steps),
               f"--train.checkpoint.every={steps}", f"--train.eval.every={steps}",
               "--no-progress", "--train.log_every=1000"]
        r = subprocess.run(cmd, env=env_for(tree, devices), capture_output=True, text=True, timeout=900)
        if r.returncode:
            raise SystemExit(f"{tree}: megamesh train failed: {r.stderr[-1500:]}")
        walls = [json.loads(ln)["wall_s"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steady = walls[5:-2]
    return statistics.median(b - a for a, b in zip(steady, steady[1:]))


def device_seconds(tree: Path, steps: int, devices: int) -> float:
    r = subprocess.run([sys.executable, __file__, "--worker", str(steps)], env=env_for(tree, devices),
                       capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise SystemExit(f"{tree}: the back-to-back worker failed: {r.stderr[-1500:]}")
    return float(json.loads(r.stdout.splitlines()[-1])["per_step_s"])


def worker(steps: int) -> None:
    import dataclasses

    import jax
    import numpy as np

    from megamesh.config import preset
    from megamesh.settings import apply_overrides
    from megamesh.sharding.mesh import make_mesh
    from megamesh.train.config import TrainConfig
    from megamesh.train.step import build_train_step

    cfg = dataclasses.replace(preset("tiny"), **MODEL)
    tc = apply_overrides(TrainConfig(), {"global_batch": BATCH, "seq_len": SEQ, "steps": 1000}, "train.")
    ts = build_train_step(cfg, tc, make_mesh())
    state = ts.init(jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 1024, (BATCH, SEQ + 1), dtype=np.int32)
    batch = jax.make_array_from_callback(tokens.shape, ts.batch_sharding, lambda i: tokens[i])
    for _ in range(5):  # compile and warm up
        state, m = ts.fn(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = ts.fn(state, batch)
        if i % 10 == 9:  # a bounded queue (8 CPU devices on a loaded host can starve a collective)
            jax.block_until_ready(m)
    jax.block_until_ready((state, m))
    print(json.dumps({"per_step_s": (time.perf_counter() - t0) / steps}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", help="a checkout of the earlier megamesh to compare")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--platform", default="cpu", choices=("cpu", "native"),
                    help="cpu: --devices fake CPU devices; native: the machine's own (a GPU)")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    PLATFORM["name"] = args.platform
    if args.worker:
        worker(args.worker)
        return 0
    trees = {"this tree": ROOT}
    if args.before:
        trees = {"before": Path(args.before).resolve(), **trees}
    got: dict[str, dict[str, list[float]]] = {name: {"loop": [], "device": []} for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            got[name]["loop"].append(loop_seconds(tree, args.steps, args.devices))
            got[name]["device"].append(device_seconds(tree, args.steps, args.devices))
    where = f"{args.devices} CPU devices" if args.platform == "cpu" else "the machine's devices"
    print(f"model {MODEL}, batch {BATCH}x{SEQ}, {where}, {args.steps} steps, "
          f"medians of {args.rounds} rounds")
    print("| tree | loop ms/step | device ms/step | host gap ms/step | gap share |")
    print("|---|---|---|---|---|")
    for name, g in got.items():
        lp, dv = statistics.median(g["loop"]), statistics.median(g["device"])
        print(f"| {name} | {lp * 1e3:.1f} | {dv * 1e3:.1f} | {(lp - dv) * 1e3:.1f} | {(lp - dv) / lp:.0%} |")
    print(json.dumps(got))
    return 0


if __name__ == "__main__":
    sys.exit(main())
