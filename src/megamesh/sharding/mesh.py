"""Meshes from layout strings, on real devices or on compile-only TPU devices.

A layout names mesh axis sizes: `data=2,fsdp=4`. Axes left out have size 1, so every
mesh has all of MESH_AXES and one rule set serves every layout. `dcn` is the axis across
slices (pods joined by the data-center network); the others are within a slice (ICI).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from megamesh.errors import ConfigError
from megamesh.sharding.logical import MESH_AXES, format_layout, parse_layout, split_over_slices  # noqa: F401


def make_mesh(layout: str | dict[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all of jax's devices) with every axis of MESH_AXES.

    Default layout: all devices on fsdp. On TPU devices the device order follows the
    physical torus (jax's mesh_utils); the outer axes (`dcn`, then `data`, `fsdp`) split
    across slices (`split_over_slices`).
    """
    devs = list(jax.devices() if devices is None else devices)
    sizes = {"fsdp": len(devs)} if layout is None else parse_layout(layout)
    n = math.prod(sizes.values())
    if n != len(devs):
        raise ConfigError(f"layout {format_layout(sizes)} uses {n} devices but there are "
                          f"{len(devs)}: the sizes must multiply to {len(devs)}")
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    arr = _device_array(shape, devs)
    return Mesh(arr, MESH_AXES)


def global_array(batch: np.ndarray, sharding: Any) -> jax.Array:
    """A global array from the full batch every process holds (each keeps its own shards)."""
    return jax.make_array_from_callback(batch.shape, sharding, lambda idx: batch[idx])


def _device_array(shape: tuple[int, ...], devs: list[Any]) -> np.ndarray:
    if devs[0].platform != "tpu" or len(devs) == 1:
        return np.array(devs, dtype=object).reshape(shape)
    n_slices = len({getattr(d, "slice_index", 0) for d in devs})
    if n_slices > 1:
        ici, dcn = split_over_slices(shape, len(devs) // n_slices)
        return mesh_utils.create_hybrid_device_mesh(tuple(ici), tuple(dcn), devs,
                                                    allow_split_physical_axes=True)
    return mesh_utils.create_device_mesh(shape, devs, allow_split_physical_axes=True)
