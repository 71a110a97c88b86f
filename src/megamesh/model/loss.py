"""Next-token cross-entropy from the final hidden state, chunked and fused.

`cross_entropy(x, w, targets, chunks, fused)` is the mean over tokens of
-log softmax(x @ w)[target]. With `fused=False` it is the plain computation (logits for
every token at once; autodiff derives the gradient): the reference, and what eval-only
callers may use. With `fused=True` (what the train step uses on every platform) the
tokens are taken `chunks` slices of the sequence at a time, and the gradient is computed
in the same pass as the loss (a custom VJP): for each slice the logits, their softmax,
the gradient of the logits (softmax - one-hot) and from it the slice's input gradient
and its share of the head's gradient, so a slice's logits are used while they are still
in cache (CPU) or on chip, and no (tokens, vocab) array is ever held whole. The backward
pass then only scales the stored gradients by the loss's cotangent. This is exact (the
same formulas autodiff uses; the head's gradient is summed slice by slice in f32, so its
rounding differs in the last bits). Under the backend's `native` matmuls the logits'
gradient enters both gradient GEMMs in the compute dtype (bf16 operands, f32
accumulation), as a bf16 model's own layers do. It works under GSPMD: the logits keep
the ("batch", "seq", "vocab") layout, so with the head split on vocab each device scores
its vocabulary slice and the softmax max and sum are reduced across the group per slice.

Measured on the CPU bench model (BENCHMARKS.md): per device of an 8-device vocab-parallel
step, 8192 tokens against a 4000-wide vocabulary slice, loss + gradient 306 ms plain,
235 ms in 8 slices. Tried: the same loss as an explicit per-device program (shard_map:
one gather of the activations, one collective per slice, one reduce-scatter of the input
gradient instead of GSPMD's ~7 small collectives per slice): no faster (8-device bench
step 3.83 vs 3.72 s).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from megamesh.model.axes import compute_weight, constrain
from megamesh.model.backend import native_matmuls
from megamesh.model.transformer import dense

_LOGITS = ("batch", "seq", "vocab")
_HIDDEN = ("batch", "seq", "embed")


def _logits(x: jax.Array, w: jax.Array) -> jax.Array:
    return constrain(dense(x, w, out_dtype=jnp.float32, fp8=False), _LOGITS)


def _nll_and_probs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and the softmax, in float32."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (m + jnp.log(s))[..., 0] - picked, e / s


def _split(a: jax.Array, n: int) -> jax.Array:
    """(B, T, ...) -> (n, B, T/n, ...): n slices of the sequence."""
    B, T = a.shape[:2]
    return jnp.moveaxis(a.reshape(B, n, T // n, *a.shape[2:]), 1, 0)


def _join(a: jax.Array) -> jax.Array:
    """(n, B, Tn, ...) -> (B, n*Tn, ...)."""
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(a.shape[0], -1, *a.shape[3:])


def cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array, chunks: int = 1,
                  fused: bool | None = None) -> jax.Array:
    """Mean next-token cross-entropy. x (B, T, D) hidden states, w (D, V) head in compute
    layout, targets (B, T) int; `chunks` must divide T. `fused` (default: chunks > 1)
    selects the fused loss-and-gradient pass."""
    T = x.shape[1]
    if chunks < 1 or T % chunks:
        raise ValueError(f"loss chunks {chunks} must be a positive divisor of the sequence length {T}")
    if not (chunks > 1 if fused is None else fused):
        logits = _logits(x, w)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)
    n_tokens = targets.size
    native = native_matmuls()

    def loss_only(x: jax.Array, w: jax.Array, targets: jax.Array) -> jax.Array:
        def body(total: jax.Array, c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
            xc, tc = c
            nll, _ = _nll_and_probs(_logits(xc, w), tc)
            return total + jnp.sum(nll), None

        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                                (_split(x, chunks), _split(targets, chunks)))
        return total / n_tokens

    def fwd(x: jax.Array, w: jax.Array, targets: jax.Array) -> tuple[jax.Array, Any]:
        V = w.shape[1]

        def body(carry: tuple[jax.Array, jax.Array], c: tuple[jax.Array, jax.Array]) -> Any:
            total, dw = carry
            xc, tc = c
            nll, p = _nll_and_probs(_logits(xc, w), tc)
            # d(mean nll)/d logits = (softmax - one_hot) / tokens
            d = constrain((p - jax.nn.one_hot(tc, V, dtype=p.dtype)) / n_tokens, _LOGITS)
            if native:  # bf16 operands for both gradient GEMMs, f32 accumulation
                d, xt = d.astype(x.dtype), jnp.moveaxis(xc, -1, 0)
            else:
                xt = jnp.moveaxis(xc.astype(jnp.float32), -1, 0)
            dx = constrain(dense(d, w.T, out_dtype=x.dtype if native else jnp.float32, fp8=False), _HIDDEN)
            # the head's gradient: sum over the slice's tokens of x^T d, as one 2-D GEMM
            dw = dw + dense(xt, d, n_in=2, out_dtype=jnp.float32, fp8=False)
            dw = compute_weight(dw, ("embed", "vocab"), jnp.float32)
            return (total + jnp.sum(nll), dw), dx

        zeros = compute_weight(jnp.zeros(w.shape, jnp.float32), ("embed", "vocab"), jnp.float32)
        (total, dw), dx = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                       (_split(x, chunks), _split(targets, chunks)))
        return total / n_tokens, (constrain(_join(dx), _HIDDEN), dw)

    def bwd(res: Any, g: jax.Array) -> tuple[jax.Array, jax.Array, None]:
        dx, dw = res
        return (dx * g).astype(x.dtype), (dw * g).astype(w.dtype), None

    fused = jax.custom_vjp(loss_only)
    fused.defvjp(fwd, bwd)
    return fused(x, w, targets)
