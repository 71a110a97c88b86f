"""Sharding declared once: logical axis names -> jax shardings on a mesh.

The rules themselves (strategies, resolution) are pure data in `sharding.logical`, shared
with the planner; this module turns them into PartitionSpecs and NamedShardings and into
sharding constraints on activations.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from megamesh.config import ModelConfig
from megamesh.model.axes import using_constrainer
from megamesh.model.backend import Kernels, PerDevice, choose_kernels, using_kernels
from megamesh.model.kvcache import kv_shape, page_axes
from megamesh.model.specs import param_specs
from megamesh.pytree import unflatten
from megamesh.sharding.logical import (  # noqa: F401  (re-exported)
    LOGICAL_AXES,
    MESH_AXES,
    STRATEGIES,
    Rules,
    resolve,
    strategy,
    train_rules,
    vocab_parallel,
    weight_compute_rules,
)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], sizes: dict[str, int],
                    rules: Rules) -> PartitionSpec:
    """The PartitionSpec for an array with these logical axes and shape on a mesh."""
    dims = resolve(axes, shape, sizes, rules)
    return PartitionSpec(*(None if not d else d[0] if len(d) == 1 else d for d in dims))


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


def page_shardings(pages: dict[str, Any], mesh: Mesh, rules: Rules) -> dict[str, Any]:
    """NamedSharding for the KV cache's pages (`model.kvcache.init_pages`, or its eval_shape)."""
    sizes = mesh_sizes(mesh)
    return jax.tree.map(
        lambda a: NamedSharding(mesh, logical_to_spec(page_axes(), kv_shape(a.shape), sizes, rules)),
        pages)


def kv_split(mesh: Mesh, rules: Rules, n_kv_heads: int) -> int:
    """The ways the mesh splits kv heads under `rules` when it can (the size of the mesh
    axes `kv_heads` maps to that are > 1), whether or not they divide the model's
    `n_kv_heads` (`model.kvcache.held_kv_heads` decides what the pages hold)."""
    sizes = mesh_sizes(mesh)
    whole = math.prod(sizes.values()) * n_kv_heads  # a length every split divides
    return math.prod(sizes[a] for a in resolve(("kv_heads",), (whole,), sizes, rules)[0])


def data_sharding(mesh: Mesh, rules: Rules, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a (batch, seq, ...) input array."""
    axes = ("batch", "seq") + (None,) * (len(shape) - 2)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh_sizes(mesh), rules))


def mesh_platform(mesh: Mesh) -> str:
    """The platform of the mesh's devices ("tpu", "gpu", "cpu")."""
    p = mesh.devices.flat[0].platform
    return "gpu" if p in ("cuda", "rocm") else p


def mesh_kernels(mesh: Mesh, overrides: str = "auto") -> Kernels:
    """The kernels a step on this mesh uses (`model.backend.choose_kernels`)."""
    return choose_kernels(mesh_platform(mesh), overrides, mesh_sizes(mesh))


def per_device_runner(mesh: Mesh, rules: Rules) -> PerDevice:
    """Runs a kernel XLA cannot partition (Pallas, cuDNN, a sort) on each device's shard:
    `shard_map` with in/out specs from the arrays' logical axes under `rules`; the output
    is shaped like the first argument. Logical names in `tie` (query and kv heads) split
    over the mesh only if they resolve to the same mesh axes; otherwise those dimensions
    stay whole on every device."""
    sizes = mesh_sizes(mesh)

    def run(fn: Any, args: Sequence[Any], axes: Sequence[tuple[str | None, ...]],
            out_axes: tuple[str | None, ...], tie: tuple[str, ...]) -> Any:
        out_shape = args[0].shape
        arrays = [(a, x.shape) for a, x in zip(axes, args)] + [(out_axes, out_shape)]
        dims = [list(resolve(a, shape, sizes, rules)) for a, shape in arrays]
        tied = {tuple(d[i]) for (a, _), d in zip(arrays, dims) for i, n in enumerate(a) if n in tie}
        if len(tied) > 1:
            for (a, _), d in zip(arrays, dims):
                for i, n in enumerate(a):
                    if n in tie:
                        d[i] = ()
        specs = [PartitionSpec(*(None if not m else m[0] if len(m) == 1 else tuple(m) for m in d))
                 for d in dims]
        return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs[:-1]), out_specs=specs[-1],
                             check_vma=False)(*args)

    def axes_of(name: str, size: int) -> tuple[str, ...]:
        """The mesh axes a dimension of this logical name and size splits over."""
        return tuple(resolve((name,), (size,), sizes, rules)[0])

    def ways(name: str, size: int) -> int:
        """How many ways a dimension of this logical name and size is split."""
        return math.prod(sizes[m] for m in axes_of(name, size))

    run.ways = ways  # type: ignore[attr-defined]
    run.axes_of = axes_of  # type: ignore[attr-defined]
    return run


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules, kernels: Kernels | None = None) -> Iterator[None]:
    """While tracing inside this block, the model's `constrain` calls become sharding
    constraints, and its kernels are `kernels` (default: the mesh platform's,
    `mesh_kernels`), the per-device ones run under shard_map over the mesh."""
    sizes = mesh_sizes(mesh)

    # Weights are used in their compute layout: the parameter layout without fsdp
    # (ZeRO-3: gathered for the matmul, never stored gathered), except a vocab dimension
    # split over fsdp by `vocab_parallel`, which stays split.
    weight_rules = weight_compute_rules(rules)

    def constrainer(x: jax.Array, axes: tuple[str | None, ...], weight: bool) -> jax.Array:
        spec = logical_to_spec(axes, x.shape, sizes, weight_rules if weight else rules)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    kernels = kernels or mesh_kernels(mesh)
    with using_constrainer(constrainer), using_kernels(kernels, per_device_runner(mesh, rules)):
        yield
