"""Pipeline stages over a stack of layers: GPipe and its circular (interleaved) variant.

    run_pipeline(stage_fn, stacked, x, extras, stages=P, microbatches=M, repeats=R)

equals running every layer of `stacked` in order on every row of x, but as a pipeline:
the layers (L of them, stacked on axis 0) are cut into R x P chunks of L / (R P); stage
p holds chunks p, P + p, ..., (R - 1) P + p (R = 1: GPipe's contiguous stages; R > 1:
the circular schedule, MaxText's `num_pipeline_repeats`, Megatron's interleaving); the
batch is cut into M microbatches that flow through the stages, one stage a step.

The schedule is a loop of M R + P - 1 iterations. At iteration i stage p works on item
k = i - p (microbatch k mod M, repeat k // M) when 0 <= k < M R, else idles (the bubble:
(P - 1) / (M R + P - 1) of the iterations). Stage 0 takes a fresh microbatch on repeat 0
and the last stage's output for that microbatch on later repeats (so M >= P); every
other stage takes what the stage before it produced the iteration before (a shift along
the stage axis: a collective permute when that axis is split over devices). All stages
run as one `vmap` over the stage axis, so with that axis split over devices (`constrain`:
a sharding constraint on it) each device computes only its stages. The backward pass is autodiff of
the loop: all forwards, then all backwards (GPipe's schedule; activations of every
microbatch in flight are kept, as remat inside `stage_fn` decides).

`stage_fn(chunk, x, extra) -> x` runs one chunk of layers (chunk: `stacked` with its
layer axis cut to L / (R P)) on one microbatch; `extras` (e.g. positions, segment ids:
arrays with the batch first) travel with their microbatch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def _chunks(stacked: Any, stages: int, repeats: int) -> Any:
    """Leaves (L, ...) -> (R, P, L / (R P), ...): chunk (r, p) is layers
    [(r P + p) L/(RP), (r P + p + 1) L/(RP))."""

    def cut(a: jax.Array) -> jax.Array:
        n = a.shape[0]
        if n % (stages * repeats):
            raise ValueError(f"{n} layers do not split into {stages} stages x {repeats} repeats")
        return a.reshape(repeats, stages, n // (stages * repeats), *a.shape[1:])

    return jax.tree.map(cut, stacked)


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Idle share of the schedule's iterations: (P - 1) / (M R + P - 1)."""
    return (stages - 1) / (microbatches * repeats + stages - 1)


def run_pipeline(stage_fn: Callable[[Any, jax.Array, Any], jax.Array], stacked: Any,
                 x: jax.Array, extras: Any = None, *, stages: int, microbatches: int,
                 repeats: int = 1, constrain: Callable[[jax.Array], jax.Array] | None = None
                 ) -> jax.Array:
    """x (B, ...) through every layer of `stacked` as a P-stage pipeline (module doc).

    `constrain`, if given, is applied to every array with a leading stage axis (the
    stage buffer, each stage's weights): e.g. a sharding constraint that splits that
    axis over the mesh's stage axis."""
    P, M, R = stages, microbatches, repeats
    B = x.shape[0]
    if P < 1 or M < 1 or R < 1:
        raise ValueError(f"stages {P}, microbatches {M}, repeats {R}: all must be positive")
    if B % M:
        raise ValueError(f"batch {B} does not split into {M} microbatches")
    if R > 1 and M < P:
        raise ValueError(f"the circular schedule needs microbatches ({M}) >= stages ({P})")
    pin = constrain or (lambda a: a)
    chunks = _chunks(stacked, P, R)
    xs, ex = jax.tree.map(lambda a: a.reshape(M, B // M, *a.shape[1:]), (x, extras))
    n_iter = M * R + P - 1
    stage_ids = jnp.arange(P)

    def stage_weights(r: jax.Array) -> Any:
        # chunk (r[p], p) for every stage p: a gather over the repeat axis per stage
        return jax.tree.map(lambda c: pin(jax.vmap(lambda cp, rp: cp[rp], in_axes=(1, 0))(c, r)),
                            chunks)

    def body(carry: tuple[jax.Array, jax.Array], i: jax.Array) -> tuple[tuple[jax.Array, jax.Array], None]:
        state, outs = carry
        k = i - stage_ids  # each stage's item this iteration
        valid = (k >= 0) & (k < M * R)
        kc = jnp.clip(k, 0, M * R - 1)
        m, r = kc % M, kc // M
        # stage 0: a fresh microbatch on repeat 0, its last-stage output on later repeats
        first = jnp.where(r[0] == 0, xs[m[0]], outs[m[0]])
        inputs = pin(jnp.concatenate([first[None], state[:-1]], axis=0))
        extra = jax.tree.map(lambda e: e[m], ex)  # each stage's microbatch's extras
        out = jax.vmap(stage_fn)(stage_weights(r), inputs, extra)
        out = pin(jnp.where(valid.reshape((P,) + (1,) * (out.ndim - 1)), out, 0))
        # the last stage's output is kept for its microbatch (read again on the next repeat)
        done = valid[-1]
        outs = outs.at[m[-1]].set(jnp.where(done, out[-1], outs[m[-1]]))
        return (out, outs), None

    state0 = pin(jnp.zeros((P,) + xs.shape[1:], x.dtype))
    outs0 = jnp.zeros_like(xs)
    (_, outs), _ = jax.lax.scan(body, (state0, outs0), jnp.arange(n_iter))
    return outs.reshape(x.shape)
