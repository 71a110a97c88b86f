"""The KV cache: fixed-size pages shared by every sequence, and a page table per sequence.

Per layer stack, one array of pages (L*N, P, 2K, Dh): page n of layer l is row l*N + n
(so a layer's pages are addressed without slicing the array: its page ids are offset by
l*N); slot i of a page holds one position's keys and values in "combined kv heads": the
key of kv head j at 2j, its value at 2j+1, the layout TPU's ragged paged attention reads.

A sequence's row of the page table (B, pages_per_seq) lists the pages that hold its
positions [0, P), [P, 2P), ...; entries past what it owns are 0. Page 0 of every layer is
scratch: padding tokens and idle batch rows write there, and what they write is only ever
read under the causal mask (a query never attends past its own position). So memory grows
with a sequence's real length, and a sequence's pages may be anywhere (the serving engine
allocates them; `init_cache` gives each row its own run of pages).

Glossary: B batch, T new tokens, S attended positions, P page size, N pages per layer,
L layers, K kv heads, Dh head dim.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from megamesh.config import ModelConfig
from megamesh.model.specs import DEFAULT_PAGE, SCRATCH, layer_stacks


class KVCache(NamedTuple):
    """A paged KV cache (a pytree): the pages of every stack and the batch's page table."""

    pages: dict[str, jax.Array]  # stack name -> (L*N, P, 2K, Dh)
    table: jax.Array  # (B, pages_per_seq) int32


def pages_per_seq(max_len: int, page_size: int) -> int:
    return -(-max_len // page_size)


def page_axes() -> tuple[str | None, ...]:
    """Logical axes of one stack's pages (L*N, P, 2K, Dh): split by kv head only (every
    row of the batch may own any page, so pages are not split over the batch). Resolve
    them for the shape with K, not 2K, combined heads (`kv_shape`): a split of K keeps
    each head's key and value together, a split of 2K alone would not."""
    return (None, None, "kv_heads", "head_dim")


def kv_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape (L*N, P, K, Dh) whose kv-head count decides how pages split."""
    return (*shape[:2], shape[2] // 2, shape[3])


def init_pages(cfg: ModelConfig, n_pages: int, page_size: int = DEFAULT_PAGE,
               dtype: Any = None, kv_heads: int | None = None) -> dict[str, jax.Array]:
    """Zeroed pages, `n_pages` per layer (page 0 included: the scratch page), for
    `kv_heads` kv heads (default the model's; `model.specs.held_kv_heads`)."""
    dtype = jnp.dtype(dtype or cfg.compute_dtype)
    return {s.name: jnp.zeros((s.n_layers * n_pages, page_size, 2 * (kv_heads or cfg.n_kv_heads),
                               cfg.resolved_head_dim), dtype)
            for s in layer_stacks(cfg)}


def contiguous_table(batch: int, max_len: int, page_size: int = DEFAULT_PAGE) -> np.ndarray:
    """Row b owns pages 1 + b*n .. (b+1)*n (n = pages_per_seq): a cache laid out like a
    dense (B, max_len) one, for callers that run a fixed batch (model.generate)."""
    n = pages_per_seq(max_len, page_size)
    return (1 + np.arange(batch * n, dtype=np.int32)).reshape(batch, n)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None,
               page_size: int = DEFAULT_PAGE) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` positions each."""
    n = pages_per_seq(max_len, page_size)
    return KVCache(init_pages(cfg, 1 + batch * n, page_size, dtype),
                   jnp.asarray(contiguous_table(batch, max_len, page_size)))


def write_kv(pages: jax.Array, k: jax.Array, v: jax.Array, table: jax.Array, positions: jax.Array,
             base: jax.Array) -> jax.Array:
    """Write the new keys and values k, v (B, T, K, Dh) at `positions` (B, T) of each row
    into this layer's pages (page ids offset by `base` = layer * N). One scatter: inside
    the layer scan, where `pages` is a loop carry, XLA updates it in place."""
    P = pages.shape[1]
    idx = jnp.minimum(positions // P, table.shape[1] - 1)  # padding past the table: scratch
    page = jnp.take_along_axis(table, idx, axis=1)  # (B, T)
    page = jnp.where(positions // P < table.shape[1], page, SCRATCH)
    B, T, K, Dh = k.shape
    kv = jnp.stack([k, v], axis=3).reshape(B, T, 2 * K, Dh).astype(pages.dtype)
    return pages.at[base + page, positions % P].set(kv)


def gather_kv(pages: jax.Array, table: jax.Array, base: jax.Array, S: int) -> tuple[jax.Array, jax.Array]:
    """The keys and values of positions [0, S) of every row, k and v (B, S, K, Dh), read
    through the page table (plain JAX: one gather of whole pages)."""
    P = pages.shape[1]
    n = -(-S // P)
    kv = pages[base + table[:, :n]]  # (B, n, P, 2K, Dh)
    B, K2, Dh = table.shape[0], kv.shape[3], kv.shape[4]
    kv = kv.reshape(B, n * P, K2 // 2, 2, Dh)[:, :S]
    return kv[..., 0, :], kv[..., 1, :]
