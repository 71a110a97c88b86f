"""Sampling and a simple one-sequence generator over the model's own KV-cached forward.

`sample` (temperature, top-k, top-p) is shared with the serving engine; `generate` is
the plain loop used by the quickstart and by tests as the reference decode.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from megamesh.config import ModelConfig
from megamesh.model.kvcache import init_cache
from megamesh.model.transformer import forward


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, allowed: jax.Array | None = None) -> jax.Array:
    """One token per row from logits (B, V); per-row temperature (0 = greedy), top_k (0 = off), top_p.

    `allowed` (B, ceil(V / 32)) int32: a bitmask per row of the tokens it may draw (bit i
    of word j: token 32 j + i; constrained decoding, `serve.engine`); all bits set leaves
    a row as it was.

    `key` is one key for the whole batch, or a batch of keys (B,), one per row: a row's
    draw then depends only on its own key and logits, not on the other rows.

    The vocabulary sort that top-k/top-p need is the costly part (XLA:CPU: ~50 ms for
    32 x 8192), so it runs only when some row asks for it (`lax.cond` runs one branch):
    all-greedy batches take an argmax, plain temperature sampling a categorical draw.
    """
    logits = logits.astype(jnp.float32)
    if allowed is not None:
        v = jnp.arange(logits.shape[-1])
        ok = (jnp.take(allowed, v // 32, axis=-1) >> (v % 32)) & 1  # (B, V)
        logits = jnp.where(ok.astype(bool), logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]

    def draw(x: jax.Array) -> jax.Array:
        if key.ndim == 1:
            out = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, x)
        else:
            out = jax.random.categorical(key, x, axis=-1)
        return jnp.where(temperature <= 0, greedy, out).astype(jnp.int32)

    def filtered() -> jax.Array:
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
        V = logits.shape[-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
        kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)
        x = jnp.where(scaled < kth, -jnp.inf, scaled)
        # top-p: keep the smallest prefix of sorted tokens whose probability reaches top_p.
        probs = jax.nn.softmax(jnp.where(sorted_logits < kth, -jnp.inf, sorted_logits), axis=-1)
        cum = jnp.cumsum(probs, axis=-1) - probs
        cutoff_idx = jnp.sum(cum < top_p[:, None], axis=-1) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx[:, None], axis=-1)
        return draw(jnp.where(x < cutoff, -jnp.inf, x))

    sampling = temperature > 0
    needs_filter = jnp.any(sampling & ((top_k > 0) | (top_p < 1.0)))
    return jax.lax.cond(
        jnp.any(sampling),
        lambda: jax.lax.cond(needs_filter, filtered, lambda: draw(scaled)),
        lambda: greedy)


def generate(params: Any, cfg: ModelConfig, prompt: list[int], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Generate up to max_new_tokens after `prompt` (greedy at temperature 0)."""
    n = len(prompt)
    total = n + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(f"prompt {n} + max_new_tokens {max_new_tokens} exceeds "
                         f"max_seq_len {cfg.max_seq_len}")
    fwd = jax.jit(lambda p, t, q, c: forward(p, t, q, c, cfg=cfg)[::2])  # (logits, cache)
    samp = jax.jit(sample)
    cache = init_cache(cfg, 1, total)
    logits, cache = fwd(params, jnp.asarray([prompt], jnp.int32), jnp.arange(n, dtype=jnp.int32)[None], cache)
    key = jax.random.key(seed)
    args = (jnp.asarray([temperature], jnp.float32), jnp.asarray([top_k], jnp.int32),
            jnp.asarray([top_p], jnp.float32))
    out: list[int] = []
    last = logits[:, -1]
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        tok = int(samp(last, sub, *args)[0])
        out.append(tok)
        if tok in stop_ids or i == max_new_tokens - 1:
            break
        logits, cache = fwd(params, jnp.asarray([[tok]], jnp.int32), jnp.asarray([[n + i]], jnp.int32), cache)
        last = logits[:, -1]
    return out
