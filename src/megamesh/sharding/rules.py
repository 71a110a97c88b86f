"""Sharding declared once: logical axis names -> mesh axes.

Parameters (spec table) and activations (`megamesh.model.axes.constrain`) name logical
axes; a *strategy* is a small ordered rule set mapping each logical name to the mesh
axes that may shard it. Resolution, per array:

- rules are applied in their order: an earlier rule claims its mesh axes first, so
  e.g. `expert` claims the expert mesh axis before `batch` can, and an activation's
  `batch` claims `fsdp` before its `embed` can;
- a mesh axis is used at most once per array; size-1 mesh axes are skipped;
- a mesh axis that does not divide the dimension is skipped (that dimension stays
  replicated over it), so any model runs on any mesh.

The mesh axes: dcn (across slices/pods), data, fsdp, sequence, tensor, expert.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from megamesh.config import ModelConfig
from megamesh.errors import ConfigError
from megamesh.model.axes import using_constrainer
from megamesh.model.specs import cache_axes, param_specs
from megamesh.model.transformer import unflatten

MESH_AXES = ("dcn", "data", "fsdp", "sequence", "tensor", "expert")
LOGICAL_AXES = ("expert", "batch", "seq", "cache_seq", "heads", "kv_heads", "mlp", "vocab",
                "embed", "head_dim", "layers", "norm", "router")

Rules = tuple[tuple[str, tuple[str, ...]], ...]

_BATCH = ("dcn", "data", "fsdp", "expert")

STRATEGIES: dict[str, Rules] = {
    # ZeRO-3 style: parameters sharded over fsdp on their embed dim, tensor parallel on
    # heads/mlp/vocab, experts over expert; the batch spread over every data-like axis.
    "fsdp": (
        ("expert", ("expert",)),
        ("batch", _BATCH),
        ("seq", ("sequence",)),
        ("heads", ("tensor",)),
        ("kv_heads", ("tensor",)),
        ("mlp", ("tensor",)),
        ("vocab", ("tensor",)),
        ("embed", ("fsdp",)),
    ),
    # Pure data parallel: every parameter replicated, the batch split over all axes.
    "dp": (
        ("batch", _BATCH + ("tensor",)),
    ),
    # Serving: tensor and expert parallel weights (no fsdp gather per step); the batch
    # (decode slots) over data; the KV cache split by kv head.
    "serve": (
        ("expert", ("expert",)),
        ("batch", ("dcn", "data", "fsdp")),
        ("heads", ("tensor",)),
        ("kv_heads", ("tensor",)),
        ("mlp", ("tensor",)),
        ("vocab", ("tensor",)),
    ),
}


def strategy(name: str) -> Rules:
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy {name!r}: allowed are {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], sizes: dict[str, int],
                    rules: Rules) -> PartitionSpec:
    """The PartitionSpec for an array with these logical axes and shape on a mesh."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
    for a in axes:
        if a is not None and a not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {a!r}: allowed are {', '.join(LOGICAL_AXES)}")
    order = {name: i for i, (name, _) in enumerate(rules)}
    mapping = dict(rules)
    used: set[str] = set()
    out: list[Any] = [None] * len(axes)
    dims = sorted((i for i, a in enumerate(axes) if a in mapping), key=lambda i: order[axes[i]])
    for i in dims:
        chosen: list[str] = []
        size = 1
        for m in mapping[axes[i]]:  # type: ignore[index]
            n = sizes.get(m, 1)
            if n == 1 or m in used or shape[i] % (size * n):
                continue
            chosen.append(m)
            size *= n
        used.update(chosen)
        out[i] = None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen)
    return PartitionSpec(*out)


def mesh_sizes(mesh: Mesh) -> dict[str, int]:
    """Axis name -> size."""
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def param_partition_specs(cfg: ModelConfig, mesh: Mesh, rules: Rules) -> dict[str, Any]:
    """PartitionSpec of every parameter, as a tree shaped like the parameters."""
    sizes = mesh_sizes(mesh)
    return unflatten({n: logical_to_spec(s.axes, s.shape, sizes, rules)
                      for n, s in param_specs(cfg).items()})


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules) -> dict[str, Any]:
    """NamedSharding of every parameter, as a tree shaped like the parameters."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_partition_specs(cfg, mesh, rules))


def cache_shardings(cache: dict[str, Any], mesh: Mesh, rules: Rules) -> dict[str, Any]:
    """NamedSharding for a KV cache tree from `init_cache` (or its eval_shape)."""
    sizes = mesh_sizes(mesh)
    return jax.tree.map(
        lambda a: NamedSharding(mesh, logical_to_spec(cache_axes(), a.shape, sizes, rules)), cache)


def data_sharding(mesh: Mesh, rules: Rules, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a (batch, seq, ...) input array."""
    axes = ("batch", "seq") + (None,) * (len(shape) - 2)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh_sizes(mesh), rules))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While tracing inside this block, the model's `constrain` calls become sharding constraints."""
    sizes = mesh_sizes(mesh)

    def constrainer(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
        spec = logical_to_spec(axes, x.shape, sizes, rules)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    with using_constrainer(constrainer):
        yield
