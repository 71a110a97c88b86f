"""Pipeline stages over a stack of layers: GPipe and its circular (interleaved) variant.

    run_pipeline(stage_fn, stacked, x, extras, stages=P, microbatches=M, repeats=R)

equals running every layer of `stacked` in order on every row of x, but as a pipeline:
the layers (L of them, stacked on axis 0) are cut into R x P chunks of L / (R P); stage
p holds chunks p, P + p, ..., (R - 1) P + p (R = 1: GPipe's contiguous stages; R > 1:
the circular schedule, MaxText's `num_pipeline_repeats`, Megatron's interleaving); the
batch is cut into M microbatches (strided: row b goes to microbatch b mod M, so a row
never leaves the device that holds it) that flow through the stages, one stage a step.

The schedule is a loop of M R + P - 1 iterations. At iteration i stage p works on item
k = i - p (microbatch k mod M, repeat k // M) when 0 <= k < M R, else idles (the bubble:
(P - 1) / (M R + P - 1) of the iterations). Stage 0 takes a fresh microbatch on repeat 0
and the last stage's output for that microbatch on later repeats (so M >= P); every
other stage takes what the stage before it produced the iteration before (a shift along
the stage axis: a collective permute when that axis is split over devices). All stages
run as one `vmap` over the stage axis, so with that axis split over devices (`pin_state`,
`pin_weights`: sharding constraints on it) each device computes only its stages. The
backward pass is autodiff of the loop: all forwards, then all backwards (GPipe's
schedule; activations of every microbatch in flight are kept, as remat inside
`stage_fn` decides).

`stage_fn(chunk, x, extra) -> (x, aux)` runs one chunk of layers (chunk: `stacked` with
its layer axis cut to L / (R P)) on one microbatch, aux a scalar (e.g. an MoE balancing
loss, summed over the real items); `extras` (e.g. rotary tables, segment ids: arrays
with the batch first) travel with their microbatch.

Idle stages still compute (on zeros; their results are dropped): the bubble costs its
share of the step's time, and with autodiff's residuals its share of memory too, so a
stage holds the saved activations of its layers for M + (P - 1) / R microbatches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class Stages:
    """How the train step pipelines its layer stacks: `stages` (the mesh's stage axis),
    `microbatches` per pass, `repeats` (1: GPipe; > 1: circular)."""

    stages: int
    microbatches: int
    repeats: int = 1

    @property
    def bubble(self) -> float:
        return bubble_fraction(self.stages, self.microbatches, self.repeats)

    def describe(self) -> str:
        kind = "GPipe" if self.repeats == 1 else f"circular, {self.repeats} chunks per stage"
        return (f"pipeline {self.stages} stages x {self.microbatches} microbatches ({kind}, "
                f"bubble {self.bubble:.0%} of the schedule)")


def _chunks(stacked: Any, stages: int, repeats: int) -> Any:
    """Leaves (L, ...) -> (R, P, L / (R P), ...): chunk (r, p) is layers
    [(r P + p) L/(RP), (r P + p + 1) L/(RP))."""

    def cut(a: jax.Array) -> jax.Array:
        n = a.shape[0]
        if n % (stages * repeats):
            raise ValueError(f"{n} layers do not split into {stages} stages x {repeats} repeats")
        return a.reshape(repeats, stages, n // (stages * repeats), *a.shape[1:])

    return jax.tree.map(cut, stacked)


def schedule(stages: int, microbatches: int, repeats: int = 1) -> np.ndarray:
    """The schedule `run_pipeline` runs, as a table: (iterations, stages) of the item each
    stage works on (microbatch k mod M on repeat k // M), -1 where it idles."""
    P, M, R = stages, microbatches, repeats
    k = np.arange(M * R + P - 1)[:, None] - np.arange(P)[None, :]
    return np.where((k >= 0) & (k < M * R), k, -1)


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Idle share of the schedule's stage-iterations: (P - 1) / (M R + P - 1)."""
    return (stages - 1) / (microbatches * repeats + stages - 1)


def run_pipeline(stage_fn: Callable[[Any, jax.Array, Any], tuple[jax.Array, jax.Array]],
                 stacked: Any, x: jax.Array, extras: Any = None, *, stages: int,
                 microbatches: int, repeats: int = 1,
                 pin_state: Callable[[jax.Array], jax.Array] | None = None,
                 pin_weights: Callable[[Any], Any] | None = None,
                 spmd_axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
    """x (B, ...) through every layer of `stacked` as a P-stage pipeline (module doc):
    (output shaped like x, the sum of `stage_fn`'s aux over every stage's real items).

    `pin_state` is applied to the (P, B / M, ...) stage buffer and `pin_weights` to the
    stages' weights (leaves (P, L / (R P), ...)): e.g. sharding constraints that split
    the leading stage axis over the mesh's stage axis; `spmd_axis_name` names that mesh
    axis for the vmap over stages (sharding constraints inside `stage_fn` then keep it)."""
    P, M, R = stages, microbatches, repeats
    B = x.shape[0]
    if P < 1 or M < 1 or R < 1:
        raise ValueError(f"stages {P}, microbatches {M}, repeats {R}: all must be positive")
    if B % M:
        raise ValueError(f"batch {B} does not split into {M} microbatches")
    if R > 1 and M < P:
        raise ValueError(f"the circular schedule needs microbatches ({M}) >= stages ({P})")
    pin = pin_state or (lambda a: a)
    pin_w = pin_weights or (lambda t: t)
    chunks = _chunks(stacked, P, R)
    # microbatch m holds rows m, M + m, 2 M + m, ...: the rows a device holds stay on it
    # (the batch dimension is split over devices in contiguous blocks)
    xs, ex = jax.tree.map(lambda a: a.reshape(B // M, M, *a.shape[1:]).swapaxes(0, 1),
                          (x, extras))
    n_iter = M * R + P - 1
    stage_ids = jnp.arange(P)
    run = jax.vmap(stage_fn, spmd_axis_name=spmd_axis_name)

    def stage_weights(r: jax.Array) -> Any:
        # chunk (r[p], p) for every stage p: a gather over the repeat axis per stage. Even
        # with one repeat it is indexed by the iteration's r: weights that did not depend on
        # the iteration would be loop-invariant, and autodiff of the loop hoists what is
        # computed from them (each layer's gathered compute-dtype weights) out of it and
        # keeps it for the backward pass: every layer of the stage gathered at once
        return pin_w(jax.tree.map(lambda c: jax.vmap(lambda cp, rp: cp[rp], in_axes=(1, 0))(c, r),
                                  chunks))

    def body(carry: tuple[jax.Array, jax.Array, jax.Array], i: jax.Array) -> tuple[Any, None]:
        state, outs, aux = carry
        k = i - stage_ids  # each stage's item this iteration (`schedule`)
        valid = (k >= 0) & (k < M * R)
        kc = jnp.clip(k, 0, M * R - 1)
        m, r = kc % M, kc // M
        # stage 0: a fresh microbatch on repeat 0, its last-stage output on later repeats
        first = xs[m[0]] if R == 1 else jnp.where(r[0] == 0, xs[m[0]], outs[m[0]])
        inputs = pin(jnp.concatenate([first[None], state[:-1]], axis=0))
        extra = jax.tree.map(lambda e: e[m], ex)  # each stage's microbatch's extras
        out, a = run(stage_weights(r), inputs, extra)
        out = pin(jnp.where(valid.reshape((P,) + (1,) * (out.ndim - 1)), out, 0))
        aux = aux + jnp.sum(jnp.where(valid, a, 0))
        # the last stage's output is kept for its microbatch (read again on the next repeat)
        done = valid[-1]
        outs = outs.at[m[-1]].set(jnp.where(done, out[-1], outs[m[-1]]))
        return (out, outs, aux), None

    state0 = pin(jnp.zeros((P,) + xs.shape[1:], x.dtype))
    outs0 = jnp.zeros_like(xs)
    carry0 = (state0, outs0, jnp.zeros((), jnp.float32))
    (_, outs, aux), _ = jax.lax.scan(body, carry0, jnp.arange(n_iter))
    return outs.swapaxes(0, 1).reshape(x.shape), aux
