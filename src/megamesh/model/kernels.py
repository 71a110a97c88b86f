"""Attention behind one entry point, `causal_attention(q, k, v)`, and its implementations.

Which one runs is the `Kernels` value installed by the backend (`model.backend`: chosen
per platform in one place, overridable with `--kernels`). The whole registry:

| kernel    | implementations                                                          |
|-----------|--------------------------------------------------------------------------|
| attention | `reference` (the T x T formula, `attention.attend`)                       |
|           | `blockwise` (plain JAX online softmax, memory T x block: `model.blockwise`)|
|           | `splash` (Pallas TPU splash attention; interpreted off TPU, for tests)     |
|           | `cudnn` (cuDNN flash attention via `jax.nn.dot_product_attention`)         |
|           | `pallas_gpu` (Pallas GPU flash attention; interpreted off GPU, for tests)  |
| moe       | `einsum` (GShard one-hot dispatch/combine; XLA inserts expert all-to-alls) |
|           | `grouped` (tokens sorted by expert, `jax.lax.ragged_dot`; dropless in      |
|           | O(tokens x k) memory)                                                    |
| paged     | `xla` (plain JAX online softmax over the serving KV cache's pages, a block |
|           | of pages at a time, up to the batch's real length: on CPU and GPU)        |
|           | `gather` (every row's pages gathered into one array up to the attention  |
|           | bucket, then `attention.attend`: the reference the others are tested by) |
|           | `ragged` (Pallas TPU ragged paged attention: reads the pages in place)     |
| matmul    | `f32` (bf16 operands widened to f32 kernels: XLA:CPU's fast GEMMs)        |
|           | `native` (bf16 operands and outputs, f32 accumulation in the unit: every  |
|           | backward GEMM stays bf16)                                                 |

Platform defaults (`backend.PLATFORM_DEFAULTS`): TPU splash + grouped + native, GPU
cudnn + einsum + native, CPU blockwise + einsum + f32. The per-device kernels (splash,
cudnn, pallas_gpu; grouped MoE in `model.moe`) are not partitioned by XLA: the sharding
layer supplies a runner that calls them under `shard_map` over the mesh; without one (a
single device, or no mesh) they are called directly. Every implementation is tested
against `attention.attend` (tests/test_kernels.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from megamesh.model.attention import attend
from megamesh.model.axes import constrain
from megamesh.model.backend import active, run_per_device
from megamesh.model.blockwise import (
    DEFAULT_BLOCK,
    PAGED_BLOCK,
    blockwise_attention,
    paged_blockwise_attention,
)
from megamesh.model.kvcache import gather_kv
from megamesh.model.specs import splash_block

# --------------------------------------------------------------------------- attention

# The GPU kernels see whole sequences (None): their causal mask assumes query i is token i.
# Splash splits the queries over the sequence axis (context parallel, below). Heads split
# over tensor only when query and kv heads split alike (`tie`; kv heads are repeated to
# make them), else the group keeps them whole.
_Q = ("batch", None, "heads", "head_dim")
_KV = ("batch", None, "kv_heads", "head_dim")
# splash splits the queries over the sequence axis too (context parallelism)
_QS = ("batch", "seq", "heads", "head_dim")
_KVS = ("batch", "seq", "kv_heads", "head_dim")
CP_GATHER = "context_parallel_gather"  # the op name scope of its key/value gathers


def _replicas(x: jax.Array, n: int, whole: tuple[str | None, ...]) -> jax.Array:
    """`n` copies of `x` in the layout of logical axes `whole` (the sequence unsplit)
    stacked on a new leading dimension, which the caller splits over the n sequence
    shards (logical axes ("seq", *whole)): each device receives the whole sequence
    without a collective in its own program. XLA's partitioner
    gathers the sequence (an all-gather over the sequence axis) and, in the backward,
    sums the n per-device gradients and scatters them back (a reduce-scatter): the same
    collectives, bytes and HBM as gathering inside `shard_map` (checked on Ironwood).
    Inside `shard_map` a collective carries an explicit list of every device
    (`replica_groups`: a million groups of 2 for 109 Ironwood pods at sequence=2, copied
    pass after pass); the partitioner's carry a reshape of the device order. Those lists
    were most of what the million-chip compile's host memory grew by with the device
    count (BENCHMARKS.md "The million-chip compile")."""
    x = constrain(x, whole)  # the gather (named CP_GATHER)
    return jnp.broadcast_to(x[None], (n, *x.shape))


def load_balanced_order(T: int, n: int) -> np.ndarray:
    """The token order of load-balanced (zig-zag) context parallelism over n devices: the
    sequence cut into 2n equal chunks, device d holding chunks d and 2n-1-d, so each has
    the same causal attention work (chunk i's queries see i + 1/2 chunks of keys: d and
    2n-1-d together 2n, a 1/n share). As Llama 3's and MaxText's load-balanced CP."""
    c = T // (2 * n)
    chunks = [i for d in range(n) for i in (d, 2 * n - 1 - d)]
    return np.concatenate([np.arange(i * c, (i + 1) * c) for i in chunks])


def _context_parallel_ways(T: int) -> int:
    """Devices the sequence of a splash step splits over (1: no context parallelism)."""
    kern, runner = active()
    ways = getattr(runner, "ways", None)
    if kern.attention != "splash" or ways is None:
        return 1
    return ways("seq", T)


def context_parallel_order(T: int) -> np.ndarray | None:
    """The order a training step must put its T tokens in before the forward pass (and
    its targets, positions and segment ids alike), or None for the natural order: under
    splash context parallelism, the load-balanced order (`load_balanced_order`) when T
    splits into 2n chunks. Called while tracing under `activation_sharding`."""
    n = _context_parallel_ways(T)
    return load_balanced_order(T, n) if n > 1 and T % (2 * n) == 0 else None


def _split_axes(name: str, size: int) -> tuple[str, ...]:
    """The mesh axes a dimension of this logical name and size splits over (none without
    a runner)."""
    axes_of = getattr(active()[1], "axes_of", None)
    return tuple(axes_of(name, size)) if axes_of else ()


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     segments: jax.Array | None = None) -> jax.Array:
    """Causal self-attention by token index: q (B, T, H, Dh), k and v (B, T, K, Dh) ->
    (B, T, H, Dh), with the installed implementation. `segments` (B, T): the document
    each token of a packed row belongs to; a token attends only within its document
    (document masking). cuDNN takes documents only in its packed-offsets form with a
    static maximum per row, so with segments the GPU runs the Pallas flash kernel."""
    kern = active()[0]
    name = kern.attention
    if name == "reference":
        return blockwise_attention(q, k, v, block=q.shape[1], segments=segments)
    if name == "blockwise":
        return blockwise_attention(q, k, v, block=DEFAULT_BLOCK, segments=segments)
    k, v = _kv_for_head_split(q, k, v)
    args, axes = (q, k, v), (_Q, _KV, _KV)
    if name == "splash":
        interpret = kern.platform != "tpu"
        seq_axes = _split_axes("seq", q.shape[1])
        if seq_axes:  # context parallel: local queries, keys and values gathered
            fn = functools.partial(splash_context_parallel, axes=seq_axes, interpret=interpret,
                                   load_balanced=context_parallel_order(q.shape[1]) is not None)
            n = _context_parallel_ways(q.shape[1])
            with jax.named_scope(CP_GATHER):
                args = (q, _replicas(k, n, _KV), _replicas(v, n, _KV))
                axes = (_QS, ("seq", *_KV), ("seq", *_KV))
                if segments is not None:
                    args = (*args, segments, _replicas(segments, n, ("batch", None)))
                    axes = (*axes, ("batch", "seq"), ("seq", "batch", None))
            return run_per_device(fn, args, axes, _QS, ("heads", "kv_heads"))
        fn = functools.partial(splash_attention, interpret=interpret)
    elif name == "pallas_gpu" or segments is not None:
        fn = functools.partial(pallas_gpu_attention, interpret=kern.platform != "gpu")
    else:
        fn = cudnn_attention
    if segments is not None:
        args, axes = (*args, segments), (*axes, ("batch", None))
    return run_per_device(fn, args, axes, _Q, ("heads", "kv_heads"))


def _kv_for_head_split(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """KV heads repeated so that they split over the mesh as the query heads do: with 64
    query and 8 kv heads over tensor=16, 16 kv heads (each twice) give every device 4
    query heads and their one kv head. Without it the per-device kernel would keep all
    heads on every device of the tensor group (16x the attention work)."""
    runner = active()[1]
    ways = getattr(runner, "ways", None)
    H, K = q.shape[2], k.shape[2]
    if ways is None:
        return k, v
    t = ways("heads", H)
    if t <= 1 or ways("kv_heads", K) == t:
        return k, v
    r = t // math.gcd(K, t)
    if H % (K * r):
        return k, v
    return jnp.repeat(k, r, axis=2), jnp.repeat(v, r, axis=2)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array | None = None,
                     kv_seg: jax.Array | None = None, *, interpret: bool = False,
                     q_offset: int = 0) -> jax.Array:
    """Pallas TPU splash attention (causal, GQA) on one device's shard: q (b, Tq, h, Dh)
    whose first query is token `q_offset`, k and v (b, Tk, K, Dh) from token 0; with
    segment ids q_seg (b, Tq) and kv_seg (b, Tk) (default: q_seg, same tokens), each
    query only within its document (splash's own SegmentIds).

    Both sequences are padded at the end to whole tiles: padded keys come after every
    real query, so the causal mask hides them; padded queries are dropped. Off TPU the
    kernel runs in Pallas' interpreter (tests on CPU)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, Tq, h, Dh = q.shape
    Tk = k.shape[1]
    blk = splash_block(Tq)  # one tile size for queries and keys: whole tiles on the diagonal
    Tqp, Tkp = _round_up(Tq, blk), _round_up(Tk, blk)
    mask = sm.MultiHeadMask(tuple(sm.CausalMask((Tqp, Tkp), offset=q_offset) for _ in range(h)))
    sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                          block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                          block_kv_dq=blk)
    kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)

    def heads_first(x: jax.Array, n: int) -> jax.Array:  # (b, T, h, Dh) -> (b, h, n, Dh)
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, n - x.shape[1]), (0, 0)))

    qs = heads_first(q * jnp.asarray(Dh**-0.5, q.dtype), Tqp)
    ks, vs = heads_first(k, Tkp), heads_first(v, Tkp)
    if q_seg is None:
        out = jax.vmap(kernel)(qs, ks, vs)
    else:
        kv_seg = q_seg if kv_seg is None else kv_seg
        pad = lambda s, n: jnp.pad(s.astype(jnp.int32), ((0, 0), (0, n - s.shape[1])), constant_values=-1)
        ids = sk.SegmentIds(q=pad(q_seg, Tqp), kv=pad(kv_seg, Tkp))
        out = jax.vmap(lambda a, b, c, d: kernel(a, b, c, segment_ids=d))(qs, ks, vs, ids)
    return jnp.swapaxes(out[:, :, :Tq], 1, 2)


