"""Blockwise causal attention in plain JAX: online softmax over key blocks, custom VJP.

The portable implementation behind `model.kernels` (XLA:CPU, and any backend without a
fused kernel). Memory grows as T x block, not T x T: the forward pass walks the keys in
blocks of `block` with a running max and sum per query (the flash-attention recurrence)
and keeps only the output and each query's log-sum-exp; the backward pass walks the same
blocks again, recomputing each block's probabilities from the log-sum-exp, so no score
matrix is ever held whole (plain autodiff of the loop would save every block's scores,
T x T in all). Fully masked key blocks are computed and masked, not skipped: a CPU path
keeps the loop static. A sequence no longer than one block runs the plain reference
formula (`attention.attend`), so short-sequence steps are unchanged.

Glossary: B batch, T tokens, H query heads, K kv heads, G = H / K, Dh head dim,
n key blocks of `block` keys (the last one padded; padded keys are masked).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from megamesh.model.attention import attend
from megamesh.model.backend import matmul_inputs

_NEG = -1e30  # finite: a fully masked block gives exp(-1e30 - m) = 0, never NaN

DEFAULT_BLOCK = 512


def _einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, *matmul_inputs(a, b), preferred_element_type=jnp.float32)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """(B, S, K, Dh) -> (n, B, block, K, Dh), zero-padded to n * block keys."""
    B, S = x.shape[:2]
    n = -(-S // block)
    x = jnp.pad(x, ((0, 0), (0, n * block - S), (0, 0), (0, 0)))
    return jnp.moveaxis(x.reshape(B, n, block, *x.shape[2:]), 1, 0)


def _mask(j: jax.Array, T: int, block: int, seg: jax.Array | None = None,
          seg_b: jax.Array | None = None) -> jax.Array:
    """(T, block): key j*block + c is visible to query t when its index <= t; with
    segment ids (seg (B, T) of the queries, seg_b (B, block) of the block's keys) also
    only within the query's segment: (B, 1, 1, T, block)."""
    keys = j * block + jnp.arange(block)
    causal = keys[None, :] <= jnp.arange(T)[:, None]
    if seg is None:
        return causal
    return causal & (seg[:, None, None, :, None] == seg_b[:, None, None, None, :])


def _seg_blocks(seg: jax.Array | None, block: int) -> jax.Array | None:
    """(B, T) -> (n, B, block), padded with -1 (padded keys are causally hidden anyway)."""
    if seg is None:
        return None
    B, T = seg.shape
    n = -(-T // block)
    return jnp.moveaxis(jnp.pad(seg, ((0, 0), (0, n * block - T)), constant_values=-1)
                        .reshape(B, n, block), 1, 0)


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None,
             block: int) -> tuple[jax.Array, jax.Array]:
    """(out (B,T,K,G,Dh) in v's dtype, lse (B,K,G,T) f32) for grouped q (B,T,K,G,Dh)."""
    B, T, K, G, Dh = q.shape
    scale = Dh**-0.5

    def body(carry: Any, blk: Any) -> Any:
        m, den, acc = carry
        j, kb, vb, sb = blk
        s = _einsum("btkgd,bskd->bkgts", q, kb) * scale  # (B,K,G,T,block)
        s = jnp.where(_mask(j, T, block, seg, sb), s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        den = den * corr + jnp.sum(p, axis=-1)
        pv = _einsum("bkgts,bskd->btkgd", p.astype(v.dtype), vb)
        acc = acc * jnp.moveaxis(corr, 3, 1)[..., None] + pv
        return (m_new, den, acc), None

    kb, vb = _blocks(k, block), _blocks(v, block)
    init = (jnp.full((B, K, G, T), _NEG, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
            jnp.zeros((B, T, K, G, Dh), jnp.float32))
    (m, den, acc), _ = jax.lax.scan(body, init, (jnp.arange(kb.shape[0]), kb, vb, _seg_blocks(seg, block)))
    out = (acc / jnp.moveaxis(den, 3, 1)[..., None]).astype(v.dtype)
    return out, m + jnp.log(den)


def _fwd(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None,
         block: int) -> tuple[jax.Array, Any]:
    out, lse = _forward(q, k, v, seg, block)
    return out, (q, k, v, seg, out, lse)


def _bwd(block: int, res: Any, do: jax.Array) -> tuple[Any, ...]:
    q, k, v, seg, out, lse = res
    B, T, K, G, Dh = q.shape
    S = k.shape[1]
    scale = Dh**-0.5
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (B,T,K,G)
    delta = jnp.moveaxis(delta, 1, 3)  # (B,K,G,T)

    def body(dq: jax.Array, blk: Any) -> Any:
        j, kb, vb, sb = blk
        s = _einsum("btkgd,bskd->bkgts", q, kb) * scale
        p = jnp.where(_mask(j, T, block, seg, sb), jnp.exp(s - lse[..., None]), 0.0)  # (B,K,G,T,block)
        dv = _einsum("bkgts,btkgd->bskd", p.astype(do.dtype), do)
        dp = _einsum("btkgd,bskd->bkgts", do, vb)
        ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
        dq = dq + _einsum("bkgts,bskd->btkgd", ds, kb)
        dk = _einsum("bkgts,btkgd->bskd", ds, q)
        return dq, (dk, dv)

    kb, vb = _blocks(k, block), _blocks(v, block)
    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32),
                                (jnp.arange(kb.shape[0]), kb, vb, _seg_blocks(seg, block)))

    def unblock(x: jax.Array) -> jax.Array:  # (n, B, block, K, Dh) -> (B, S, K, Dh)
        return jnp.moveaxis(x, 0, 1).reshape(B, -1, K, Dh)[:, :S]

    dseg = None if seg is None else np.zeros(seg.shape, jax.dtypes.float0)  # integer input
    return dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), dseg


