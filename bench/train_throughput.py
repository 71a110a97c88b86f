"""Training tokens/s on this CPU: megamesh vs MaxText on the same model and batch.

The model (MaxText's flags in brackets): d_model 256 [base_emb_dim], 4 heads of 64
[base_num_query_heads, head_dim], 4 KV heads, d_ff 1024 [base_mlp_dim], 4 layers,
vocab 32000, sequence 256 [max_target_length], 4 sequences per device
[per_device_batch_size], synthetic data. Settings: 1 device; 8 fake CPU devices with
all 8 on fsdp [ici_fsdp_parallelism=8].

Each run reports the median step time over steps >= 2 (steps 0 and 1 compile and warm
up); runs of the two systems alternate (A B A B ...) so drift on a shared machine hits
both, and the reported figure is the median over runs. Usage:

    python bench/train_throughput.py --maxtext-python /path/to/py312-venv/bin/python --runs 3

Without --maxtext-python only megamesh is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

MODEL = {"d_model": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 4, "head_dim": 64,
         "d_ff": 1024, "vocab_size": 32000}
SEQ, PER_DEVICE_BATCH = 256, 4
SETTINGS = {"1dev": (1, "fsdp=1"), "8dev-fsdp8": (8, "fsdp=8")}


def worker(devices: int, layout: str, steps: int, compute_dtype: str, remat: str) -> None:
    """Runs in a fresh process (device count is fixed at jax start-up); prints one JSON line."""
    from megamesh.platform import keep_freed_host_memory

    keep_freed_host_memory()  # as `megamesh train` does before jax starts
    import jax
    import numpy as np

    from megamesh.config import ModelConfig
    from megamesh.runspec import RunSpec
    from megamesh.sharding.mesh import global_array, make_mesh
    from megamesh.train.config import ScheduleConfig, TrainConfig
    from megamesh.train.step import build_train_step

    cfg = ModelConfig(name="bench", **MODEL, max_seq_len=SEQ, compute_dtype=compute_dtype)
    tc = TrainConfig(steps=1000, global_batch=PER_DEVICE_BATCH * devices, seq_len=SEQ,
                     schedule=ScheduleConfig(warmup_steps=10), run=RunSpec(layout=layout, remat=remat))
    ts = build_train_step(cfg, tc, make_mesh(layout))
    state = ts.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        batch = rng.integers(0, cfg.vocab_size, (tc.global_batch, SEQ + 1), dtype=np.int32)
        b = global_array(batch, ts.batch_sharding)
        t0 = time.perf_counter()
        state, m = ts.fn(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    step = statistics.median(times[2:])
    print(json.dumps({"step_s": step, "tokens_per_s": tc.global_batch * SEQ / step,
                      "loss": float(m["loss"])}))


def run_megamesh(devices: int, layout: str, steps: int, dtype: str, remat: str) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, __file__, "--worker", str(devices), layout, str(steps), dtype, remat]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def maxtext_cmd(python: str, devices: int, steps: int) -> list[str]:
    # The installed package has no repo checkout: name its base.yml by full path.
    base = subprocess.run([python, "-c", "import maxtext, os; print(os.path.join("
                           "os.path.dirname(maxtext.__file__), 'configs', 'base.yml'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    cmd = [python, "-m", "maxtext.trainers.pre_train.train", base, "hardware=cpu",
           "skip_jax_distributed_system=true", "jax_cache_dir=", "dataset_type=synthetic",
           "enable_checkpointing=false", "base_emb_dim=256", "base_num_query_heads=4",
           "base_num_kv_heads=4", "base_mlp_dim=1024", "base_num_decoder_layers=4", "head_dim=64",
           "vocab_size=32000", "max_target_length=256", "per_device_batch_size=4",
           f"steps={steps}", "run_name=bench", "base_output_directory=/tmp/maxtext-bench"]
    if devices == 8:
        cmd.append("ici_fsdp_parallelism=8")
    return cmd


STEP_RE = re.compile(r"completed step: (\d+), seconds: ([0-9.]+)")


# megamesh.platform.keep_freed_host_memory's glibc settings, from outside the process
SAME_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def run_maxtext(python: str, devices: int, steps: int, same_malloc: bool = False) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", **(SAME_MALLOC if same_malloc else {}))
    r = subprocess.run(maxtext_cmd(python, devices, steps), capture_output=True, text=True, env=env)
    log = r.stdout + r.stderr
    times = [float(s) for step, s in STEP_RE.findall(log) if int(step) >= 2]
    if r.returncode != 0 or not times:
        raise RuntimeError(f"MaxText failed (rc {r.returncode}):\n{log[-4000:]}")
    step = statistics.median(times)
    return {"step_s": step, "tokens_per_s": PER_DEVICE_BATCH * devices * SEQ / step}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--maxtext-python", help="python of a venv with maxtext[tpu]==0.2.4 and jax 0.10.2")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--dtype", default="bfloat16", help="megamesh compute dtype (MaxText's default is bf16)")
    ap.add_argument("--remat", default="full", help="megamesh remat policy (MaxText's default is full)")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--maxtext-same-malloc", action="store_true",
                    help="also run MaxText with megamesh's glibc settings (environment variables)")
    args = ap.parse_args()
    results: dict = {}
    for name in args.settings:
        devices, layout = SETTINGS[name]
        ours, theirs, same = [], [], []
        for _ in range(args.runs):
            ours.append(run_megamesh(devices, layout, args.steps, args.dtype, args.remat)["tokens_per_s"])
            if args.maxtext_python:
                theirs.append(run_maxtext(args.maxtext_python, devices, args.steps)["tokens_per_s"])
                if args.maxtext_same_malloc:
                    same.append(run_maxtext(args.maxtext_python, devices, args.steps,
                                            same_malloc=True)["tokens_per_s"])
        row = {"megamesh_tokens_per_s": statistics.median(ours), "megamesh_runs": ours}
        if theirs:
            row.update(maxtext_tokens_per_s=statistics.median(theirs), maxtext_runs=theirs,
                       ratio=statistics.median(ours) / statistics.median(theirs))
        if same:
            row.update(maxtext_same_malloc_tokens_per_s=statistics.median(same),
                       maxtext_same_malloc_runs=same,
                       ratio_vs_same_malloc=statistics.median(ours) / statistics.median(same))
        results[name] = row
        print(name, json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": SETTINGS, "model": MODEL, "seq": SEQ, "dtype": args.dtype,
                       "remat": args.remat, "results": results}, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        d, lay, n, dt, rm = sys.argv[2:7]
        worker(int(d), lay, int(n), dt, rm)
    else:
        main()
