"""The serving decode step equals the model's own forward, on one device and sharded."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from megamesh.config import preset
from megamesh.model.kvcache import contiguous_table, init_pages
from megamesh.model.transformer import forward, init_params
from megamesh.serve.step import SlotSampling, build_decode_step
from megamesh.sharding.mesh import make_mesh


@pytest.mark.parametrize("layout,n_dev", [("data=1", 1), ("data=2,tensor=4", 8)])
def test_decode_step_matches_forward(layout, n_dev):
    cfg = preset("tiny").replace(compute_dtype="float32")
    params = init_params(cfg, jax.random.key(0))
    B, T = 4, 8
    toks = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    full = forward(params, toks, jnp.broadcast_to(jnp.arange(T), (B, T)), cfg=cfg).logits
    ds = build_decode_step(cfg, make_mesh(layout, jax.devices()[:n_dev]), B, 16, dtype="float32",
                           page_size=4, logprobs=5)
    p = jax.device_put(params, ds.param_shardings)
    pages = jax.device_put(init_pages(cfg, ds.n_pages, ds.page_size, jnp.float32), ds.page_shardings)
    table = contiguous_table(B, 16, ds.page_size)[:, ::-1].copy()  # pages in any order
    greedy = SlotSampling.rows([], B, ds.words)
    for t in range(T):
        nxt, (lp, top_ids, top_lp), pages = ds.fn(p, pages, table, toks[:, t], jnp.full((B,), t, jnp.int32),
                                                  greedy)
    assert (nxt == jnp.argmax(full[:, -1], axis=-1)).all()
    # the step's log-probabilities: the forward's softmax, its top 5 and the drawn token's
    want = jax.nn.log_softmax(full[:, -1], axis=-1)
    assert jnp.allclose(top_lp, jax.lax.top_k(want, 5)[0], atol=1e-4)
    assert (top_ids[:, 0] == nxt).all()
    assert jnp.allclose(lp, jnp.take_along_axis(want, nxt[:, None], axis=-1)[:, 0], atol=1e-4)