def splash_context_parallel(q: jax.Array, k: jax.Array, v: jax.Array, seg: jax.Array | None = None,
                            kv_seg: jax.Array | None = None, *, axes: tuple[str, ...],
                            interpret: bool = False, load_balanced: bool = False) -> jax.Array:
    """Splash over a sequence split across mesh `axes` (inside shard_map): this device's
    queries (and their segment ids `seg`) against the whole sequence's keys and values
    (and `kv_seg`), gathered outside by the partitioner (`_replicas`: each with a leading
    dimension of 1 here; their gradients flow back as a reduce-scatter), with the causal
    mask offset by the queries' positions.
    Splash's masks are static, so there is one kernel per device position, picked by
    `lax.switch` on the device's index.

    `load_balanced`: the sequence is in `load_balanced_order` (the step put it there):
    this device's queries are two chunks, d and 2n-1-d, each run against the gathered
    keys (put back in natural order) at its own offset; splash skips the key tiles the
    causal mask hides, so every device does the same work. Without it (a sequence that
    does not split into 2n chunks) the queries are one contiguous block and the last
    device does (2n - 1) / n^2 of the causal work, not 1 / n."""
    Tl = q.shape[1]
    k, v = k[0], v[0]
    kv_seg = None if seg is None else kv_seg[0]
    n = k.shape[1] // Tl
    if not load_balanced:
        branches = [functools.partial(splash_attention, interpret=interpret, q_offset=i * Tl)
                    for i in range(n)]
        segs = () if seg is None else (seg, kv_seg)
        return jax.lax.switch(jax.lax.axis_index(axes), branches, q, k, v, *segs)
    c = Tl // 2
    slot = {}  # natural chunk -> its place in the gathered (load-balanced) sequence
    for d in range(n):
        slot[d], slot[2 * n - 1 - d] = 2 * d, 2 * d + 1

    def natural(x: jax.Array) -> jax.Array:
        return jnp.concatenate([x[:, slot[i] * c:(slot[i] + 1) * c] for i in range(2 * n)], axis=1)

    k, v = natural(k), natural(v)
    kv_seg = None if kv_seg is None else natural(kv_seg)

    def branch(d: int, q: jax.Array, k: jax.Array, v: jax.Array, *segs: jax.Array) -> jax.Array:
        halves = []
        for h, chunk in enumerate((d, 2 * n - 1 - d)):
            qs = None if not segs else segs[0][:, h * c:(h + 1) * c]
            halves.append(splash_attention(q[:, h * c:(h + 1) * c], k, v, qs, segs[1] if segs else None,
                                           interpret=interpret, q_offset=chunk * c))
        return jnp.concatenate(halves, axis=1)

    segs = () if seg is None else (seg, kv_seg)
    return jax.lax.switch(jax.lax.axis_index(axes), [functools.partial(branch, d) for d in range(n)],
                          q, k, v, *segs)


