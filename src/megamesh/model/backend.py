"""The backend: which kernel implementations a run uses, chosen per platform in one place.

`choose_kernels(platform, overrides, mesh_sizes)` picks a `Kernels` value (TPU: splash
attention, grouped MoE, native bf16 matmuls, ragged paged attention for serving; GPU:
cuDNN attention, einsum MoE, native matmuls, XLA's paged attention; CPU: blockwise
attention, einsum MoE, f32 matmul kernels, XLA's paged attention). The sharding layer
installs it for the duration of a trace (`using_kernels`, from
`sharding.rules.activation_sharding`) together with a `PerDevice` runner that calls the
kernels XLA cannot partition (Pallas, cuDNN, the grouped MoE's sort) under `shard_map`.
Layers never branch on the platform: they call `model.kernels.causal_attention`,
`model.moe.dispatch_compute_combine` and `matmul_inputs`, which read the choice here.
Implementations: `model.kernels` (attention), `model.moe` (MoE), `model.blockwise`.
The platform's other tuning lives here too: the loss's slice size (LOSS_CHUNK_BYTES) and
the serving engine's decode batch buckets (DECODE_BATCH_MULTIPLE). Pure Python at import
(the planner reads the tables without jax).

Matmul modes:
- `f32`: bf16 operands widened to f32 (same values; products accumulate in f32 either
  way, so the arithmetic is a bf16 matmul's). Measured on this project's 2-core CPU
  (BENCHMARKS.md): XLA:CPU's f32 GEMMs run at ~274 GFLOP/s and its bf16 ones at ~160; the
  bench model's train step runs ~12% faster.
- `native`: bf16 operands and bf16 outputs; TPU MXUs and GPU tensor cores accumulate in
  f32 inside the unit. A matmul asked for an f32 output would make its cotangent, and so
  both backward GEMMs, f32 x bf16: on an H200 that was 63% of the step's FLOPs (issue 14).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from megamesh.errors import ConfigError

ATTENTION = ("reference", "blockwise", "splash", "cudnn", "pallas_gpu")
MOE = ("einsum", "grouped")
MATMUL = ("f32", "native")
PAGED = ("xla", "gather", "ragged")
# The grouped MoE kernel sorts a device's own tokens: it needs the experts' weights whole on
# every device, which the expert and tensor mesh axes split (those layouts keep einsum).
GROUPED_NEEDS_UNSPLIT = ("expert", "tensor")


@dataclass(frozen=True)
class Kernels:
    """Which implementation each kernel uses in one run."""

    attention: str
    moe: str
    matmul: str
    platform: str = "cpu"  # what the trace targets (Pallas kernels interpret off their own)
    paged: str = "xla"  # attention over the paged KV cache (serving)
    # the layers' matmuls: "bf16" (the compute dtype) or "fp8" (`model.quant`; the run
    # spec's precision, set by the train step, not by --kernels)
    precision: str = "bf16"

    def describe(self) -> str:
        prec = f",precision={self.precision}" if self.precision != "bf16" else ""
        return (f"attention={self.attention},moe={self.moe},matmul={self.matmul},"
                f"paged={self.paged}{prec}")


PLATFORM_DEFAULTS = {
    "tpu": Kernels(attention="splash", moe="grouped", matmul="native", platform="tpu",
                   paged="ragged"),
    # GPU MoE stays einsum: XLA:GPU (jaxlib 0.10) lowers ragged_dot to a dense dot over
    # every expert (E x the work and memory; public reports: github.com/marin-community/
    # marin issues 7012 and 5394); cuDNN grouped GEMMs for it are landing in XLA
    "gpu": Kernels(attention="cudnn", moe="einsum", matmul="native", platform="gpu"),
    "cpu": Kernels(attention="blockwise", moe="einsum", matmul="f32", platform="cpu"),
}


# Per-device f32 logits per slice of the train step's fused cross-entropy
# (`train.step.loss_chunks`; the planner's memory model reads it too).
# CPU: slices this size stay in the caches between the head's matmul, the softmax and the
# gradient's two matmuls (bench model, 8 devices: 8 and 16 MiB slices measured alike,
# 32 MiB slower). Accelerators: large enough that the per-slice re-read of the head and
# of its f32 gradient accumulator (~0.1 ms each on HBM for a 2048 x 32000 head) stays a
# few percent of the step, small enough that no (tokens, vocab) array is held whole.
LOSS_CHUNK_BYTES = {"cpu": 16 * 2**20, "gpu": 256 * 2**20, "tpu": 256 * 2**20}

# The serving engine's decode batch buckets are multiples of this many rows. XLA:CPU's
# logits for a row are then bit-identical whatever the bucket (checked: 4 rows vs 32
# differ in the last bits), so a request's tokens never depend on the load; 8 is also the
# row tile (sublanes) of TPU vregs. Not measured on GPUs or TPUs.
DECODE_BATCH_MULTIPLE = {"cpu": 8, "gpu": 8, "tpu": 8}


def choose_kernels(platform: str, overrides: str = "auto",
                   mesh_sizes: dict[str, int] | None = None) -> Kernels:
    """The kernels for `platform` ("tpu", "gpu", "cpu"; "cuda"/"rocm" count as gpu), with
    `overrides` such as "attention=blockwise,moe=einsum" ("auto" or "": the defaults).

    On a mesh that splits experts over `expert` or `tensor`, moe falls back to einsum
    unless asked for explicitly (then it is an error)."""
    plat = "gpu" if platform in ("cuda", "rocm", "gpu") else platform
    if plat not in PLATFORM_DEFAULTS:
        raise ConfigError(f"platform {platform!r} has no kernel defaults: one of tpu, gpu, cpu")
    k = PLATFORM_DEFAULTS[plat]
    asked: dict[str, str] = {}
    if overrides and overrides != "auto":
        allowed = {"attention": ATTENTION, "moe": MOE, "matmul": MATMUL, "paged": PAGED}
        for item in overrides.split(","):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in allowed:
                raise ConfigError(f"--kernels {overrides!r}: {item!r} is not allowed: use "
                                  "KEY=NAME pairs with KEY one of attention, moe, matmul, paged")
            if value not in allowed[key]:
                raise ConfigError(f"--kernels {key}={value!r} is not allowed: one of "
                                  f"{', '.join(allowed[key])}")
            asked[key] = value
        k = dataclasses.replace(k, **asked)
    if k.attention == "cudnn" and plat != "gpu":
        raise ConfigError(f"--kernels attention=cudnn needs a GPU; this run's devices are {plat}")
    if k.paged == "ragged" and plat != "tpu":
        raise ConfigError(f"--kernels paged=ragged needs a TPU (Pallas' TPU kernel has no "
                          f"interpreter for it); this run's devices are {plat}")
    split = [a for a in GROUPED_NEEDS_UNSPLIT if (mesh_sizes or {}).get(a, 1) > 1]
    if k.moe == "grouped" and split:
        if "moe" in asked:
            raise ConfigError(f"--kernels moe=grouped is not allowed on a mesh with "
                              f"{', '.join(split)} > 1: use moe=einsum")
        k = dataclasses.replace(k, moe="einsum")
    return k


def planner_kernels(k: Kernels) -> str:
    """The planner's name for these kernels (`plan.layout.KERNELS`): "megamesh" when
    attention is a flash kernel that skips masked blocks, "xla" when it computes the whole
    T x T score matrix (reference, and blockwise, which masks blocks instead of skipping
    them). Approximate for mixed choices: the planner models the MoE kernel with the
    attention's (grouped with megamesh, einsum with xla)."""
    return "megamesh" if k.attention in ("splash", "cudnn", "pallas_gpu") else "xla"


