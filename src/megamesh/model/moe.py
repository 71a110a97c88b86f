"""Mixture-of-experts MLP: softmax router, top-k, then grouped matmuls or einsum dispatch.

Glossary: B batch (one routing group per row), T tokens per row, D model, F expert ffw,
E experts, k top-k, C capacity (slots per expert per row), M = B*T*k routed copies.

All token-to-expert movement happens in `dispatch_compute_combine`, which runs the
backend's MoE kernel (`model.backend`):
- `grouped` (TPU): each device sorts its own tokens' k copies by expert and runs
  the experts' SwiGLU as three `jax.lax.ragged_dot` grouped matmuls over the sorted rows,
  then un-sorts and mixes. Memory O(M x F); dropless costs no padding. With a capacity
  factor the copies past an expert's capacity get weight 0 (the same tokens the einsum
  form drops; they are computed and discarded).
- `einsum` (CPU and GPU, where XLA lowers ragged_dot densely over every expert, and
  meshes that split experts over `expert` or `tensor`): GShard's
  one-hot dispatch and combine tensors (B, T, E, C); sharding E over the mesh's `expert`
  axis makes XLA insert the all-to-alls. Dropless (`capacity_factor=None`) means C = T,
  memory O(B * T^2 * E): for long sequences set a capacity factor or use `grouped`.
Both are tested equal (tests/test_kernels.py).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from megamesh.config import MoEConfig
from megamesh.model.axes import constrain
from megamesh.model.backend import active, matmul_inputs, matmul_precision, run_per_device
from megamesh.model.quant import QuantizedWeight, dequantized, fp8_dot_general, fp8_ragged_dot


def capacity(moe: MoEConfig, tokens_per_group: int) -> int:
    """Slots per expert per routing group."""
    if moe.capacity_factor is None:
        return tokens_per_group
    c = math.ceil(moe.capacity_factor * tokens_per_group * moe.top_k / moe.n_experts)
    return max(1, min(tokens_per_group, c))


def route(h: jax.Array, router: jax.Array, moe: MoEConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router: (probs (B,T,E) fp32, top-k weights (B,T,k) renormalized, top-k experts (B,T,k))."""
    logits = jnp.einsum("btd,de->bte", h, router.astype(h.dtype),
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, moe.top_k)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts


def load_balancing_loss(probs: jax.Array, experts: jax.Array, n_experts: int) -> jax.Array:
    """Switch-Transformer auxiliary loss: E * sum_e (share of routed slots to e) * (mean prob of e).

    Equals 1.0 for perfectly uniform routing.
    """
    assigned = jax.nn.one_hot(experts, n_experts, dtype=jnp.float32)  # (B,T,k,E)
    share = jnp.mean(jnp.sum(assigned, axis=2), axis=(0, 1)) / experts.shape[-1]
    mean_prob = jnp.mean(probs, axis=(0, 1))
    return n_experts * jnp.sum(share * mean_prob)


def _slots(experts: jax.Array, E: int) -> jax.Array:
    """Slot of each choice in its expert's buffer within its row (B,T,k); first choices
    of all tokens come first."""
    B, T, k = experts.shape
    onehot = jax.nn.one_hot(experts, E, dtype=jnp.int32)  # (B,T,k,E)
    by_choice = onehot.transpose(0, 2, 1, 3).reshape(B, k * T, E)
    slot = (jnp.cumsum(by_choice, axis=1) - 1) * by_choice
    return jnp.sum(slot.reshape(B, k, T, E).transpose(0, 2, 1, 3), axis=-1)


def dispatch_compute_combine(h: jax.Array, weights: jax.Array, experts: jax.Array,
                             p: dict[str, jax.Array], moe: MoEConfig) -> jax.Array:
    """Send each token to its top-k experts, run their SwiGLU, and mix back. (B,T,D) -> (B,T,D)."""
    if active()[0].moe == "einsum":
        return einsum_moe(h, weights, experts, p, moe)
    T = h.shape[1]
    if moe.capacity_factor is not None:  # drop what the einsum form drops
        weights = weights * (_slots(experts, moe.n_experts) < capacity(moe, T))
    cd = h.dtype
    w = [dequantized(p[n], cd) for n in ("w_gate", "w_up", "w_down")]
    tok = ("batch", "seq", None)
    return run_per_device(grouped_moe, (h, weights.astype(cd), experts, *w),
                          (tok, tok, tok) + ((None, None, None),) * 3, tok)