def _flash(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None, block: int) -> jax.Array:
    # made per call: the matmul mode (`backend.matmul_inputs`) is read while tracing, and
    # jax caches a custom VJP's trace by function
    @partial(jax.custom_vjp, nondiff_argnums=(4,))
    def flash(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None, block: int) -> jax.Array:
        return _forward(q, k, v, seg, block)[0]

    flash.defvjp(_fwd, _bwd)
    return flash(q, k, v, seg, block)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = DEFAULT_BLOCK,
                        segments: jax.Array | None = None) -> jax.Array:
    """Causal self-attention (query t sees keys 0..t; with `segments` (B, T), the ids of
    the documents packed in each row, only keys of its own document). q (B, T, H, Dh);
    k, v (B, T, K, Dh) -> (B, T, H, Dh). Memory O(T * block) per head in both passes."""
    B, T, H, Dh = q.shape
    K = k.shape[2]
    if T <= block:
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        return attend(q, k, v, pos, pos, segments, segments)
    out = _flash(q.reshape(B, T, K, H // K, Dh), k, v, segments, block)
    return out.reshape(B, T, H, Dh)


# --------------------------------------------------------------------------- paged KV cache

PAGED_BLOCK = 512  # keys per step of the walk over a paged KV cache (whole pages)
PAGED_QUERY_BLOCK = 512  # queries per pass of a long prefill chunk


def paged_blockwise_attention(q: jax.Array, pages: jax.Array, table: jax.Array, base: jax.Array,
                              positions: jax.Array, block: int = PAGED_BLOCK,
                              q_block: int = PAGED_QUERY_BLOCK) -> jax.Array:
    """Causal attention of new queries over a paged KV cache (`model.kvcache` layout), in
    plain JAX, reading the pages in place: q (B, T, H, Dh) at `positions` (B, T), pages
    (L*N, P, 2K, Dh) of which this layer's start at `base`, table (B, pages_per_seq).

    Online softmax over key blocks of `block` positions (whole pages, aligned to position
    0): each step gathers one block of every row's pages, so no copy of a row's keys and
    values is made, and the walk stops after the block holding the batch's last query
    position (a loop bound read from `positions` at run time), so the work follows the
    real lengths, not a shape bucket. Queries go in blocks of `q_block`, each walking only
    the key blocks up to its own last position: a prefill chunk skips the keys after it.
    A key block fully masked for a row (shorter rows in a decode batch) leaves that row's
    running sums exactly unchanged; a query's result depends only on the key blocks up to
    its position, not on how the prompt was chunked or which rows run beside it.
    """
    B, T, H, Dh = q.shape
    P, K = pages.shape[1], pages.shape[2] // 2
    G = H // K
    per = max(1, block // P)  # pages per key block
    blk = per * P
    n_blocks = -(-table.shape[1] // per)
    table = jnp.pad(table, ((0, 0), (0, n_blocks * per - table.shape[1])))  # scratch
    scale = Dh**-0.5

    def over_keys(qg: jax.Array, qpos: jax.Array) -> jax.Array:
        """qg (B, t, K, G, Dh) at qpos (B, t) -> (B, t, K, G, Dh) f32."""
        t = qg.shape[1]
        hi = jnp.minimum(jnp.max(qpos) // blk + 1, n_blocks)
        qf = qg.astype(jnp.float32)

        def body(j: jax.Array, carry: Any) -> Any:
            m, den, acc = carry
            ids = jax.lax.dynamic_slice_in_dim(table, j * per, per, axis=1)  # (B, per)
            kv = pages[base + ids].reshape(B, blk, K, 2, Dh)
            kb, vb = kv[..., 0, :], kv[..., 1, :]  # (B, blk, K, Dh)
            keys = j * blk + jnp.arange(blk, dtype=qpos.dtype)
            mask = (keys[None, None, :] <= qpos[:, :, None])[:, None, None]  # (B,1,1,t,blk)
            if t == 1:  # multiply-and-reduce: XLA fuses the gather into the reduction
                prod = qf[:, 0, None] * kb[:, :, :, None, :].astype(jnp.float32)
                s = jnp.moveaxis(jnp.sum(prod, axis=-1), 1, -1)[:, :, :, None, :]
            else:
                s = _einsum("btkgd,bskd->bkgts", qg, kb)
            s = jnp.where(mask, s * scale, _NEG)  # (B,K,G,t,blk)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            den = den * corr + jnp.sum(p, axis=-1)
            if t == 1:
                vt = jnp.moveaxis(vb, 1, 2)[:, :, None].astype(jnp.float32)  # (B,K,1,blk,Dh)
                pv = jnp.sum(p[:, :, :, 0, :, None] * vt, axis=3)[:, None]  # (B,1,K,G,Dh)
            else:
                pv = _einsum("bkgts,bskd->btkgd", p.astype(qg.dtype), vb)  # (pages may be narrower)
            acc = acc * jnp.moveaxis(corr, 3, 1)[..., None] + pv
            return m_new, den, acc

        init = (jnp.full((B, K, G, t), _NEG, jnp.float32), jnp.zeros((B, K, G, t), jnp.float32),
                jnp.zeros((B, t, K, G, Dh), jnp.float32))
        m, den, acc = jax.lax.fori_loop(0, hi, body, init)
        return acc / jnp.moveaxis(den, 3, 1)[..., None]

    qg = q.reshape(B, T, K, G, Dh)
    if T <= q_block:
        out = over_keys(qg, positions)
    else:
        nq = -(-T // q_block)
        pad = nq * q_block - T
        qg = jnp.pad(qg, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
        # padded queries continue the positions (their results are dropped)
        qpos = jnp.concatenate([positions, positions[:, -1:] + 1 + jnp.arange(pad, dtype=positions.dtype)],
                               axis=1)
        split = lambda x: jnp.moveaxis(x.reshape(B, nq, q_block, *x.shape[2:]), 1, 0)
        out = jax.lax.map(lambda a: over_keys(*a), (split(qg), split(qpos)))
        out = jnp.moveaxis(out, 0, 1).reshape(B, nq * q_block, K, G, Dh)[:, :T]
    return out.astype(q.dtype).reshape(B, T, H, Dh)
