"""The chunked, fused cross-entropy equals the plain one: loss and gradients, on one
device and vocab-parallel on 8 fake devices, and inside the real train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megamesh.config import ModelConfig, apply_overrides, preset
from megamesh.model.loss import cross_entropy
from megamesh.sharding.mesh import make_mesh
from megamesh.sharding.rules import activation_sharding, logical_to_spec, mesh_sizes, strategy, vocab_parallel
from megamesh.train.config import ScheduleConfig, TrainConfig

B, T, D, V = 4, 16, 32, 64


def inputs(dtype=jnp.float32):
    kx, kw, kt = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (B, T, D), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (D, V), jnp.float32) * 0.3).astype(dtype)
    t = jax.random.randint(kt, (B, T), 0, V)
    return x, w, t


def loss_and_grads(chunks, x, w, t, fused=None):
    loss = jax.jit(lambda x, w: cross_entropy(x, w, t, chunks, fused))(x, w)
    grads = jax.jit(jax.grad(lambda x, w: 3.0 * cross_entropy(x, w, t, chunks, fused),
                             argnums=(0, 1)))(x, w)
    return loss, grads


def test_chunked_equals_plain_on_one_device():
    x, w, t = inputs()
    ref_loss, (ref_dx, ref_dw) = loss_and_grads(1, x, w, t)
    # the definition, independently of megamesh's plain path
    logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", x, w))
    np.testing.assert_allclose(ref_loss, -jnp.mean(jnp.take_along_axis(logp, t[..., None], -1)), rtol=1e-6)
    for chunks in (1, 2, 4, 16):
        loss, (dx, dw) = loss_and_grads(chunks, x, w, t, fused=True)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        # the cotangent (3.0) scales the gradients the fused pass stored
        np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-7)


def test_chunked_gradients_keep_input_dtypes():
    x, w, t = inputs(jnp.bfloat16)
    _, (dx, dw) = loss_and_grads(4, x, w, t)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    _, (ref_dx, ref_dw) = loss_and_grads(1, x, w, t)
    np.testing.assert_allclose(np.float32(dx), np.float32(ref_dx), rtol=2e-2, atol=1e-4)
    np.testing.assert_allclose(np.float32(dw), np.float32(ref_dw), rtol=2e-2, atol=1e-4)


def test_fused_loss_with_native_bf16_matmuls():
    """The accelerators' mode (bf16 operands for both gradient GEMMs), run here on CPU:
    within bf16 rounding of the f32 reference, gradients in the inputs' dtypes."""
    from megamesh.model.backend import Kernels, using_kernels

    x, w, t = inputs(jnp.bfloat16)
    _, (ref_dx, ref_dw) = loss_and_grads(1, x.astype(jnp.float32), w.astype(jnp.float32), t)
    with using_kernels(Kernels(attention="blockwise", moe="grouped", matmul="native")):
        loss, (dx, dw) = loss_and_grads(4, x, w, t, fused=True)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(dx), ref_dx, rtol=3e-2, atol=2e-4)
    np.testing.assert_allclose(np.float32(dw), ref_dw, rtol=3e-2, atol=2e-4)


@pytest.mark.parametrize("chunks", [0, 3, 32])
def test_chunks_must_divide_the_sequence(chunks):
    x, w, t = inputs()
    with pytest.raises(ValueError, match="must be a positive divisor of the sequence length 16"):
        cross_entropy(x, w, t, chunks)


