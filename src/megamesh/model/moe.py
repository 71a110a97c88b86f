"""Mixture-of-experts MLP: softmax router, top-k, capacity-based einsum dispatch.

Glossary: B batch (one routing group per row), T tokens per row, D model, F expert ffw,
E experts, k top-k, C capacity (slots per expert per row).

All token-to-expert movement happens in `dispatch_compute_combine`, so a grouped-matmul
kernel (megablox / ragged_dot) can replace this einsum form in one place. The einsum
form is GShard's: one-hot dispatch and combine tensors (B, T, E, C). Sharding the E axis
over the mesh's `expert` axis makes XLA insert the all-to-alls. With
`capacity_factor=None` the capacity is T (dropless: no routed token is ever dropped),
which costs memory O(B * T^2 * E); set a capacity factor for long sequences.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from megamesh.config import MoEConfig
from megamesh.model.axes import constrain


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


def dispatch_compute_combine(h: jax.Array, weights: jax.Array, experts: jax.Array,
                             p: dict[str, jax.Array], moe: MoEConfig) -> jax.Array:
    """Send each token to its top-k experts, run their SwiGLU, and mix back. (B,T,D) -> (B,T,D)."""
    B, T, D = h.shape
    E, k = moe.n_experts, moe.top_k
    C = capacity(moe, T)
    onehot = jax.nn.one_hot(experts, E, dtype=jnp.int32)  # (B,T,k,E)
    # Slot of each choice in its expert's buffer; first choices of all tokens come first.
    by_choice = onehot.transpose(0, 2, 1, 3).reshape(B, k * T, E)
    slot = (jnp.cumsum(by_choice, axis=1) - 1) * by_choice
    slot = jnp.sum(slot.reshape(B, k, T, E).transpose(0, 2, 1, 3), axis=-1)  # (B,T,k)
    kept = (slot < C).astype(h.dtype)
    slot_onehot = jax.nn.one_hot(slot, C, dtype=h.dtype)  # (B,T,k,C); slot >= C -> zeros
    onehot = onehot.astype(h.dtype)
    dispatch = jnp.einsum("btk,btke,btkc->btec", kept, onehot, slot_onehot)
    combine = jnp.einsum("btk,btke,btkc->btec", weights.astype(h.dtype) * kept, onehot, slot_onehot)

    x = jnp.einsum("btec,btd->becd", dispatch, h)
    x = constrain(x, ("batch", "expert", None, "embed"))
    cd = h.dtype
    gate = jnp.einsum("becd,edf->becf", x, p["w_gate"].astype(cd))
    up = jnp.einsum("becd,edf->becf", x, p["w_up"].astype(cd))
    act = constrain(jax.nn.silu(gate) * up, ("batch", "expert", None, "mlp"))
    y = jnp.einsum("becf,efd->becd", act, p["w_down"].astype(cd))
    y = constrain(y, ("batch", "expert", None, "embed"))
    return jnp.einsum("btec,becd->btd", combine, y)
