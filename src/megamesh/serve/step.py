"""The serving steps: prefill one request into its KV pages, and decode one token for every
row of a batch, both through the model's own forward over the paged KV cache
(`model.kvcache`). The engine runs these objects; `megamesh compile --step decode` lowers
the same decode step for a TPU.

Weights are held in the serving dtype (bf16 by default) with the `serve` strategy: tensor
and expert parallel, no FSDP gathers per token; the batch (decode rows) over data; the
KV pages split by kv head (every row may own any page, so pages are not split over the
batch). Per row: a token, its position, its page table row and sampling parameters.

Shape buckets: a step is compiled per attention length A (the positions it reads), so a
batch of short sequences does not read the whole context; every position read must be
below A (TPU's ragged kernel reads each row's own length whatever A). A prefill is
always one request, so a request's numbers do not depend on what else is running.

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
from megamesh.model.kvcache import DEFAULT_PAGE, KVCache, init_pages, pages_per_seq
from megamesh.model.quant import quantize_tree, quantized_shardings
from megamesh.model.specs import held_kv_heads, param_specs
from megamesh.model.transformer import forward
from megamesh.pytree import unflatten
from megamesh.sharding.rules import (
    activation_sharding,
    data_sharding,
    kv_split,
    page_shardings,
    param_shardings,
    strategy,
)


def mask_words(vocab: int) -> int:
    """int32 words of a token bitmask over `vocab` tokens."""
    return -(-vocab // 32)


class SlotSampling(NamedTuple):
    """A step's sampling parameters, one entry per row (a pytree: one argument of the
    jitted steps): the seed of the row's random draws, temperature (0 = greedy), top-k
    (0 = off), top-p, and the bitmask of tokens the row may draw (`model.generate.sample`;
    all bits set: any). Scalars (and one mask) for a prefill, (B,) arrays for decode."""

    seed: Any  # uint32
    temperature: Any  # float32
    top_k: Any  # int32
    top_p: Any  # float32
    allowed: Any  # int32 (..., mask words)

    @staticmethod
    def rows(rows: list[tuple[int, float, int, float]], batch: int, words: int,
             masks: dict[int, np.ndarray] | None = None) -> SlotSampling:
        """(B,) numpy arrays from (seed, temperature, top_k, top_p) per row, and the masks
        of the constrained rows (row -> (words,) int32; others allow every token); rows
        past the list are greedy (their tokens are not used)."""
        out = SlotSampling(np.zeros(batch, np.uint32), np.zeros(batch, np.float32),
                           np.zeros(batch, np.int32), np.ones(batch, np.float32),
                           np.full((batch, words), -1, np.int32))
        for i, row in enumerate(rows):
            for arr, v in zip(out, row):
                arr[i] = v
        for i, m in (masks or {}).items():
            out.allowed[i] = m
        return out

    @staticmethod
    def one(seed: int, temperature: float, top_k: int, top_p: float, words: int,
            mask: np.ndarray | None = None) -> SlotSampling:
        return SlotSampling(np.uint32(seed), np.float32(temperature), np.int32(top_k),
                            np.float32(top_p), np.full(words, -1, np.int32) if mask is None else mask)

    @staticmethod
    def abstract(batch: int, sharding: Any, words: int) -> SlotSampling:
        slot = lambda dt: jax.ShapeDtypeStruct((batch,), dt, sharding=sharding)
        return SlotSampling(slot(jnp.uint32), slot(jnp.float32), slot(jnp.int32), slot(jnp.float32),
                            jax.ShapeDtypeStruct((batch, words), jnp.int32, sharding=sharding))


def row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """One key per row: fold_in(key(seed), position)."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


@dataclass(frozen=True)
class DecodeStep:
    fn: Any  # jitted (params, pages, table (B, pages_per_seq), tokens (B,), positions (B,),
    #          SlotSampling of (B,)) -> (next tokens (B,), `token_logprobs` or None, pages);
    #          donates the pages
    param_shardings: Any
    page_shardings: Any
    slot_sharding: NamedSharding
    table_sharding: NamedSharding
    # of the drawn tokens and log-probabilities: replicated (a few bytes a row), so the
    # host reads them on any one process of a multi-host server (`serve.multihost`)
    token_sharding: NamedSharding
    mesh: Mesh
    batch: int
    max_len: int
    dtype: str
    n_pages: int  # per layer, the scratch page included
    page_size: int
    words: int  # of a row's token bitmask
    attend_len: int | None = None
    kv_dtype: str = ""  # of the KV pages (build_decode_step: default the weights' dtype)
    weights: str = "bf16"  # the layers' matmul weights: as loaded, or fp8 / int8 (model.quant)
    logprobs: int = 0  # each row's token's log-probability and the top this many (0: none)
    kv_heads: int = 0  # the kv heads the pages hold (`specs.held_kv_heads`; 0: the model's)

    @property
    def pages_per_seq(self) -> int:
        return pages_per_seq(self.max_len, self.page_size)

    def abstract_pages(self, cfg: ModelConfig) -> Any:
        pages = jax.eval_shape(lambda: init_pages(cfg, self.n_pages, self.page_size, self.kv_dtype,
                                                  self.kv_heads or None))
        return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                            pages, self.page_shardings)

    def abstract_args(self, cfg: ModelConfig) -> tuple:
        """ShapeDtypeStructs of every argument (for AOT compile)."""
        params = unflatten({n: jax.ShapeDtypeStruct(s.shape, jnp.dtype(self.dtype))
                            for n, s in param_specs(cfg).items()})
        params = jax.eval_shape(lambda p: quantize_tree(p, cfg, self.weights), params)
        params = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                              params, self.param_shardings)
        return (params, self.abstract_pages(cfg), *self.row_args())

    def row_args(self) -> tuple:
        """ShapeDtypeStructs of the per-row arguments: page table, tokens, positions,
        sampling."""
        slot = lambda dt: jax.ShapeDtypeStruct((self.batch,), dt, sharding=self.slot_sharding)
        table = jax.ShapeDtypeStruct((self.batch, self.pages_per_seq), jnp.int32,
                                     sharding=self.table_sharding)
        return (table, slot(jnp.int32), slot(jnp.int32),
                SlotSampling.abstract(self.batch, self.slot_sharding, self.words))