# (fn, args, logical axes of each arg, logical axes of the output (shaped like the first
# arg), tied axis names) -> out
PerDevice = Callable[[Callable[..., Any], Sequence[Any], Sequence[tuple[str | None, ...]],
                      tuple[str | None, ...], tuple[str, ...]], Any]

_ACTIVE: contextvars.ContextVar[tuple[Kernels, PerDevice | None] | None] = \
    contextvars.ContextVar("megamesh_kernels", default=None)


def active() -> tuple[Kernels, PerDevice | None]:
    """The kernels installed for this trace, or the default backend's (no runner)."""
    got = _ACTIVE.get()
    if got is not None:
        return got
    import jax  # only here: the rest of this module is pure Python, which the planner reads

    return choose_kernels(jax.default_backend()), None


@contextlib.contextmanager
def using_kernels(kernels: Kernels, per_device: PerDevice | None = None) -> Iterator[None]:
    token = _ACTIVE.set((kernels, per_device))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def run_per_device(fn: Callable[..., Any], args: Sequence[Any],
                   axes: Sequence[tuple[str | None, ...]], out_axes: tuple[str | None, ...],
                   tie: tuple[str, ...] = ()) -> Any:
    """fn(*args) on each device's shard where a runner is installed, else directly."""
    runner = active()[1]
    return fn(*args) if runner is None else runner(fn, args, axes, out_axes, tie)


def matmul_inputs(*xs: Any) -> tuple[Any, ...]:
    """Matmul operands as the backend multiplies them fastest, with the same values: bf16
    ones widened to f32 in `f32` mode, untouched otherwise."""
    if active()[0].matmul != "f32":
        return xs
    return tuple(x.astype("float32") if x.dtype == "bfloat16" else x for x in xs)


def matmul_precision() -> str:
    """The layers' matmul precision in this trace: "bf16" (compute dtype) or "fp8"."""
    return active()[0].precision


def native_matmuls() -> bool:
    """Whether matmuls keep bf16 outputs (and so bf16 backward GEMMs)."""
    return active()[0].matmul == "native"