@pytest.mark.parametrize("layout", ["fsdp=8", "fsdp=2,tensor=4", "data=2,fsdp=4"])
def test_chunked_vocab_parallel_equals_unsharded(layout):
    """Head split on vocab (per slice: softmax max and sum reduced across the group),
    gradients laid out like their inputs."""
    x, w, t = inputs()
    ref_loss, (ref_dx, ref_dw) = loss_and_grads(1, x, w, t)
    mesh = make_mesh(layout)
    rules, sizes = vocab_parallel(strategy("fsdp")), mesh_sizes(mesh)
    sh = lambda axes, a: jax.sharding.NamedSharding(mesh, logical_to_spec(axes, a.shape, sizes, rules))
    xs, ws, ts = sh(("batch", "seq", "embed"), x), sh(("embed", "vocab"), w), sh(("batch", "seq"), t)
    assert "fsdp" in str(ws.spec)

    def run(f):
        def g(x, w, t):
            with activation_sharding(mesh, rules):
                return f(x, w, t)
        return jax.jit(g, in_shardings=(xs, ws, ts))(jax.device_put(x, xs), jax.device_put(w, ws),
                                                     jax.device_put(t, ts))

    loss = run(lambda x, w, t: cross_entropy(x, w, t, 4))
    dx, dw = run(jax.grad(lambda x, w, t: 3.0 * cross_entropy(x, w, t, 4), argnums=(0, 1)))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-7)
    assert dx.sharding.is_equivalent_to(xs, 3) and dw.sharding.is_equivalent_to(ws, 2)


BENCH = ModelConfig(name="bench", d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=64,
                    d_ff=1024, vocab_size=32000, max_seq_len=256)


@pytest.mark.parametrize("layout, batch, chunks, tpu_chunks", [
    ("fsdp=8", 32, 8, 1),  # vocab-parallel: 8,192 tokens x 4,000 vocab x 4 B = 128 MiB of logits
    ("fsdp=8", 8, 2, 1),  # 32 MiB
    ("fsdp=8", 512, 128, 8),  # 131k tokens > vocab: plain ZeRO-3, 64 x 256 x 32000 x 4 B = 2 GiB
    ("data=8", 32, 8, 1),  # no fsdp: the head is whole on every device, 128 MiB
    ("fsdp=2,sequence=4", 16, 4, 1),  # 16 x 64 x 16000 x 4 B = 64 MiB; slices stay split 4 ways
])
def test_loss_chunks_bound_the_logits_per_slice(layout, batch, chunks, tpu_chunks):
    from megamesh.sharding.logical import parse_layout, train_rules
    from megamesh.train.step import loss_chunks

    sizes = parse_layout(layout)
    tc = TrainConfig(steps=100, global_batch=batch, seq_len=256)
    rules = train_rules("fsdp", sizes, vocab=32000, global_batch=batch, microbatches=1, seq_len=256)
    assert loss_chunks(BENCH, tc, sizes, rules, platform="cpu") == chunks
    # accelerators take 256 MiB slices (fewer passes over the head and its gradient)
    assert loss_chunks(BENCH, tc, sizes, rules, platform="tpu") == tpu_chunks


def test_train_step_with_a_chunked_loss_matches_the_unchunked_one(monkeypatch):
    """The real step, vocab-parallel on 8 devices, forced to chunk its loss: same losses
    and parameters over a few steps as with one slice (the fused loss equals the plain
    one: the tests above)."""
    import megamesh.train.step as step_mod
    from megamesh.sharding.mesh import global_array

    cfg = apply_overrides(preset("tiny"), {"d_model": "64", "n_heads": "8", "n_kv_heads": "4",
                                           "d_ff": "128", "vocab_size": "256", "n_layers": "1"})
    tc = TrainConfig(steps=10, global_batch=8, seq_len=16, schedule=ScheduleConfig(warmup_steps=1))
    batches = np.random.default_rng(0).integers(0, 256, (2, 8, 17), dtype=np.int32)

    def train(chunk_bytes):
        monkeypatch.setattr(step_mod, "LOSS_CHUNK_BYTES", {"cpu": chunk_bytes})
        ts = step_mod.build_train_step(cfg, tc, make_mesh("fsdp=8"))
        state, losses = ts.init(jax.random.key(0)), []
        for b in batches:
            state, m = ts.fn(state, global_array(b, ts.batch_sharding))
            losses.append(float(m["loss"]))
        return ts, losses, state["params"]

    plain_ts, plain_losses, plain_params = train(2**40)
    ts, losses, params = train(1024)  # 8 x 16 tokens x 32 vocab x 4 B = 16 KiB: 16 slices
    assert plain_ts.loss_chunks == 1 and ts.loss_chunks == 16
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain_params)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