def build_decode_step(cfg: ModelConfig, mesh: Mesh, batch: int, max_len: int,
                      dtype: str = "bfloat16", attend_len: int | None = None,
                      n_pages: int | None = None, page_size: int = DEFAULT_PAGE,
                      kv_dtype: str | None = None, weights: str = "bf16",
                      logprobs: int = 0) -> DecodeStep:
    """One decode step for `batch` rows over `n_pages` KV pages per layer (default: enough
    for every row to reach max_len, and the scratch page) of `kv_dtype` (default: the
    weights' `dtype`; attention computes in the weights' dtype either way). `weights`:
    "bf16" (the parameters as loaded, in `dtype`) or "fp8" / "int8": the layers' matmul
    weights quantized (`model.quant.quantize_params`). `logprobs` > 0: the step also
    returns each row's token's log-probability under the model (the softmax of its logits,
    before temperature and grammar) and the `logprobs` most likely tokens with theirs
    (`token_logprobs`); 0: nothing (the default: no top-k over the vocabulary each step)."""
    rules = strategy("serve")
    p_shard = quantized_shardings(param_shardings(cfg, mesh, rules), cfg, weights)
    n_pages = n_pages or 1 + batch * pages_per_seq(max_len, page_size)
    kv_dtype = kv_dtype or dtype
    kv_heads = held_kv_heads(cfg.n_kv_heads, kv_split(mesh, rules, cfg.n_kv_heads))
    pg_shard = page_shardings(jax.eval_shape(lambda: init_pages(cfg, n_pages, page_size, kv_dtype,
                                                                kv_heads)), mesh, rules)
    row_spec = data_sharding(mesh, rules, (batch, 1)).spec[:1]
    slot = NamedSharding(mesh, PartitionSpec(*row_spec))
    table_sh = NamedSharding(mesh, PartitionSpec(*row_spec, None))

    def step(params, pages, table, tokens, positions, sampling: SlotSampling):
        with activation_sharding(mesh, rules):
            out = forward(params, tokens[:, None], positions[:, None], KVCache(pages, table),
                          cfg=cfg, attend_len=attend_len)
        logits = out.logits[:, -1]  # (B, V) f32
        keys = row_keys(sampling.seed, positions + 1)
        tok = sample(logits, keys, sampling.temperature, sampling.top_k, sampling.top_p,
                     sampling.allowed)
        return tok, token_logprobs(logits, tok, logprobs), out.cache.pages

    rep = NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(step, in_shardings=(p_shard, pg_shard, table_sh, slot, slot, slot),
                 out_shardings=(rep, rep, pg_shard), donate_argnums=1)
    return DecodeStep(fn=fn, param_shardings=p_shard, page_shardings=pg_shard, slot_sharding=slot,
                      table_sharding=table_sh, token_sharding=rep, mesh=mesh, batch=batch, max_len=max_len,
                      dtype=dtype, n_pages=n_pages, page_size=page_size,
                      words=mask_words(cfg.vocab_size), attend_len=attend_len, kv_dtype=kv_dtype,
                      weights=weights, logprobs=logprobs, kv_heads=kv_heads)


def build_prefill_step(cfg: ModelConfig, ds: DecodeStep, length: int,
                       attend_len: int | None = None) -> Any:
    """Jitted (params, pages, table (1, pages_per_seq), tokens (1, length), start (), n (),
    SlotSampling of scalars) -> (first token (), its `token_logprobs` (a row) or None,
    pages): runs the first n tokens (the rest
    is padding) of one request at positions start.. into its pages, attending to positions
    below `attend_len` (default: length; at least start + length), and draws the token at
    position start + n."""
    rules = strategy("serve")
    rep = NamedSharding(ds.mesh, PartitionSpec())
    attend_len = attend_len or length

    def prefill(params, pages, table, tokens, start, n, sampling: SlotSampling):
        positions = start + jnp.arange(length, dtype=jnp.int32)[None]
        with activation_sharding(ds.mesh, rules):
            out = forward(params, tokens, positions, KVCache(pages, table), cfg=cfg,
                          attend_len=attend_len, logits_at=(n - 1)[None])
        s = jax.tree.map(lambda x: x[None], sampling)
        tok = sample(out.logits[:, 0], row_keys(s.seed, (start + n)[None]), s.temperature,
                     s.top_k, s.top_p, s.allowed)
        return tok[0], token_logprobs(out.logits[:, 0], tok, ds.logprobs), out.cache.pages

    return jax.jit(prefill, in_shardings=(ds.param_shardings, ds.page_shardings) + (rep,) * 5,
                   out_shardings=(rep, rep, ds.page_shardings), donate_argnums=1)


def token_logprobs(logits: jax.Array, tok: jax.Array, k: int) -> Any:
    """(each row's token's log-probability (B,), the k most likely tokens (B, k) int32 and
    their log-probabilities (B, k)) from logits (B, V) f32; None when k is 0."""
    if not k:
        return None
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, k)
    return jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp
