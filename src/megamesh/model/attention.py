"""Attention: RoPE and grouped-query attention (the plain formula every kernel is tested
against; the KV cache's pages are in `model.kvcache`).

Glossary: B batch, T query length, S key length, H query heads, K kv heads,
G = H / K query heads per kv head, Dh head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from megamesh.config import ModelConfig
from megamesh.model.axes import constrain
from megamesh.model.backend import matmul_inputs

_NEG = -1e30  # large negative score for masked keys (finite: no NaN from inf - inf)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies (Dh/2,), with Llama 3.1 scaling when configured (float32)."""
    dh = cfg.resolved_head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.int64).astype(np.float32) / dh))
    rs = cfg.rope_scaling
    if rs is None:
        return inv.astype(np.float32)
    low_wavelen = rs.original_max_position / rs.low_freq_factor
    high_wavelen = rs.original_max_position / rs.high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin, each (B, T, Dh), for integer positions (B, T)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate (B, T, N, Dh) by position; halves convention (Hugging Face's rotate_half)."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
           k_pos: jax.Array, q_seg: jax.Array | None = None,
           k_seg: jax.Array | None = None) -> jax.Array:
    """Causal grouped-query attention.

    q (B, T, H, Dh); k, v (B, S, K, Dh); q_pos (B, T) and k_pos (B, S) integer positions.
    A query attends to keys at positions <= its own, and with segment ids q_seg (B, T)
    and k_seg (B, S) (the documents of a packed sequence) only to keys of its own
    segment. Returns (B, T, H, Dh).
    """
    B, T, H, Dh = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, Dh)
    mask = k_pos[:, None, None, None, :] <= q_pos[:, None, None, :, None]  # (B,1,1,T,S)
    if q_seg is not None:
        mask = mask & (k_seg[:, None, None, None, :] == q_seg[:, None, None, :, None])
    if T == 1:
        # decode: one query per row. As multiply-and-reduce instead of a batch of tiny
        # matmuls, XLA fuses the read of the cache slice into the reduction (no copy of
        # the cache per layer and step): ~2x faster decode at long context on XLA:CPU.
        prod = qg[:, 0, None].astype(jnp.float32) * k[:, :, :, None, :].astype(jnp.float32)
        scores = jnp.moveaxis(jnp.sum(prod, axis=-1), 1, -1)[:, :, :, None, :]  # (B,K,G,1,S)
    else:
        scores = jnp.einsum("btkgd,bskd->bkgts", *matmul_inputs(qg, k),
                            preferred_element_type=jnp.float32)
    scores = scores * (Dh**-0.5)
    scores = jnp.where(mask, scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if T == 1:
        vt = jnp.moveaxis(v, 1, 2)[:, :, None].astype(jnp.float32)  # (B,K,1,S,Dh)
        pv = probs[:, :, :, 0, :, None].astype(jnp.float32) * vt
        out = jnp.sum(pv, axis=3).astype(v.dtype)[:, None]  # (B,1,K,G,Dh)
    else:
        out = jnp.einsum("bkgts,bskd->btkgd", *matmul_inputs(probs, v)).astype(v.dtype)
    return constrain(out.reshape(B, T, H, Dh), ("batch", "seq", "heads", "head_dim"))
