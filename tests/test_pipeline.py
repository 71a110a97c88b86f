"""Pipeline stages (model.pipeline): GPipe and circular schedules equal the plain layer
loop, forward and gradients, unsharded and with the stage axis split over 8 CPU devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from megamesh.model.pipeline import bubble_fraction, run_pipeline, schedule

L, B, T, D = 8, 8, 4, 16


def layer(p, x, extra):
    # extras travel with their microbatch: a per-token scale
    return x + jnp.tanh(x @ p["w"] + p["b"]) * extra[..., None]


def chunk_fn(chunk, x, extra):
    return jax.lax.scan(lambda h, p: (layer(p, h, extra), None), x, chunk)[0], jnp.sum(x[..., 0])


def run(*args, **kw):
    return run_pipeline(*args, **kw)[0]


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
        return loss(chunk_fn(p, x, extra)[0])

    def piped(p, x):
        return loss(run(chunk_fn, p, x, extra, stages=stages, microbatches=microbatches,
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

    def pin_w(tree):
        return jax.tree.map(pin, tree)

    def piped(p, x):
        return loss(run(chunk_fn, p, x, extra, stages=stages, microbatches=4,
                                 repeats=repeats, pin_state=pin, pin_weights=pin_w,
                        spmd_axis_name="stage"))

    want, gwant = jax.jit(jax.value_and_grad(lambda p, x: loss(chunk_fn(p, x, extra)[0])))(params, x)
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
    table = schedule(4, 8, repeats=2)  # the schedule run_pipeline runs
    assert table.shape == (19, 4) and np.mean(table < 0) == pytest.approx(bubble_fraction(4, 8, 2))
    assert sorted(table[:, 2][table[:, 2] >= 0]) == list(range(16))  # every item once per stage
    params, x, extra = setup()
    # aux is summed over the real (stage, item) pairs only: M R P of them
    _, aux = run_pipeline(lambda c, h, e: (chunk_fn(c, h, e)[0], jnp.float32(1)), params, x,
                          extra, stages=4, microbatches=4, repeats=2)
    assert float(aux) == 4 * 2 * 4
    with pytest.raises(ValueError, match="do not split into 3 stages"):
        run_pipeline(chunk_fn, params, x, extra, stages=3, microbatches=4)
    with pytest.raises(ValueError, match="batch 8 does not split into 3 microbatches"):
        run_pipeline(chunk_fn, params, x, extra, stages=2, microbatches=3)
    with pytest.raises(ValueError, match="needs microbatches"):
        run_pipeline(chunk_fn, params, x, extra, stages=4, microbatches=2, repeats=2)


def train_losses(layout, steps=10, microbatches=0, repeats=1, accum=1):
    """Losses of `steps` train steps of a 4-layer f32 model on 8 CPU devices."""
    from megamesh.config import apply_overrides, preset
    from megamesh.runspec import RunSpec
    from megamesh.sharding.mesh import global_array, make_mesh
    from megamesh.train.config import ScheduleConfig, TrainConfig
    from megamesh.train.step import build_train_step

    cfg = apply_overrides(preset("tiny"), {"n_layers": "4"})
    run = RunSpec(layout=layout, remat="full", microbatches=accum,
                  pipeline_microbatches=microbatches, pipeline_virtual=repeats)
    tc = TrainConfig(steps=steps, global_batch=16, seq_len=16, run=run,
                     schedule=ScheduleConfig(warmup_steps=1))
    ts = build_train_step(cfg, tc, make_mesh(layout))
    state = ts.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        batch = rng.integers(0, cfg.vocab_size, (16, 17)).astype(np.int32)
        state, m = ts.fn(state, global_array(batch, ts.batch_sharding))
        out.append(float(m["loss"]))
    return np.array(out), ts


def test_pipelined_train_step_equals_the_plain_one():
    """Issue 26 point 4: the train step with 2 and 4 pipeline stages (GPipe; circular with
    gradient accumulation around it) gives the plain step's losses within 1e-5 (f32) over
    10 steps; each stage holds its share of the layers."""
    want, _ = train_losses("fsdp=8")
    got, ts = train_losses("stage=4,fsdp=2")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert ts.state_shardings["params"]["layers"]["attn"]["wq"].spec[0] == "stage"
    assert ts.state_shardings["params"]["embed"].spec[0] != "stage"  # the tables: every stage
    got, _ = train_losses("stage=2,data=2,fsdp=2", microbatches=2, repeats=2, accum=2)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_pipelines_the_step_cannot_run_are_refused():
    from megamesh.errors import ConfigError

    with pytest.raises(ConfigError, match="do not split the 4 layers"):
        train_losses("stage=8", steps=1)
    with pytest.raises(ConfigError, match="pipeline_microbatches 3 does not divide the 16"):
        train_losses("stage=2,fsdp=4", steps=1, microbatches=3)
    with pytest.raises(ConfigError, match="circular schedule"):
        train_losses("stage=2,fsdp=4", steps=1, microbatches=1, repeats=2)


def all_eqns(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs nested in it (loop bodies, calls)."""
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from all_eqns(inner)


