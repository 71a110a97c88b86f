"""Logical-axis annotations for activations, with no mesh or device code.

Layers call `constrain(x, ("batch", "seq", "embed"))` to name the axes of an
activation, and `compute_weight(w, axes, dtype)` to take a parameter in its compute
dtype and compute layout (for FSDP: all-gathered, so every device multiplies by the
whole weight; the gradient flows back as a reduce-scatter). By default both only cast.
`megamesh.sharding.rules.activation_sharding` installs, for the duration of a trace,
the function that turns those names into sharding constraints on a mesh: the model
never sees the mesh.

Matmuls take their operands through `matmul_inputs`, which widens bf16 operands to f32
when the trace is for XLA:CPU (`using_f32_matmuls`, set by `activation_sharding` from the
mesh's platform). The values are unchanged (a bf16 number is exactly an f32 one) and
the products accumulate in f32 either way, so the arithmetic is a bf16 matmul's; only
the kernel differs. Measured on this project's 2-core CPU (BENCHMARKS.md): XLA:CPU's f32
GEMMs run at ~274 GFLOP/s and its bf16 ones at ~160, and the train step of the bench
model runs ~12% faster.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

# (array, logical axes, is_weight) -> array with a sharding constraint
Constrainer = Callable[[Any, tuple[str | None, ...], bool], Any]

_CONSTRAINER: contextvars.ContextVar[Constrainer | None] = contextvars.ContextVar(
    "megamesh_constrainer", default=None
)
_F32_MATMULS: contextvars.ContextVar[bool] = contextvars.ContextVar("megamesh_f32_matmuls",
                                                                    default=False)


def constrain(x: Any, axes: tuple[str | None, ...]) -> Any:
    """Name the logical axes of activation `x`; a sharding constraint when rules are active."""
    fn = _CONSTRAINER.get()
    return x if fn is None else fn(x, axes, False)


def compute_weight(w: Any, axes: tuple[str | None, ...], dtype: Any) -> Any:
    """Parameter `w` (logical `axes`) cast to `dtype` in the layout compute uses.

    Casting first means an FSDP all-gather moves compute-dtype bytes, not fp32 master
    weights.
    """
    w = w.astype(dtype)
    fn = _CONSTRAINER.get()
    return w if fn is None else fn(w, axes, True)


@contextlib.contextmanager
def using_constrainer(fn: Constrainer | None) -> Iterator[None]:
    """Install `fn` as the activation constrainer while tracing inside this block."""
    token = _CONSTRAINER.set(fn)
    try:
        yield
    finally:
        _CONSTRAINER.reset(token)


def matmul_inputs(*xs: Any) -> tuple[Any, ...]:
    """Matmul operands as the backend multiplies them fastest, with the same values: bf16
    ones widened to f32 under `using_f32_matmuls`, untouched otherwise."""
    if not _F32_MATMULS.get():
        return xs
    return tuple(x.astype("float32") if x.dtype == "bfloat16" else x for x in xs)


@contextlib.contextmanager
def using_f32_matmuls(enabled: bool) -> Iterator[None]:
    """While tracing inside this block, `matmul_inputs` widens bf16 operands to f32."""
    token = _F32_MATMULS.set(enabled)
    try:
        yield
    finally:
        _F32_MATMULS.reset(token)
