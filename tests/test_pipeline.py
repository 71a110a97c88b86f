"""Pipeline stages (model.pipeline): GPipe and circular schedules equal the plain layer
loop, forward and gradients, unsharded and with the stage axis split over 8 CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from megamesh.model.pipeline import bubble_fraction, run_pipeline

L, B, T, D = 8, 8, 4, 16


def layer(p, x, extra):
    # extras travel with their microbatch: a per-token scale
    return x + jnp.tanh(x @ p["w"] + p["b"]) * extra[..., None]


def chunk_fn(chunk, x, extra):
    return jax.lax.scan(lambda h, p: (layer(p, h, extra), None), x, chunk)[0]


def setup():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"w": jax.random.normal(k[0], (L, D, D)) / D**0.5, "b": jax.random.normal(k[1], (L, D))}
    x = jax.random.normal(k[2], (B, T, D))
    extra = jax.random.uniform(k[3], (B, T), minval=0.5, maxval=1.5)
    return params, x, extra


def loss(out):
    return jnp.sum(out**2) / out.size


@pytest.mark.parametrize("stages,microbatches,repeats", [(2, 4, 1), (4, 4, 1), (2, 4, 2),
                                                         (4, 4, 2), (1, 2, 1)])
def test_pipeline_equals_the_layer_loop(stages, microbatches, repeats):
    params, x, extra = setup()

    def ref(p, x):
        return loss(chunk_fn(p, x, extra))

    def piped(p, x):
        return loss(run_pipeline(chunk_fn, p, x, extra, stages=stages, microbatches=microbatches,
                                 repeats=repeats))

    want, gwant = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(params, x)
    got, ggot = jax.jit(jax.value_and_grad(piped, argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ggot), jax.tree.leaves(gwant)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stages,repeats", [(2, 1), (4, 1), (4, 2)])
def test_stage_axis_split_over_devices_gives_the_same_result(stages, repeats):
    """The stage axis of the stage buffer and of each stage's weights split over a mesh
    axis (8 CPU devices: stage x data); the shift between stages becomes a permute."""
    params, x, extra = setup()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(stages, 8 // stages), ("stage", "data"))

    def pin(a):
        return jax.lax.with_sharding_constraint(
            a, NamedSharding(mesh, P("stage", *([None] * (a.ndim - 1)))))

    def piped(p, x):
        return loss(run_pipeline(chunk_fn, p, x, extra, stages=stages, microbatches=4,
                                 repeats=repeats, constrain=pin))

    want, gwant = jax.jit(jax.value_and_grad(lambda p, x: loss(chunk_fn(p, x, extra))))(params, x)
    fn = jax.jit(jax.value_and_grad(piped))
    got, ggot = fn(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ggot), jax.tree.leaves(gwant)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    hlo = fn.lower(params, x).compile().as_text()
    assert "collective-permute" in hlo  # the shift between stages crosses devices


def test_bubble_and_bad_splits():
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(4, 8, repeats=2) == pytest.approx(3 / 19)  # circular: smaller
    assert bubble_fraction(1, 8) == 0
    params, x, extra = setup()
    with pytest.raises(ValueError, match="do not split into 3 stages"):
        run_pipeline(chunk_fn, params, x, extra, stages=3, microbatches=4)
    with pytest.raises(ValueError, match="batch 8 does not split into 3 microbatches"):
        run_pipeline(chunk_fn, params, x, extra, stages=2, microbatches=3)
    with pytest.raises(ValueError, match="needs microbatches"):
        run_pipeline(chunk_fn, params, x, extra, stages=4, microbatches=2, repeats=2)