def causal_tiles(T: int, n: int, load_balanced: bool, block: int | None = None) -> list[int]:
    """Per device of an n-way context-parallel split of T tokens: the (query tile, key
    tile) pairs splash computes (the tiles its causal mask does not hide wholly), i.e.
    each device's attention work, with the tile size `splash_context_parallel` uses."""
    chunk = T // (2 * n) if load_balanced else T // n
    blk = block or splash_block(chunk)

    def tiles(offset: int) -> int:
        return sum((offset + (i + 1) * blk - 1) // blk + 1 for i in range(-(-chunk // blk)))

    if load_balanced:
        return [tiles(d * chunk) + tiles((2 * n - 1 - d) * chunk) for d in range(n)]
    return [tiles(d * chunk) for d in range(n)]


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """cuDNN's fused flash attention (causal, GQA natively); falls back to the Pallas GPU
    kernel for shapes cuDNN refuses (head dim not a multiple of 8 or over 128, f32)."""
    Dh = q.shape[-1]
    if Dh % 8 or Dh > 128 or q.dtype not in (jnp.bfloat16, jnp.float16):
        return pallas_gpu_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def pallas_gpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None = None,
                         *, interpret: bool = False) -> jax.Array:
    """Pallas' GPU flash attention (Triton) on one device's shard; kv heads repeated to the
    query heads (the kernel has no GQA); `segments` (b, T): document masking by the
    kernel's own segment ids. Interpreted off GPU (tests on CPU)."""
    from jax.experimental.pallas.ops.gpu import attention as pa

    H, K, Dh = q.shape[2], k.shape[2], q.shape[3]
    k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
    T = q.shape[1]
    blk = 64 if T >= 64 else 16
    Tp = _round_up(T, blk)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    sizes = pa.BlockSizes(block_q=blk, block_k=blk, block_q_dkv=blk, block_kv_dkv=blk,
                          block_q_dq=blk, block_kv_dq=blk)
    seg = None if segments is None else jnp.pad(segments.astype(jnp.int32), ((0, 0), (0, Tp - T)),
                                                constant_values=-1)
    out = pa.mha(pad(q), pad(k), pad(v), seg, sm_scale=Dh**-0.5, causal=True,
                 block_sizes=sizes, interpret=interpret)
    return out[:, :T]


