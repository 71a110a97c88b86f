"""Training metrics: metrics.jsonl, TensorBoard events, MFU against a device peak, goodput.

MFU = model FLOPs per step (the spec table's 6N + attention) / step time / (peak FLOP/s
per device x devices). The peak of TPU and GPU devices comes from the hardware catalog;
for CPU devices it is *measured* here (best of a few large fp32 matmuls), so CPU MFU is
relative to what this machine's XLA matmul reaches, not to a datasheet.

Goodput = productive step time / wall time. Badput is split into compile (the first step
of a session), data wait, checkpoint blocking, lost work (steps computed before a crash
and redone after the restart, read from the previous metrics.jsonl) and other (start-up,
evaluation, logging).
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from megamesh.hardware import chip_for_device_kind


def _import_summary_writer() -> Any:
    """tensorboardX's SummaryWriter, imported without torch: where torch is installed,
    tensorboardX imports it (about a second of every `megamesh train` start) only to accept
    torch tensors, which megamesh never logs. A torch already imported is left alone."""
    hidden = "torch" not in sys.modules
    if hidden:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hidden:
            del sys.modules["torch"]
    return SummaryWriter


SummaryWriter = _import_summary_writer()


@functools.cache
def measured_cpu_matmul_flops(n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of the best of `reps` (n x n) @ (n x n) fp32 matmuls on the first device."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(devices: list[Any]) -> tuple[float, str]:
    """(peak FLOP/s of all `devices` together, where the figure comes from)."""
    kind = devices[0].device_kind
    c = chip_for_device_kind(kind)
    if c is not None:
        return c.device_flops * len(devices), f"{c.name} bf16 peak (hardware catalog)"
    if devices[0].platform == "cpu":
        # All local CPU devices share the same cores: the measured peak is the host's.
        hosts = len({d.process_index for d in devices})
        return measured_cpu_matmul_flops() * hosts, f"measured fp32 matmul peak of {hosts} CPU host(s)"
    return math.nan, f"unknown device kind {kind!r}"


class Goodput:
    """Wall-clock accounting of one training session."""

    def __init__(self, lost_s: float = 0.0):
        self.start = time.perf_counter()
        self.productive = self.compile = self.data = self.checkpoint = 0.0
        self.sync = 0.0  # DiLoCo outer steps: reporting, waiting for the quorum, averaging
        self.lost = lost_s

    def fields(self) -> dict[str, float]:
        wall = time.perf_counter() - self.start + self.lost
        other = max(0.0, wall - self.productive - self.compile - self.data - self.checkpoint
                    - self.sync - self.lost)
        return {
            "goodput": self.productive / wall if wall > 0 else 0.0,
            "wall_s": wall,
            "badput_compile_s": self.compile,
            "badput_data_s": self.data,
            "badput_checkpoint_s": self.checkpoint,
            "badput_lost_s": self.lost,
            "badput_sync_s": self.sync,
            "badput_other_s": other,
        }


def lost_work_seconds(path: Path, resumed_step: int) -> float:
    """Step time recorded in metrics.jsonl for steps after `resumed_step` (to be redone)."""
    if not path.exists():
        return 0.0
    lost = 0.0
    for rec in read_metrics(path):
        if rec.get("step", 0) > resumed_step and "step_time_s" in rec:
            lost += rec["step_time_s"]
    return lost


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return out


class MetricsWriter:
    """Appends one JSON record per step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, out: Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.file = open(out / "metrics.jsonl", "a", buffering=1)
        self.tb = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
