"""The forward pass: KV-cached prefill + decode equals the full forward; remat; MoE routing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megamesh.config import MoEConfig, apply_overrides, preset
from megamesh.model import moe as moe_lib
from megamesh.model.kvcache import init_cache
from megamesh.model.transformer import forward, init_params

SMALL = {"n_layers": "2", "d_model": "64", "n_heads": "4", "n_kv_heads": "2", "d_ff": "128",
         "vocab_size": "256"}


def small(name):
    over = dict(SMALL)
    if name == "tiny-moe":
        over.update({"moe.d_ff_expert": "96"})
    return apply_overrides(preset(name), over)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_cached_prefill_and_decode_equal_full_forward(name):
    cfg = small(name)
    params = init_params(cfg, jax.random.key(0))
    total = 20
    rng = np.random.RandomState(0)
    seqs = rng.randint(0, cfg.vocab_size, (2, total))
    prompt_lens = [5, 9]  # rows of different lengths in one batch
    fwd = jax.jit(lambda p, t, q, c: forward(p, t, q, c, cfg=cfg)[::2])  # (logits, cache)

    full = [np.asarray(fwd(params, seqs[i:i + 1], np.arange(total)[None], None)[0][0])
            for i in range(2)]

    # Prefill both rows right-padded to the longest prompt, then decode each row at its own position.
    cache = init_cache(cfg, 2, 32)
    P = max(prompt_lens)
    pad = np.zeros((2, P), np.int32)
    for i, n in enumerate(prompt_lens):
        pad[i, :n] = seqs[i, :n]
    logits, cache = fwd(params, pad, np.broadcast_to(np.arange(P), (2, P)), cache)
    for i, n in enumerate(prompt_lens):
        np.testing.assert_allclose(np.asarray(logits[i, :n]), full[i][:n], rtol=1e-5, atol=1e-5)
    pos = np.array(prompt_lens)
    while pos.max() < total:
        step_pos = np.minimum(pos, total - 1)
        tok = seqs[np.arange(2), step_pos][:, None]
        logits, cache = fwd(params, tok, step_pos[:, None], cache)
        for i in range(2):
            if pos[i] < total:
                np.testing.assert_allclose(np.asarray(logits[i, 0]), full[i][pos[i]], rtol=1e-5, atol=1e-5)
        pos += 1


def test_every_remat_policy_a_run_spec_allows_has_an_implementation():
    from megamesh.model.transformer import REMAT
    from megamesh.runspec import REMAT_POLICIES

    # "auto" is resolved by the train step; "none" saves everything (no policy)
    assert set(REMAT) | {"auto", "none"} == set(REMAT_POLICIES)


def test_remat_policies_give_the_same_gradient():
    base = small("tiny")
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, base.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
    params = init_params(base, jax.random.key(0))
    grads = {}
    for policy in ("none", "dots", "dots_no_batch", "full", "offload"):
        loss = lambda p, policy=policy: jnp.mean(
            forward(p, tokens, positions, cfg=base, remat=policy).logits ** 2)
        grads[policy] = jax.jit(jax.grad(loss))(params)
    for policy in ("dots", "dots_no_batch", "full", "offload"):
        for a, b in zip(jax.tree.leaves(grads[policy]), jax.tree.leaves(grads["none"])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_moe_dispatch_matches_a_direct_per_token_loop():
    moe = MoEConfig(n_experts=4, top_k=2, d_ff_expert=8)
    key = jax.random.split(jax.random.key(0), 5)
    D = 6
    h = jax.random.normal(key[0], (2, 7, D))
    p = {"router": jax.random.normal(key[1], (D, 4)),
         "w_gate": jax.random.normal(key[2], (4, D, 8)),
         "w_up": jax.random.normal(key[3], (4, D, 8)),
         "w_down": jax.random.normal(key[4], (4, 8, D))}
    _, w, e = moe_lib.route(h, p["router"], moe)
    y = moe_lib.dispatch_compute_combine(h, w, e, p, moe)
    want = np.zeros(h.shape, np.float32)
    for b in range(2):
        for t in range(7):
            for j in range(2):
                x, ex = h[b, t], int(e[b, t, j])
                out = (jax.nn.silu(x @ p["w_gate"][ex]) * (x @ p["w_up"][ex])) @ p["w_down"][ex]
                want[b, t] += float(w[b, t, j]) * np.asarray(out)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_moe_capacity_drops_overflow_tokens():
    moe = MoEConfig(n_experts=2, top_k=1, d_ff_expert=4, capacity_factor=0.5)
    assert moe_lib.capacity(moe, 8) == 2
    D = 3
    h = jnp.ones((1, 8, D))
    p = {"w_gate": jnp.ones((2, D, 4)), "w_up": jnp.ones((2, D, 4)), "w_down": jnp.ones((2, 4, D))}
    experts = jnp.zeros((1, 8, 1), jnp.int32)  # all tokens to expert 0: only 2 fit
    y = moe_lib.dispatch_compute_combine(h, jnp.ones((1, 8, 1)), experts, p, moe)
    computed = np.asarray(jnp.any(y != 0, axis=-1))[0]
    assert computed.tolist() == [True, True] + [False] * 6


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_not():
    E = 4
    probs = jnp.full((1, 8, E), 1 / E)
    experts = jnp.arange(8).reshape(1, 8, 1) % E
    assert float(moe_lib.load_balancing_loss(probs, experts, E)) == pytest.approx(1.0)
    skew = jnp.zeros((1, 8, E)).at[..., 0].set(1.0)
    assert float(moe_lib.load_balancing_loss(skew, jnp.zeros((1, 8, 1), jnp.int32), E)) == pytest.approx(4.0)


def test_forward_returns_aux_for_moe_only():
    for name, positive in (("tiny", False), ("tiny-moe", True)):
        cfg = small(name)
        params = init_params(cfg, jax.random.key(0))
        tok = jnp.zeros((1, 4), jnp.int32)
        logits, _, cache, aux = forward(params, tok, jnp.arange(4)[None], cfg=cfg)
        assert logits.shape == (1, 4, cfg.vocab_size) and cache is None
        assert (float(aux) > 0) == positive


def test_sampling_rules():
    from megamesh.model.generate import sample

    sample = jax.jit(sample)
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 3))
    key = jax.random.key(0)
    t = jnp.asarray([0.0, 1.0, 1.0])
    k = jnp.asarray([0, 1, 0])
    p = jnp.asarray([1.0, 1.0, 0.4])
    # row 0 greedy, row 1 top-k 1, row 2 top-p 0.4 (only the 0.5 token reaches it): all pick 0
    for i in range(5):
        assert sample(logits, jax.random.fold_in(key, i), t, k, p).tolist() == [0, 0, 0]
    # top-p 0.7 keeps tokens 0 and 1 only
    draws = {int(sample(logits[:1], jax.random.fold_in(key, i), jnp.asarray([1.0]), jnp.asarray([0]),
                        jnp.asarray([0.7]))[0]) for i in range(60)}
    assert draws == {0, 1}


def test_generate_greedy_equals_argmax_of_full_forward():
    from megamesh.model.generate import generate

    cfg = small("tiny")
    params = init_params(cfg, jax.random.key(0))
    prompt = [1, 2, 3, 4]
    out = generate(params, cfg, prompt, 6)
    seq = list(prompt)
    for _ in range(6):
        logits = forward(params, jnp.asarray([seq]), jnp.arange(len(seq))[None], cfg=cfg).logits
        seq.append(int(jnp.argmax(logits[0, -1])))
    assert out == seq[len(prompt):]