def grouped_moe(h: jax.Array, weights: jax.Array, experts: jax.Array, w_gate: jax.Array,
                w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """The experts' SwiGLU as grouped matmuls over one device's tokens, sorted by expert.
    h (B,T,D), weights and experts (B,T,k), w_gate/w_up (E,D,F), w_down (E,F,D)."""
    B, T, D = h.shape
    k, E = experts.shape[-1], w_gate.shape[0]
    flat = experts.reshape(-1)  # (M,)
    order = jnp.argsort(flat, stable=True)  # copies grouped by expert
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    x = h.reshape(B * T, D)[order // k]  # (M, D)

    def gmm(a: jax.Array, b: jax.Array) -> jax.Array:
        a2, b2 = matmul_inputs(a, b)
        if matmul_precision() == "fp8":
            return fp8_ragged_dot(a2, b2, sizes).astype(h.dtype)
        return jax.lax.ragged_dot(a2, b2, sizes).astype(h.dtype)

    act = jax.nn.silu(gmm(x, w_gate)) * gmm(x, w_up)  # (M, F)
    y = gmm(act, w_down)  # (M, D)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    y = y[inverse].reshape(B, T, k, D)  # back in token order
    return jnp.einsum("btkd,btk->btd", y, weights.astype(y.dtype))


def expert_matmul(x: jax.Array, w: Any) -> jax.Array:
    """Each expert's tokens times its weight: x (B, E, C, in) @ w (E, in, out) -> (B, E, C, out)
    in x's dtype (in FP8 under the run's fp8 precision; a serving QuantizedWeight's values
    upcast in the matmul, its per-(expert, output) scales on the product)."""
    if isinstance(w, QuantizedWeight):
        y = jnp.einsum("becd,edf->becf", x, w.values.astype(x.dtype),
                       preferred_element_type=jnp.float32)
        return (y * w.scale[None]).astype(x.dtype)  # scale (E, 1, out)
    w = w.astype(x.dtype)
    if matmul_precision() != "fp8":
        return jnp.einsum("becd,edf->becf", x, w)
    y = fp8_dot_general(x, w, (((3,), (1,)), ((1,), (0,))))  # (E, B, C, out)
    return jnp.transpose(y, (1, 0, 2, 3))


def einsum_moe(h: jax.Array, weights: jax.Array, experts: jax.Array,
               p: dict[str, jax.Array], moe: MoEConfig) -> jax.Array:
    """GShard's one-hot dispatch and combine (the reference form)."""
    B, T, D = h.shape
    E = moe.n_experts
    C = capacity(moe, T)
    onehot = jax.nn.one_hot(experts, E, dtype=h.dtype)  # (B,T,k,E)
    slot = _slots(experts, E)
    kept = (slot < C).astype(h.dtype)
    slot_onehot = jax.nn.one_hot(slot, C, dtype=h.dtype)  # (B,T,k,C); slot >= C -> zeros
    dispatch = jnp.einsum("btk,btke,btkc->btec", kept, onehot, slot_onehot)
    combine = jnp.einsum("btk,btke,btkc->btec", weights.astype(h.dtype) * kept, onehot, slot_onehot)

    x = jnp.einsum("btec,btd->becd", dispatch, h)
    x = constrain(x, ("batch", "expert", None, "embed"))
    gate = expert_matmul(x, p["w_gate"])  # in the compute dtype (h's, x's)
    up = expert_matmul(x, p["w_up"])
    act = constrain(jax.nn.silu(gate) * up, ("batch", "expert", None, "mlp"))
    y = expert_matmul(act, p["w_down"])
    y = constrain(y, ("batch", "expert", None, "embed"))
    return jnp.einsum("btec,becd->btd", combine, y)