# --------------------------------------------------------------------------- paged attention


def paged_attention(q: jax.Array, pages: jax.Array, table: jax.Array, base: jax.Array,
                    positions: jax.Array, attend_len: int) -> jax.Array:
    """Attention of new queries over a paged KV cache (`model.kvcache`), with the installed
    implementation: q (B, T, H, Dh) at `positions` (B, T) (consecutive per row, new keys
    already written), pages (L*N, P, 2K, Dh) of which this layer's are base..base+N-1,
    table (B, pages_per_seq). Attends causally to each row's positions up to its queries':
    `xla` walks the pages up to the batch's last position (`attend_len` unused), `ragged`
    reads each row's own length (where `_ragged_fits`; else the `xla` path), `gather`
    reads positions [0, attend_len) (a static bucket). Returns (B, T, H, Dh)."""
    name = active()[0].paged
    if name == "ragged" and _ragged_fits(q, pages):
        return run_per_device(ragged_paged_attention, (q, pages, base + table, positions),
                              (_Q, (None, None, "kv_heads", "head_dim"), ("batch", None),
                               ("batch", None)), _Q, ("heads", "kv_heads"))
    if name != "gather":
        # decode: blocks of 128 positions (measured, one layer, tiny, 2-core XLA:CPU, a 6k
        # context: 6.3 ms at 4 rows and 73 ms at 32, vs 32 and 309 ms gathered; 64 to 512
        # within 1.5x, small blocks best for many rows, large for few; with 256 the
        # enterprise benchmark's decode took 157 s vs 122 s at an 8-sequence budget); one
        # size whatever the batch, so a row's result never depends on the load. Prefill:
        # blocks of 512 (a 2048-token chunk after 4k cached: 296 ms vs 978)
        block = 128 if q.shape[1] == 1 else PAGED_BLOCK
        return paged_blockwise_attention(q, pages, table, base, positions, block=block)
    k, v = gather_kv(pages, table, base, attend_len)
    B, S = table.shape[0], k.shape[1]
    k_pos = jnp.broadcast_to(jnp.arange(S, dtype=positions.dtype), (B, S))
    return attend(q, k.astype(q.dtype), v.astype(q.dtype), positions, k_pos)


