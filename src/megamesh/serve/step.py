"""The serving steps: prefill one request into a cache slot, and decode one token for every
slot of a fixed-size batch, both through the model's own KV-cached forward. The engine runs
these objects; `megamesh compile --step decode` lowers the same decode step for a TPU.

Weights are held in the serving dtype (bf16 by default) with the `serve` strategy: tensor
and expert parallel, no FSDP gathers per token; the batch (decode slots) over data; the
KV cache split by kv head. Per slot: a token, its position and sampling parameters.

Shape buckets: a step is compiled per attention length A (the cache slots it reads), so a
batch of short sequences does not read the whole context; every position written or read
must be below A. The decode batch is always all slots and a prefill always one request,
so a request's numbers do not depend on what else is running (the engine's tokens for a
request are the same alone or among 64 others).

Random draws: the token at position p of a request is drawn with key
fold_in(key(seed), p), so sampling with a seed is reproducible whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from megamesh.config import ModelConfig
from megamesh.model.generate import sample
from megamesh.model.specs import param_specs
from megamesh.model.transformer import forward, init_cache, unflatten
from megamesh.sharding.rules import (
    activation_sharding,
    cache_shardings,
    data_sharding,
    param_shardings,
    strategy,
)


class SlotSampling(NamedTuple):
    """A step's sampling parameters, one entry per row (a pytree: one argument of the
    jitted steps): the seed of the row's random draws, temperature (0 = greedy), top-k
    (0 = off) and top-p. Scalars for a prefill (one request), (B,) arrays for decode."""

    seed: Any  # uint32
    temperature: Any  # float32
    top_k: Any  # int32
    top_p: Any  # float32

    @staticmethod
    def rows(rows: list[tuple[int, float, int, float]], batch: int) -> SlotSampling:
        """(B,) numpy arrays from (seed, temperature, top_k, top_p) per row; rows past
        the list are greedy (their tokens are not used)."""
        out = SlotSampling(np.zeros(batch, np.uint32), np.zeros(batch, np.float32),
                           np.zeros(batch, np.int32), np.ones(batch, np.float32))
        for i, row in enumerate(rows):
            for arr, v in zip(out, row):
                arr[i] = v
        return out

    @staticmethod
    def one(seed: int, temperature: float, top_k: int, top_p: float) -> SlotSampling:
        return SlotSampling(np.uint32(seed), np.float32(temperature), np.int32(top_k),
                            np.float32(top_p))

    @staticmethod
    def abstract(batch: int, sharding: Any) -> SlotSampling:
        slot = lambda dt: jax.ShapeDtypeStruct((batch,), dt, sharding=sharding)
        return SlotSampling(slot(jnp.uint32), slot(jnp.float32), slot(jnp.int32), slot(jnp.float32))


def row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """One key per row: fold_in(key(seed), position)."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


@dataclass(frozen=True)
class DecodeStep:
    fn: Any  # jitted (params, cache, tokens (B,), positions (B,), SlotSampling of (B,))
    #          -> (next tokens (B,), logits (B, V) f32, cache); donates the cache
    param_shardings: Any
    cache_shardings: Any
    slot_sharding: NamedSharding
    mesh: Mesh
    batch: int
    max_len: int
    dtype: str
    attend_len: int | None = None
    cache_rows: int | None = None  # default: batch

    def abstract_args(self, cfg: ModelConfig) -> tuple:
        """ShapeDtypeStructs of every argument (for AOT compile)."""
        params = unflatten({n: jax.ShapeDtypeStruct(s.shape, jnp.dtype(self.dtype))
                            for n, s in param_specs(cfg).items()})
        params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                              params, self.param_shardings)
        cache = jax.eval_shape(lambda: init_cache(cfg, self.cache_rows or self.batch, self.max_len))
        cache = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                             cache, self.cache_shardings)
        return (params, cache, *self.slot_args())

    def slot_args(self) -> tuple:
        """ShapeDtypeStructs of the per-slot arguments: tokens, positions, sampling."""
        slot = lambda dt: jax.ShapeDtypeStruct((self.batch,), dt, sharding=self.slot_sharding)
        return (slot(jnp.int32), slot(jnp.int32), SlotSampling.abstract(self.batch, self.slot_sharding))