def test_the_stage_weights_are_not_kept_gathered_for_the_backward_pass():
    """Regression: with weights that do not depend on the schedule's iteration, autodiff
    hoisted every layer's compute-dtype weights out of the loop and kept them stacked
    (the whole stage gathered at once: 405B over 2 pods needed 56.8 instead of 13.9 GiB).
    No loop of the traced step may output a (layers per stage, stages, ...) stack of
    compute-dtype weights."""
    from megamesh.config import apply_overrides, preset
    from megamesh.model.specs import param_specs
    from megamesh.runspec import RunSpec
    from megamesh.sharding.mesh import make_mesh
    from megamesh.train.config import ScheduleConfig, TrainConfig
    from megamesh.train.step import build_train_step

    cfg = apply_overrides(preset("tiny"), {"n_layers": "8", "compute_dtype": "bfloat16",
                                           "d_ff": "384"})
    run = RunSpec(layout="stage=2,fsdp=4", remat="full", kernels="matmul=native")
    tc = TrainConfig(steps=2, global_batch=16, seq_len=16, run=run,
                     schedule=ScheduleConfig(warmup_steps=1))
    ts = build_train_step(cfg, tc, make_mesh(run.layout))
    tokens = jax.ShapeDtypeStruct((16, 17), jnp.int32, sharding=ts.batch_sharding)
    jaxpr = jax.make_jaxpr(ts.fn)(ts.abstract_state(), tokens).jaxpr
    stacked = {(4, 2, *s.shape[1:]) for n, s in param_specs(cfg).items()
               if n.startswith("layers/") and len(s.shape) > 2}

    kept = [v.aval for e in all_eqns(jaxpr) if e.primitive.name in ("scan", "while")
            for v in e.outvars
            if v.aval.dtype == jnp.bfloat16 and tuple(v.aval.shape) in stacked]
    assert stacked and not kept, kept


def test_accumulated_gradients_are_summed_in_the_parameters_layout():
    """Regression: with microbatches the running gradient sum was a scan carry XLA laid
    out as it liked, and at 128k it kept the tables' f32 sums gathered (70B, fsdp=16,
    sequence=32, 4 microbatches: 41.5 GiB per device instead of 25.9). Inside the
    accumulation loop every parameter's gradient is constrained to the parameter's own
    sharding before it is added."""
    from megamesh.config import preset
    from megamesh.runspec import RunSpec
    from megamesh.sharding.mesh import make_mesh
    from megamesh.train.config import ScheduleConfig, TrainConfig
    from megamesh.train.step import build_train_step

    run = RunSpec(layout="data=2,fsdp=4", remat="full", microbatches=2)
    tc = TrainConfig(steps=2, global_batch=16, seq_len=16, run=run,
                     schedule=ScheduleConfig(warmup_steps=1))
    ts = build_train_step(preset("tiny"), tc, make_mesh(run.layout))
    state = ts.abstract_state()
    tokens = jax.ShapeDtypeStruct((16, 17), jnp.int32, sharding=ts.batch_sharding)
    jaxpr = jax.make_jaxpr(ts.fn)(state, tokens).jaxpr
    want = {(tuple(a.shape), a.sharding.spec) for a in jax.tree.leaves(state["params"])}
    assert any(spec != P() for _, spec in want)  # something is sharded
    # the accumulation loop: one iteration per microbatch, the parameters' shapes carried
    scans = [e for e in all_eqns(jaxpr) if e.primitive.name == "scan"]
    loops = [e for e in scans if e.params["length"] == 2 and len(e.outvars) >= len(want)]
    assert len(loops) == 1, [e.params["length"] for e in scans]
    body = loops[0].params["jaxpr"].jaxpr
    got = {(tuple(e.outvars[0].aval.shape), e.params["sharding"].spec) for e in body.eqns
           if e.primitive.name == "sharding_constraint"
           and e.outvars[0].aval.dtype == jnp.float32}
    assert want <= got, want - got