def _ragged_fits(q: jax.Array, pages: jax.Array) -> bool:
    """Whether the TPU kernel takes these shapes: a head dim of whole 128-lane tiles, and
    combined kv heads (2K) split over the mesh no further than the kv heads (K) are (a
    device must hold each head's key and value both)."""
    ways = getattr(active()[1], "ways", None)
    K2 = pages.shape[2]
    split_alike = ways is None or ways("kv_heads", K2) == ways("kv_heads", K2 // 2)
    return q.shape[-1] % 128 == 0 and split_alike


def ragged_paged_attention(q: jax.Array, pages: jax.Array, table: jax.Array,
                           positions: jax.Array) -> jax.Array:
    """Pallas TPU ragged paged attention on one device's shard: every row is a sequence
    whose T queries are its last T positions (kv length = last position + 1); `table`
    already holds this layer's page ids; the pages are in the kernel's layout. Block sizes
    are given (the kernel's own lookup reads
    jax.devices(), which is the CPU when compiling for a TPU from a host). TPU only: Pallas
    cannot interpret this kernel (`backend.choose_kernels` refuses it elsewhere)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention as rpa

    B, T, H, Dh = q.shape
    P, pps = pages.shape[1], table.shape[1]
    out = rpa(q.reshape(B * T, H, Dh), pages, positions[:, -1] + 1, table,
              jnp.arange(B + 1, dtype=jnp.int32) * T, jnp.array([B], jnp.int32),
              sm_scale=Dh**-0.5, num_kv_pages_per_block=min(pps, max(1, 512 // P)),
              num_queries_per_block=min(32, _round_up(B * T, 8)))
    return out.reshape(B, T, H, Dh)
