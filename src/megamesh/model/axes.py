"""Logical-axis annotations for activations, with no mesh or device code.

Layers call `constrain(x, ("batch", "seq", "embed"))` to name the axes of an
activation. By default that does nothing. `megamesh.sharding.rules.activation_sharding`
installs, for the duration of a trace, the function that turns those names into a
sharding constraint on a mesh: the model never sees the mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

Constrainer = Callable[[Any, tuple[str | None, ...]], Any]

_CONSTRAINER: contextvars.ContextVar[Constrainer | None] = contextvars.ContextVar(
    "megamesh_constrainer", default=None
)


def constrain(x: Any, axes: tuple[str | None, ...]) -> Any:
    """Name the logical axes of activation `x`; a sharding constraint when rules are active."""
    fn = _CONSTRAINER.get()
    return x if fn is None else fn(x, axes)


@contextlib.contextmanager
def using_constrainer(fn: Constrainer | None) -> Iterator[None]:
    """Install `fn` as the activation constrainer while tracing inside this block."""
    token = _CONSTRAINER.set(fn)
    try:
        yield
    finally:
        _CONSTRAINER.reset(token)