def build_decode_step(cfg: ModelConfig, mesh: Mesh, batch: int, max_len: int,
                      dtype: str = "bfloat16", attend_len: int | None = None,
                      cache_rows: int | None = None) -> DecodeStep:
    """One decode step for `batch` rows. With `cache_rows` > batch, the cache has that many
    rows and the step runs its first `batch` (the busy slots; the cache's batch dim must
    not be sharded then)."""
    rules = strategy("serve")
    p_shard = param_shardings(cfg, mesh, rules)
    rows = cache_rows or batch
    c_shard = cache_shardings(jax.eval_shape(lambda: init_cache(cfg, rows, max_len)), mesh, rules)
    slot = NamedSharding(mesh, PartitionSpec(*data_sharding(mesh, rules, (batch, 1)).spec[:1]))

    def step(params, cache, tokens, positions, sampling: SlotSampling):
        with activation_sharding(mesh, rules):
            out = forward(params, tokens[:, None], positions[:, None], cache, cfg=cfg,
                          attend_len=attend_len)
        logits, cache = out.logits, out.cache
        logits = logits[:, -1]  # (B, V) f32
        keys = row_keys(sampling.seed, positions + 1)
        tok = sample(logits, keys, sampling.temperature, sampling.top_k, sampling.top_p)
        return tok, logits, cache

    fn = jax.jit(step, in_shardings=(p_shard, c_shard, slot, slot, slot),
                 out_shardings=(slot, None, c_shard), donate_argnums=1)
    return DecodeStep(fn=fn, param_shardings=p_shard, cache_shardings=c_shard, slot_sharding=slot,
                      mesh=mesh, batch=batch, max_len=max_len, dtype=dtype, attend_len=attend_len,
                      cache_rows=rows)


def build_prefill_step(cfg: ModelConfig, ds: DecodeStep, length: int) -> Any:
    """Jitted (params, cache, tokens (1, length), n (), slot (), SlotSampling of scalars)
    -> (first token (), cache): runs the first n tokens (the rest is padding) of one
    request into cache row `slot` and draws the token at position n."""
    rules = strategy("serve")
    rep = NamedSharding(ds.mesh, PartitionSpec())

    def prefill(params, cache, tokens, n, slot, sampling: SlotSampling):
        row = jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=1), cache)
        positions = jnp.arange(length, dtype=jnp.int32)[None]
        with activation_sharding(ds.mesh, rules):
            out = forward(params, tokens, positions, row, cfg=cfg, attend_len=length,
                          logits_at=(n - 1)[None])
        logits, row = out.logits, out.cache
        cache = jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, axis=1),
                             cache, row)
        s = jax.tree.map(lambda x: x[None], sampling)
        tok = sample(logits[:, 0], row_keys(s.seed, n[None]), s.temperature, s.top_k, s.top_p)
        return tok[0], cache

    return jax.jit(prefill, in_shardings=(ds.param_shardings, ds.cache_shardings) + (rep,) * 4,
                   out_shardings=(rep, ds.cache_shardings), donate_argnums=1)


def build_move_row(ds: DecodeStep) -> Any:
    """Jitted (cache, src (), dst ()) -> cache with row src copied to row dst (in place)."""
    rep = NamedSharding(ds.mesh, PartitionSpec())

    def move(cache, src, dst):
        def one(c):
            row = jax.lax.dynamic_slice_in_dim(c, src, 1, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(c, row, dst, axis=1)
        return jax.tree.map(one, cache)

    return jax.jit(move, in_shardings=(ds.cache_shardings, rep, rep), out_shardings=ds.cache_shardings,
                   donate_argnums=0)
