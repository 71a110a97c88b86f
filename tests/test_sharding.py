"""Sharding on 8 fake CPU devices: sharded forward and gradient equal the unsharded ones."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from megamesh.config import apply_overrides, preset
from megamesh.errors import ConfigError
from megamesh.model.transformer import forward, init_params
from megamesh.sharding.logical import resolve, weight_compute_rules
from megamesh.sharding.mesh import make_mesh, parse_layout
from megamesh.sharding.rules import (
    activation_sharding,
    data_sharding,
    logical_to_spec,
    param_partition_specs,
    param_shardings,
    strategy,
    train_rules,
    vocab_parallel,
)

DENSE = {"d_model": "64", "n_heads": "8", "n_kv_heads": "4", "d_ff": "128", "vocab_size": "256"}
MOE = {**DENSE, "moe.d_ff_expert": "64"}

CASES = [  # (model, overrides, layout, strategy)
    ("tiny", DENSE, "data=8", "fsdp"),
    ("tiny", DENSE, "fsdp=2,tensor=4", "fsdp"),
    ("tiny", DENSE, "fsdp=2,sequence=2,tensor=2", "fsdp"),  # weights over fsdp x sequence
    ("tiny-moe", MOE, "fsdp=2,tensor=2,expert=2", "fsdp"),
    ("tiny", DENSE, "data=2,tensor=4", "serve"),
    ("tiny", DENSE, "data=8", "dp"),
]
VOCAB_CASES = [("tiny", DENSE, "fsdp=8", "fsdp+vocab"), ("tiny", DENSE, "fsdp=2,tensor=4", "fsdp+vocab")]


def rules_for(strat):
    """A strategy by name; "fsdp+vocab" is fsdp made vocab-parallel (`train_rules`' choice
    for small batches)."""
    return vocab_parallel(strategy("fsdp")) if strat == "fsdp+vocab" else strategy(strat)


def loss_fn(cfg):
    def loss(params, tokens, positions):
        logits, _, _, aux = forward(params, tokens, positions, cfg=cfg)
        logp = jax.nn.log_softmax(logits)
        target = jnp.roll(tokens, -1, axis=1)
        nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)
        return jnp.mean(nll) + 0.01 * aux
    return loss


def run_both(cfg, layout, strat):
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(32), (8, 32))
    loss = loss_fn(cfg)
    fwd = lambda p, t, q: forward(p, t, q, cfg=cfg).logits
    ref = jax.jit(fwd)(params, tokens, positions), jax.jit(jax.grad(loss))(params, tokens, positions)

    mesh, rules = make_mesh(layout), rules_for(strat)
    ps, ds = param_shardings(cfg, mesh, rules), data_sharding(mesh, rules, tokens.shape)

    def sharded(f):
        def g(*a):
            with activation_sharding(mesh, rules):
                return f(*a)
        return g

    args = jax.device_put(params, ps), jax.device_put(tokens, ds), jax.device_put(positions, ds)
    out_logits = jax.jit(sharded(fwd), in_shardings=(ps, ds, ds))(*args)
    out_grads = jax.jit(sharded(jax.grad(loss)), in_shardings=(ps, ds, ds), out_shardings=ps)(*args)
    return ref, (out_logits, out_grads), ps


def max_rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# Every case per layer (1 layer, tight tolerance) in the default suite; the 4-layer whole
# model for every case with `-m slow` (the suite's time budget).
SHARDED_PARAMS = [
    pytest.param(*case, n_layers, tol, id=f"{case[0]}-{case[2]}-{case[3]}-{kind}",
                 marks=() if n_layers == 1 else pytest.mark.slow)
    for case in CASES for n_layers, tol, kind in [(1, 1e-5, "per-layer"), (4, 1e-4, "whole-model")]
]


@pytest.mark.parametrize("name, over, layout, strat, n_layers, tol", SHARDED_PARAMS)
def test_sharded_equals_unsharded(name, over, layout, strat, n_layers, tol):
    check_sharded_equals_unsharded(name, over, layout, strat, n_layers, tol)


@pytest.mark.parametrize("name, over, layout, strat", VOCAB_CASES, ids=[c[2] for c in VOCAB_CASES])
def test_vocab_parallel_equals_unsharded(name, over, layout, strat):
    check_sharded_equals_unsharded(name, over, layout, strat, n_layers=2, tol=1e-4)


def check_sharded_equals_unsharded(name, over, layout, strat, n_layers, tol):
    cfg = apply_overrides(preset(name), {**over, "n_layers": str(n_layers)})
    (ref_logits, ref_grads), (logits, grads), ps = run_both(cfg, layout, strat)
    assert max_rel(logits, ref_logits) < tol
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        assert max_rel(g, r) < tol, (jax.tree_util.keystr(path), max_rel(g, r))
    # Gradients come back laid out like their parameters.
    for g, s in zip(jax.tree.leaves(grads), jax.tree.leaves(ps)):
        assert g.sharding.is_equivalent_to(s, g.ndim)


def specs_for(name, over, layout, strat):
    cfg = apply_overrides(preset(name), over)
    return param_partition_specs(cfg, make_mesh(layout), rules_for(strat))


def test_expected_partition_specs_fsdp_tensor():
    s = specs_for("tiny", DENSE, "fsdp=2,tensor=4", "fsdp")
    assert s["embed"] == P("tensor", "fsdp")
    assert s["lm_head"] == P("fsdp", "tensor")
    assert s["layers"]["attn"]["wq"] == P(None, "fsdp", "tensor", None)
    assert s["layers"]["attn"]["wk"] == P(None, "fsdp", "tensor", None)
    assert s["layers"]["attn"]["wo"] == P(None, "tensor", None, "fsdp")
    assert s["layers"]["mlp"]["w_gate"] == P(None, "fsdp", "tensor")
    assert s["layers"]["mlp"]["w_down"] == P(None, "tensor", "fsdp")
    assert s["layers"]["attn_norm"] == P(None, None)
    assert s["final_norm"] == P(None)


def test_context_parallel_devices_hold_a_share_of_the_weights():
    """The sequence axis is a ZeRO axis like fsdp (MaxText's rules do the same): weights and
    optimizer state are split over fsdp x sequence on embed and gathered for compute."""
    s = specs_for("tiny", DENSE, "fsdp=2,sequence=2,tensor=2", "fsdp")
    assert s["layers"]["attn"]["wq"] == P(None, ("fsdp", "sequence"), "tensor", None)
    assert s["layers"]["mlp"]["w_down"] == P(None, "tensor", ("fsdp", "sequence"))
    assert specs_for("tiny", DENSE, "sequence=8", "fsdp")["layers"]["mlp"]["w_gate"] == \
        P(None, "sequence", None)
    # in compute layout the ZeRO axes are dropped (the weight is gathered whole)
    compute = dict(weight_compute_rules(strategy("fsdp")))
    assert compute["embed"] == ("tensor",)
    # activations: the sequence axis stays on the tokens, not on embed
    assert resolve(("batch", "seq", "embed"), (8, 64, 64),
                   {"fsdp": 2, "sequence": 2, "tensor": 2}, strategy("fsdp")) == \
        [("fsdp",), ("sequence",), ("tensor",)]


def test_expected_partition_specs_data_and_expert():
    s = specs_for("tiny", DENSE, "data=8", "fsdp")
    assert all(spec == P(*[None] * len(spec)) for spec in jax.tree.leaves(s))
    m = specs_for("tiny-moe", MOE, "fsdp=2,tensor=2,expert=2", "fsdp")
    assert m["layers"]["moe"]["w_gate"] == P(None, "expert", "fsdp", "tensor")
    assert m["layers"]["moe"]["w_down"] == P(None, "expert", "tensor", "fsdp")
    # the router's embed dim takes what heads/mlp left free: fsdp and tensor
    assert m["layers"]["moe"]["router"] == P(None, ("fsdp", "tensor"), None)
    serve = specs_for("tiny", DENSE, "data=2,tensor=4", "serve")
    assert serve["layers"]["attn"]["wq"] == P(None, None, "tensor", None)


def test_vocab_parallel_tables_split_on_vocab_and_only_for_small_batches():
    s = specs_for("tiny", DENSE, "fsdp=8", "fsdp+vocab")
    assert s["embed"] == P("fsdp", None) and s["lm_head"] == P(None, "fsdp")
    assert s["layers"]["mlp"]["w_gate"] == P(None, "fsdp", None)  # layers stay ZeRO-3
    s = specs_for("tiny", DENSE, "fsdp=2,tensor=4", "fsdp+vocab")
    assert s["embed"] == P(("tensor", "fsdp"), None) and s["lm_head"] == P(None, ("tensor", "fsdp"))

    def choice(sizes, vocab=32000, batch=32, micro=1, seq=256, name="fsdp"):
        rules = train_rules(name, sizes, vocab=vocab, global_batch=batch, microbatches=micro,
                            seq_len=seq)
        return "vocab" if rules == vocab_parallel(strategy(name)) else \
            "plain" if rules == strategy(name) else rules
    # the fsdp group's microbatch: 32 x 256 = 8,192 tokens < 32,000: split the tables
    assert choice({"fsdp": 8}) == "vocab"
    assert choice({"fsdp": 8}, batch=128) == "plain"  # 32,768 tokens: gather the tables
    assert choice({"fsdp": 8}, batch=128, micro=4) == "vocab"  # per microbatch: 8,192
    assert choice({"data": 4, "fsdp": 2}, batch=128) == "vocab"  # group: 2 x 16 x 256
    assert choice({"fsdp": 1}) == "plain"  # nothing is gathered
    assert choice({"fsdp": 8}, vocab=32001) == "plain"  # 8 does not split the vocab
    assert choice({"data": 8}, name="dp") == "plain"


def test_rules_resolution_order_and_divisibility():
    sizes = {"data": 2, "fsdp": 2, "expert": 2, "tensor": 4}
    rules = strategy("fsdp")
    # an activation's batch claims fsdp before its embed can; embed then splits over tensor
    assert logical_to_spec(("batch", "seq", "embed"), (8, 16, 64), sizes, rules) == \
        P(("data", "fsdp", "expert"), None, "tensor")
    # expert claims the expert axis before batch
    assert logical_to_spec(("batch", "expert", None, "embed"), (8, 4, 3, 64), sizes, rules) == \
        P(("data", "fsdp"), "expert", None, "tensor")
    # 6 heads do not split 4 ways: replicated rather than an error (embed takes tensor)
    assert logical_to_spec(("embed", "heads"), (64, 6), sizes, rules) == P(("fsdp", "tensor"), None)
    with pytest.raises(ValueError, match="unknown logical axis 'hedas'"):
        logical_to_spec(("hedas",), (4,), sizes, rules)


def test_layouts_are_checked():
    assert parse_layout("data=2, fsdp=4") == {"data": 2, "fsdp": 4}
    with pytest.raises(ConfigError, match="uses 6 devices but there are 8"):
        make_mesh("data=2,fsdp=3")
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'.*allowed are dcn"):
        parse_layout("model=8")
    with pytest.raises(ConfigError, match="positive integer"):
        parse_layout("data=two")
    with pytest.raises(ConfigError, match="unknown strategy 'zero'"):
        strategy("zero")
    mesh = make_mesh()
    assert dict(zip(mesh.axis_names, mesh.devices.shape))["fsdp"] == 8


def test_compile_only_tpu_devices_build_a_mesh():
    # through megamesh's own loader: it lets several processes (this suite's workers) load
    # libtpu at once; a bare get_topology_desc failed on libtpu's lockfile when another
    # worker was compiling
    from megamesh.compile.aot import topology_devices
    from megamesh.plan.target import parse_target

    mesh = make_mesh("fsdp=4,tensor=2", devices=topology_devices(parse_target("tpu7x:2x2x1")))
    assert mesh.devices.size == 8 and {d.platform for d in mesh.devices.flat} == {"tpu"}
    cfg = apply_overrides(preset("tiny"), DENSE)
    specs = param_partition_specs(cfg, mesh, strategy("fsdp"))
    assert specs["layers"]["attn"]["wq"] == P(None, "fsdp", "tensor", None)


def table_gathers(batch):
    """The rules the train step picked, and its compiled all-gathers of a whole table."""
    import re

    from megamesh.train.config import ScheduleConfig, TrainConfig
    from megamesh.train.step import build_train_step

    cfg = apply_overrides(preset("tiny"), {**DENSE, "n_layers": "1"})
    tc = TrainConfig(steps=10, global_batch=batch, seq_len=16, schedule=ScheduleConfig(warmup_steps=1))
    ts = build_train_step(cfg, tc, make_mesh("fsdp=8"))
    state = ts.abstract_state()
    tokens = jax.ShapeDtypeStruct((batch, 17), jnp.int32, sharding=ts.batch_sharding)
    hlo = ts.fn.lower(state, tokens).compile().as_text()
    shapes = re.findall(r"= \w+\[([\d,]+)\][^=]* all-gather\(", hlo)
    table = {f"{cfg.vocab_size},{cfg.d_model}", f"{cfg.d_model},{cfg.vocab_size}"}
    return ts.rules, sum(s in table for s in shapes), len(shapes)


def test_small_batch_train_step_never_gathers_the_tables():
    # 8 x 16 = 128 tokens < vocab 256: the tables stay split, activations move instead
    rules, tables, gathers = table_gathers(8)
    assert rules == vocab_parallel(strategy("fsdp"))
    assert gathers > 0 and tables == 0
    # 64 x 16 = 1,024 tokens: plain ZeRO-3, embedding and head gathered whole
    rules, tables, _ = table_gathers(64)
    assert rules == strategy("fsdp") and tables >= 2
