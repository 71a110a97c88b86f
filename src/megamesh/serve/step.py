"""The decode step: one token for every slot of a fixed-size batch, through the model's own
KV-cached forward. The serving engine runs this object; `megamesh compile --step decode`
lowers the same one for a TPU topology.

Weights are held in the serving dtype (bf16 by default) with the `serve` strategy: tensor
and expert parallel, no FSDP gathers per token; the batch (decode slots) over data; the
KV cache split by kv head. Per slot: a token, its position and sampling parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
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


@dataclass(frozen=True)
class DecodeStep:
    fn: Any  # jitted (params, cache, tokens (B,), positions (B,), key, temperature, top_k, top_p)
    #          -> (next tokens (B,), logits (B, V) f32, cache); donates the cache
    param_shardings: Any
    cache_shardings: Any
    slot_sharding: NamedSharding
    mesh: Mesh
    batch: int
    max_len: int
    dtype: str

    def abstract_args(self, cfg: ModelConfig) -> tuple:
        """ShapeDtypeStructs of every argument (for AOT compile)."""
        params = unflatten({n: jax.ShapeDtypeStruct(s.shape, jnp.dtype(self.dtype))
                            for n, s in param_specs(cfg).items()})
        params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                              params, self.param_shardings)
        cache = jax.eval_shape(lambda: init_cache(cfg, self.batch, self.max_len))
        cache = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                             cache, self.cache_shardings)
        slot = lambda dt: jax.ShapeDtypeStruct((self.batch,), dt, sharding=self.slot_sharding)
        rep = NamedSharding(self.mesh, PartitionSpec())
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
        return (params, cache, slot(jnp.int32), slot(jnp.int32), key, slot(jnp.float32),
                slot(jnp.int32), slot(jnp.float32))


def build_decode_step(cfg: ModelConfig, mesh: Mesh, batch: int, max_len: int,
                      dtype: str = "bfloat16") -> DecodeStep:
    rules = strategy("serve")
    p_shard = param_shardings(cfg, mesh, rules)
    c_shard = cache_shardings(jax.eval_shape(lambda: init_cache(cfg, batch, max_len)), mesh, rules)
    slot = NamedSharding(mesh, PartitionSpec(*data_sharding(mesh, rules, (batch, 1)).spec[:1]))

    def step(params, cache, tokens, positions, key, temperature, top_k, top_p):
        with activation_sharding(mesh, rules):
            logits, cache = forward(params, tokens[:, None], positions[:, None], cache, cfg=cfg)
        logits = logits[:, -1]  # (B, V) f32
        return sample(logits, key, temperature, top_k, top_p), logits, cache

    fn = jax.jit(step, in_shardings=(p_shard, c_shard, slot, slot, None, slot, slot, slot),
                 out_shardings=(slot, None, c_shard), donate_argnums=1)
    return DecodeStep(fn=fn, param_shardings=p_shard, cache_shardings=c_shard, slot_sharding=slot,
                      mesh=mesh, batch=batch, max_len=max_len, dtype=dtype)
