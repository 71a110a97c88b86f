"""Every kernel implementation equals the plain reference: attention (blockwise, Pallas
splash and Pallas GPU in interpret mode) forward and gradients, grouped-matmul MoE vs the
einsum form, attention over the paged KV cache vs a dense cache, sharded per-device runs
vs unsharded ones; the platform choice and its errors; and the compiled TPU train step at
8k tokens holds no T x T buffer. (TPU's ragged paged attention cannot be interpreted off
a TPU: tests/test_compile.py compiles it for tpu7x.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megamesh.config import apply_overrides, preset
from megamesh.errors import ConfigError
from megamesh.model.attention import attend
from megamesh.model.backend import Kernels, choose_kernels, using_kernels
from megamesh.model.blockwise import blockwise_attention
from megamesh.model.kernels import (
    causal_attention,
    context_parallel_order,
    pallas_gpu_attention,
    splash_attention,
)
from megamesh.sharding.mesh import make_mesh
from megamesh.sharding.rules import activation_sharding, logical_to_spec, mesh_sizes, strategy


def reference(q, k, v):
    B, T = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    return attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), pos, pos)


def qkv(H, K, T, B=2, Dh=32, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(H * 100 + K), 4)
    q, k, v = (jax.random.normal(kk, (B, T, n, Dh), jnp.float32).astype(dtype)
               for kk, n in zip(ks, (H, K, K)))
    do = jax.random.normal(ks[3], (B, T, H, Dh), jnp.float32).astype(dtype)
    return q, k, v, do


def out_and_grads(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return [out, *vjp(do)]


def assert_close_to_reference(fn, H, K, T, rel=0.02):
    """Outputs and q/k/v gradients within bf16 rounding (2% of the largest magnitude) of
    the f32 reference; the f32 reference itself sets the scale."""
    q, k, v, do = qkv(H, K, T)
    ref = out_and_grads(reference, q, k, v, do.astype(jnp.float32))
    got = out_and_grads(fn, q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.shape == b.shape and a.dtype == jnp.bfloat16, name
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
        assert err <= rel * float(jnp.max(jnp.abs(b))), (name, err)


GQA = [(4, 4), (4, 1), (8, 1)]  # query heads per kv head: 1, 4, 8


@pytest.mark.parametrize("H,K", GQA)
@pytest.mark.parametrize("T,block", [(40, 16), (64, 16), (33, 32)])  # 40, 33: not multiples
def test_blockwise_equals_reference(H, K, T, block):
    assert_close_to_reference(lambda q, k, v: blockwise_attention(q, k, v, block=block), H, K, T)


@pytest.mark.parametrize("H,K", GQA)
def test_splash_interpret_equals_reference(H, K):
    # 200 tokens: padded to 256 (two 128-token tiles would be 256 too; 200 is no multiple)
    assert_close_to_reference(lambda q, k, v: splash_attention(q, k, v, interpret=True), H, K, 200)


@pytest.mark.parametrize("H,K", GQA)
def test_pallas_gpu_interpret_equals_reference(H, K):
    assert_close_to_reference(lambda q, k, v: pallas_gpu_attention(q, k, v, interpret=True), H, K, 72)


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "cuda"), reason="cuDNN needs an NVIDIA GPU")
@pytest.mark.parametrize("H,K", GQA)
def test_cudnn_equals_reference(H, K):
    from megamesh.model.kernels import cudnn_attention

    assert_close_to_reference(cudnn_attention, H, K, 200)


def random_segments(B, T, seed=0):
    """(B, T) document ids of packed rows: documents of 1 to T/3 tokens."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(B):
        lens = []
        while sum(lens) < T:
            lens.append(int(rng.integers(1, max(2, T // 3))))
        rows.append(np.repeat(np.arange(len(lens)), lens)[:T])
    return jnp.asarray(np.stack(rows), jnp.int32)


@pytest.mark.parametrize("impl,T", [("blockwise", 80), ("reference", 40), ("splash", 200),
                                    ("pallas_gpu", 72)])
def test_document_masking_equals_the_reference_with_segment_ids(impl, T):
    """Attention within each packed document: every implementation's output and q/k/v
    gradients equal the reference formula masked by segment ids."""
    seg = random_segments(2, T)
    assert len(np.unique(seg[0])) > 3
    H, K = 4, 2

    def ref(q, k, v):
        pos = jnp.broadcast_to(jnp.arange(T), (2, T))
        return attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                      pos, pos, seg, seg)

    q, k, v, do = qkv(H, K, T)
    want = out_and_grads(ref, q, k, v, do.astype(jnp.float32))
    fns = {"blockwise": lambda q, k, v: blockwise_attention(q, k, v, block=16, segments=seg),
           "reference": lambda q, k, v: blockwise_attention(q, k, v, block=T, segments=seg),
           "splash": lambda q, k, v: splash_attention(q, k, v, seg, interpret=True),
           "pallas_gpu": lambda q, k, v: pallas_gpu_attention(q, k, v, seg, interpret=True)}
    got = out_and_grads(fns[impl], q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
        assert err <= 0.02 * float(jnp.max(jnp.abs(b))), (impl, name, err)
    # and the mask matters: without it the output differs
    plain = blockwise_attention(q, k, v, block=16)
    assert float(jnp.max(jnp.abs(plain.astype(jnp.float32) - want[0]))) > 0.1


def test_blockwise_memory_grows_with_the_block_not_the_square():
    """Compiled forward + backward at 4k tokens, 2 heads: the reference formula holds
    (at least) the two heads' T x T f32 scores (64 MiB each); 256-key blocks hold a
    few T x 256 arrays per head (4 MiB each), under a third of that."""
    q, k, v, do = qkv(2, 1, 4096, B=1, Dh=64)

    def temp_bytes(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * do)
        c = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
        return c.memory_analysis().temp_size_in_bytes

    square = 4096 * 4096 * 4
    small = temp_bytes(lambda q, k, v: blockwise_attention(q, k, v, block=256))
    whole = temp_bytes(lambda q, k, v: blockwise_attention(q, k, v, block=4096))  # the reference
    assert whole > 2 * square and small < whole / 3


@pytest.mark.parametrize("layout,H,K,local_heads,local_tokens,docs", [
    ("fsdp=2,sequence=2,tensor=2", 4, 2, (2, 1), 128, False),  # context parallel, heads split
    ("fsdp=2,sequence=4", 4, 4, (4, 4), 64, False),  # 4 offsets: one switch branch per device
    ("fsdp=2,sequence=4", 4, 4, (4, 4), 64, True),  # ... with documents: segment ids gathered
    ("fsdp=2,tensor=4", 8, 2, (2, 1), 256, False),  # 2 kv heads over 4 devices: repeated to 4
])
def test_sharded_per_device_kernel_equals_unsharded(layout, H, K, local_heads, local_tokens, docs):
    """Splash (interpreted) under shard_map: the gradients of the sharded run equal the
    single-device ones; each device holds its share of the query and kv heads and, over
    a sequence axis, of the queries (keys and values gathered, causal mask offset)."""
    q, k, v, do = qkv(H, K, 256, B=2, dtype=jnp.float32)
    kern = Kernels(attention="splash", moe="einsum", matmul="f32", platform="cpu")
    seg = random_segments(2, 256) if docs else None

    def loss(q, k, v):
        return jnp.sum(causal_attention(q, k, v, seg) * do)

    def balanced_loss(q, k, v):  # as the train step runs it: every token's data reordered
        order = context_parallel_order(q.shape[1])
        if "sequence" in layout:
            assert order is not None  # 256 tokens split into 2n chunks: load-balanced
        if order is None:
            return loss(q, k, v)
        return jnp.sum(causal_attention(q[:, order], k[:, order], v[:, order],
                                        None if seg is None else seg[:, order]) * do[:, order])

    with using_kernels(kern):
        want = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    mesh = make_mesh(layout)
    rules, sizes = strategy("fsdp"), mesh_sizes(mesh)
    spec = lambda a, axes: jax.sharding.NamedSharding(mesh, logical_to_spec(axes, a.shape, sizes, rules))
    shard = [spec(q, ("batch", "seq", "heads", "head_dim"))] + \
        [spec(k, ("batch", "seq", "kv_heads", "head_dim"))] * 2

    def sharded(q, k, v):
        with activation_sharding(mesh, rules, kern):
            return jax.grad(balanced_loss, argnums=(0, 1, 2))(q, k, v)

    got = jax.jit(sharded, in_shardings=shard)(q, k, v)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    def forward(q, k, v):
        with activation_sharding(mesh, rules, kern):
            return causal_attention(q, k, v, seg)  # (the order does not change the shapes)

    body = next(e for e in jax.make_jaxpr(forward)(q, k, v).jaxpr.eqns
                if e.primitive.name == "shard_map").params["jaxpr"]
    # the body's inputs end with q, k, v (splash's mask tables come first; then the
    # queries' and the keys' segment ids)
    qkv_in = body.invars[-5:-2] if docs else body.invars[-3:]
    assert tuple(x.aval.shape[-2] for x in qkv_in[:2]) == local_heads
    assert qkv_in[0].aval.shape[1] == local_tokens
    if "sequence" in layout:  # one copy of the whole sequence's keys and values per device,
        # gathered by the partitioner outside (no collective in the per-device program)
        assert qkv_in[1].aval.shape[:3] == (1, 1, 256)
        assert not [e for e in body.eqns if e.primitive.name.startswith("all_gather")]


def test_load_balanced_context_parallel_gives_every_device_the_same_attention_work():
    """8 sequence shards of 16k tokens: the (query, key) tiles splash computes per device,
    counted from splash's own mask processing (the tiles its causal masks leave), equal
    within 5% in the load-balanced order (exactly, here), 15x apart in the plain split."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mi

    from megamesh.model.kernels import causal_tiles, load_balanced_order

    T, n = 16384, 8
    c, blk = T // (2 * n), 512

    def splash_tiles(offset: int, length: int) -> int:
        info, _ = mi.process_mask(sm.MultiHeadMask((sm.CausalMask((length, T), offset=offset),)),
                                  (blk, blk))
        return int((np.asarray(info.block_mask) > 0).sum())

    balanced = [splash_tiles(d * c, c) + splash_tiles((2 * n - 1 - d) * c, c) for d in range(n)]
    plain = [splash_tiles(d * 2 * c, 2 * c) for d in range(n)]
    assert balanced == causal_tiles(T, n, True) and plain == causal_tiles(T, n, False)
    assert max(balanced) / min(balanced) <= 1.05
    assert max(plain) / min(plain) > 10
    order = load_balanced_order(T, n)
    assert sorted(order.tolist()) == list(range(T))  # a permutation: chunks d and 2n-1-d per device
    assert order[:c].tolist() == list(range(c)) and order[c] == (2 * n - 1) * c


# --------------------------------------------------------------------------- MoE


def moe_cfg(capacity_factor):
    return apply_overrides(preset("tiny-moe"), {"moe.capacity_factor": capacity_factor})


@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
def test_grouped_moe_equals_einsum(capacity_factor):
    """The MoE MLP's output and gradients (input, router and every expert weight) match
    the GShard einsum reference: dropless, and with the same tokens dropped by capacity."""
    from megamesh.model.moe import dispatch_compute_combine, route
    from megamesh.model.transformer import init_params

    cfg = moe_cfg(capacity_factor)
    p = init_params(cfg, jax.random.key(0))["layers"]["moe"]
    p = jax.tree.map(lambda x: x[0], p)  # one layer
    h = jax.random.normal(jax.random.key(1), (3, 24, cfg.d_model), jnp.float32)

    def mlp(h, p):
        _, w, e = route(h, p["router"], cfg.moe)
        return jnp.sum(jnp.sin(dispatch_compute_combine(h, w, e, p, cfg.moe)))

    results = {}
    for name in ("einsum", "grouped"):
        fn = lambda h, p: mlp(h, p)  # a new function: jax caches traces by function  # noqa: E731
        with using_kernels(Kernels(attention="reference", moe=name, matmul="f32")):
            results[name] = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(h, p)
            text = str(jax.make_jaxpr(lambda h, p: mlp(h, p))(h, p))
        assert ("ragged_dot" in text) == (name == "grouped")
    (v1, g1), (v2, g2) = results["einsum"], results["grouped"]
    np.testing.assert_allclose(v2, v1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_grouped_moe_memory_is_linear_in_tokens():
    """Dropless: the einsum form's (B, T, E, C=T) dispatch tensors grow as T^2 x E, the
    grouped form's sorted rows as T x k (compiled forward + backward, 2k vs 8k tokens)."""
    from megamesh.model.moe import dispatch_compute_combine, route
    from megamesh.model.transformer import init_params

    cfg = moe_cfg(None)
    p = jax.tree.map(lambda x: x[0], init_params(cfg, jax.random.key(0))["layers"]["moe"])

    def temp(name, T):
        def f(h, p):
            _, w, e = route(h, p["router"], cfg.moe)
            return jnp.sum(dispatch_compute_combine(h, w, e, p, cfg.moe))
        h = jnp.zeros((1, T, cfg.d_model), jnp.float32)
        with using_kernels(Kernels(attention="reference", moe=name, matmul="f32")):
            c = jax.jit(jax.grad(f, argnums=(0, 1))).lower(h, p).compile()
        return c.memory_analysis().temp_size_in_bytes

    assert temp("grouped", 8192) < 4.4 * temp("grouped", 2048)
    assert temp("einsum", 8192) > 6 * temp("einsum", 2048)
    assert temp("grouped", 8192) < temp("einsum", 8192) / 2


def test_grouped_moe_sharded_equals_unsharded():
    """Each device sorts its own tokens (shard_map over the batch): same loss and
    gradients as one device, on fsdp=4 x data=2."""
    from megamesh.model.transformer import forward, init_params

    cfg = moe_cfg(None)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(16), (8, 16))
    kern = Kernels(attention="blockwise", moe="grouped", matmul="f32")

    def loss(p):
        return jnp.mean(forward(p, tokens, pos, cfg=cfg).logits ** 2)

    with using_kernels(kern):
        want = jax.grad(loss)(params)
    mesh = make_mesh("data=2,fsdp=4")
    rules = strategy("fsdp")

    def sharded(p):
        with activation_sharding(mesh, rules, kern):
            return jax.grad(loss)(p)

    got = jax.jit(sharded)(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


# --------------------------------------------------------------------------- paged KV cache


@pytest.mark.parametrize("paged", ["gather", "xla"])
@pytest.mark.parametrize("T", [1, 5])
def test_paged_attention_equals_a_dense_cache(T, paged):
    """Keys and values written through a page table (pages scattered over the pool, the
    scratch page full of garbage), read back by `paged_attention`: `gather` exactly the
    dense-cache attention the engine ran before pages, `attend` over (B, S) rows; `xla`
    (online softmax a block of pages at a time) the same within f32 rounding."""
    from megamesh.model.backend import Kernels, using_kernels
    from megamesh.model.kernels import paged_attention
    from megamesh.model.kvcache import write_kv

    B, H, K, Dh, P, S, L = 3, 4, 2, 16, 4, 24, 2
    per = S // P
    rng = np.random.default_rng(0)
    n_pages = 1 + B * per
    table = jnp.asarray(1 + rng.permutation(B * per).reshape(B, per), jnp.int32)
    pages = jnp.asarray(rng.normal(size=(L * n_pages, P, 2 * K, Dh)), jnp.float32)  # garbage
    k_all, v_all = (jnp.asarray(rng.normal(size=(B, S, K, Dh)), jnp.float32) for _ in range(2))
    base = jnp.int32(n_pages)  # layer 1
    start = jnp.asarray([0, 7, 12], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    pages = write_kv(pages, k_all, v_all, table, pos, base)  # every position of every row
    q = jnp.asarray(rng.normal(size=(B, T, H, Dh)), jnp.float32)
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    A = 20  # an attention bucket: every row's last position is below it
    with using_kernels(Kernels("reference", "einsum", "f32", paged=paged)):
        got = paged_attention(q, pages, table, base, positions, A)
    want = attend(q, k_all[:, :A], v_all[:, :A], positions, pos[:, :A])
    if paged == "gather":
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    else:
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # a row writing past the pages it owns (table entries 0) writes to its layer's scratch
    # page, never to another row's page
    before = pages
    short = table.at[0, 2:].set(0)
    pages = write_kv(pages, k_all[:1, 8:12], v_all[:1, 8:12], short[:1], pos[:1, 8:12] + 4, base)
    changed = np.nonzero(np.any(np.asarray(pages != before), axis=(1, 2, 3)))[0]
    assert set(changed.tolist()) <= {int(base)}  # only layer 1's scratch page


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T", [1, 11])
def test_paged_blockwise_walks_only_the_real_length(T, kv_dtype):
    """The `xla` paged kernel in small blocks (2 pages of 4 positions; queries 4 at a time):
    rows of different lengths in one batch, a prefill chunk longer than a query block,
    keys past every query in garbage pages that are never read into a result. Equal to
    the plain formula over each row's keys; a row's result is the same bits alone as
    beside longer rows (fully masked blocks leave its sums unchanged). bf16 pages under f32
    queries (`serve --kv-dtype bfloat16`): the formula over the bf16-rounded keys and
    values, computed in f32."""
    from megamesh.model.blockwise import paged_blockwise_attention
    from megamesh.model.kvcache import write_kv

    B, H, K, Dh, P, per = 3, 4, 2, 8, 4, 10
    rng = np.random.default_rng(1)
    n_pages = 1 + B * per
    table = jnp.asarray(1 + rng.permutation(B * per).reshape(B, per), jnp.int32)
    pages = jnp.asarray(rng.normal(size=(n_pages, P, 2 * K, Dh)) * 50, kv_dtype)
    S = per * P
    k_all, v_all = (jnp.asarray(rng.normal(size=(B, S, K, Dh)), jnp.float32) for _ in range(2))
    k_all, v_all = (x.astype(kv_dtype).astype(jnp.float32) for x in (k_all, v_all))
    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    pages = write_kv(pages, k_all, v_all, table, pos, jnp.int32(0))
    ends = jnp.asarray([T + 2, 27, 39], jnp.int32)  # one past each row's last query
    positions = ends[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None]
    q = jnp.asarray(rng.normal(size=(B, T, H, Dh)), jnp.float32)
    run = jax.jit(lambda q, t, p: paged_blockwise_attention(q, pages, t, jnp.int32(0), p,
                                                             block=8, q_block=4))
    got = run(q, table, positions)
    want = attend(q, k_all, v_all, positions, pos)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    alone = run(q[:1], table[:1], positions[:1])  # row 0 walks 1-2 blocks, not 5
    np.testing.assert_array_equal(np.asarray(alone), np.asarray(got[:1]))


# --------------------------------------------------------------------------- the choice


def test_platform_defaults_and_overrides():
    assert choose_kernels("tpu") == Kernels(attention="splash", moe="grouped", matmul="native",
                                            platform="tpu", paged="ragged")
    assert choose_kernels("cuda").attention == "cudnn"
    assert choose_kernels("cuda").paged == "xla"
    assert choose_kernels("cpu").describe() == "attention=blockwise,moe=einsum,matmul=f32,paged=xla"
    assert choose_kernels("tpu", "attention=blockwise, moe=einsum").attention == "blockwise"
    # a mesh that splits experts keeps the einsum form (XLA's all-to-alls)
    assert choose_kernels("tpu", "auto", {"expert": 4}).moe == "einsum"


@pytest.mark.parametrize("overrides,match", [
    ("attention=flash", "attention='flash' is not allowed: one of reference, blockwise"),
    ("attn=splash", "'attn=splash' is not allowed: use KEY=NAME pairs"),
    ("attention=cudnn", "needs a GPU"),
    ("paged=ragged", "paged=ragged needs a TPU"),
    ("paged=vllm", "paged='vllm' is not allowed: one of xla, gather, ragged"),
])
def test_bad_kernel_overrides_are_clear_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        choose_kernels("cpu", overrides)
    with pytest.raises(ConfigError, match="moe=grouped is not allowed on a mesh with expert > 1"):
        choose_kernels("tpu", "moe=grouped", {"expert": 2})


@pytest.mark.slow  # ~40 s of compiling; the default suite keeps test_compile's TPU steps
def test_tpu_train_step_at_8k_tokens_holds_no_square_buffer():
    """The real train step compiled for Ironwood at seq 8192 (splash attention): no buffer
    in the optimized HLO has two dimensions of 8192 (a T x T score matrix); the same
    step with the reference kernel has them."""
    import re

    from megamesh.compile.aot import compile_train
    from megamesh.plan.target import parse_target
    from megamesh.runspec import RunSpec
    from megamesh.train.config import ScheduleConfig, TrainConfig

    cfg = apply_overrides(preset("llama3.1-8b"), {"n_layers": "1", "d_model": "512",
                                                   "n_heads": "4", "n_kv_heads": "2",
                                                   "d_ff": "1024", "vocab_size": "4096",
                                                   "max_seq_len": "8192"})

    def hlo(kernels):
        tc = TrainConfig(steps=10, global_batch=8, seq_len=8192, schedule=ScheduleConfig(warmup_steps=1),
                         run=RunSpec(layout="fsdp=8", kernels=kernels))
        return compile_train(cfg, tc, parse_target("tpu7x:2x2x1")).hlo_text

    square = re.compile(r"\[[0-9,]*8192,8192[0-9,]*\]")
    assert not square.search(hlo("auto"))
    assert square.search(hlo("attention=reference"))


# --------------------------------------------------------------------------- precision and remat


def test_embedding_gradient_is_summed_in_float32():
    """A token seen 572 times: its row's gradient is the f32 sum of the bf16 cotangents
    (exactly), where autodiff through the bf16 cast rounded the running sum (~9% off)."""
    from megamesh.model.transformer import embed_lookup

    w = jax.random.normal(jax.random.key(0), (64, 8), jnp.float32)
    tok = jnp.zeros((4, 1000), jnp.int32).at[:, ::7].set(3)
    g = (jax.random.normal(jax.random.key(1), (4, 1000, 8)) * 1e-3).astype(jnp.bfloat16)
    loss = lambda w: jnp.sum(embed_lookup(w, tok, ("vocab", "embed"), jnp.bfloat16).astype(
        jnp.float32) * g.astype(jnp.float32))
    want = jnp.zeros_like(w).at[tok].add(g.astype(jnp.float32))
    got = jax.jit(jax.grad(loss))(w)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    bf16_sum = jax.grad(lambda w: jnp.sum(jnp.take(w.astype(jnp.bfloat16), tok, axis=0).astype(
        jnp.float32) * g.astype(jnp.float32)))(w)
    assert float(jnp.max(jnp.abs(bf16_sum - want))) > 100 * float(jnp.max(jnp.abs(got - want)) + 1e-9)


def test_native_matmuls_keep_bf16_cotangents():
    """On accelerators (`native`) a bf16 layer's backward GEMMs take bf16 operands: no
    f32 x bf16 dot in the gradient's jaxpr; the CPU's `f32` mode widens them all."""
    from megamesh.model.transformer import dense

    x = jnp.ones((4, 16, 32), jnp.bfloat16)
    w = jnp.ones((32, 64), jnp.bfloat16)

    def dot_operand_dtypes(mode):
        # a new function per mode: jax caches traces by function, not by kernel context
        grad = jax.grad(lambda x, w: jnp.sum(dense(dense(x, w), w.T).astype(jnp.float32)),
                        argnums=(0, 1))
        with using_kernels(Kernels(attention="blockwise", moe="einsum", matmul=mode)):
            jaxpr = jax.make_jaxpr(grad)(x, w)
        return {tuple(str(v.aval.dtype) for v in e.invars) for e in jaxpr.jaxpr.eqns
                if e.primitive.name == "dot_general"}

    assert dot_operand_dtypes("native") == {("bfloat16", "bfloat16")}
    assert dot_operand_dtypes("f32") == {("float32", "float32")}


def test_remat_auto_picks_the_fastest_policy_that_fits():
    from megamesh.runspec import RunSpec
    from megamesh.train.config import ScheduleConfig, TrainConfig
    from megamesh.train.step import resolve_remat

    cfg = preset("tiny")
    tc = TrainConfig(steps=10, global_batch=8, seq_len=256, schedule=ScheduleConfig(warmup_steps=1))
    assert tc.run.remat == "auto"
    mesh = make_mesh("fsdp=8")
    kern = choose_kernels("cpu")
    assert resolve_remat(cfg, tc, mesh, kern, capacity=64 * 2**30) == "none"
    picks = [resolve_remat(cfg, tc, mesh, kern, capacity=c * 2**20) for c in (400, 250, 150, 1)]
    order = ("none", "dots", "dots_no_batch", "full")
    assert [order.index(p) for p in picks] == sorted(order.index(p) for p in picks)
    assert picks[-1] == "full" and len(set(picks)) >= 2
    explicit = tc.replace(run=RunSpec(remat="dots"))
    assert resolve_remat(cfg, explicit, mesh, kern) == "dots"  # explicit wins


def test_bf16_first_adam_moment_option():
    from megamesh.model.transformer import init_params
    from megamesh.train.config import OptimizerConfig, TrainConfig
    from megamesh.train.optim import make_optimizer

    cfg = apply_overrides(preset("tiny"), {"n_layers": "1", "vocab_size": "300"})
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    shape = params["embed"].shape
    for dtype in ("float32", "bfloat16"):
        tc = TrainConfig(optimizer=OptimizerConfig(mu_dtype=dtype))
        state = jax.eval_shape(make_optimizer(cfg, tc).init, params)
        moments = [x for x in jax.tree.leaves(state) if getattr(x, "shape", None) == shape]
        assert [str(m.dtype) for m in moments] == [dtype, "float32"]  # mu, nu
    with pytest.raises(ConfigError, match="mu_dtype='float16' is not allowed: must be one of float32"):
        OptimizerConfig(mu_dtype="float16")
