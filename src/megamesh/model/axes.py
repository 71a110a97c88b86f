"""Logical-axis annotations for activations, with no mesh or device code.

Layers call `constrain(x, ("batch", "seq", "embed"))` to name the axes of an
activation, and `compute_weight(w, axes, dtype)` to take a parameter in its compute
dtype and compute layout (for FSDP: all-gathered, so every device multiplies by the
whole weight; the gradient flows back as a reduce-scatter). By default both only cast.
`megamesh.sharding.rules.activation_sharding` installs, for the duration of a trace,
the function that turns those names into sharding constraints on a mesh: the model
never sees the mesh.

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
