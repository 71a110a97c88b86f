"""The train step: the one function `megamesh train` runs and `megamesh compile` lowers.

State is a dict: params (param_dtype, fp32 master weights), opt_state, step, and the
guard counters. One call = one optimizer update over `global_batch` sequences, split
into `microbatches` for gradient accumulation (a scan, so memory holds one microbatch
of activations). A step whose loss or gradient is not finite leaves params and
optimizer state untouched and is counted (`bad_steps` consecutive, `skipped` total); so
does a step whose updated parameters or optimizer state hold a non-finite value. The
state is therefore always finite, and so is every checkpoint written from it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from megamesh.config import ModelConfig
from megamesh.errors import ConfigError
from megamesh.model.axes import constrain
from megamesh.model.backend import LOSS_CHUNK_BYTES, Kernels, planner_kernels
from megamesh.model.kernels import context_parallel_order
from megamesh.model.loss import cross_entropy
from megamesh.model.pipeline import Stages
from megamesh.model.specs import layer_stacks
from megamesh.model.transformer import forward, head_weight, init_params
from megamesh.plan.layout import Workload, run_layout
from megamesh.plan.memory import estimate_memory
from megamesh.sharding.logical import format_layout
from megamesh.sharding.rules import (
    Rules,
    activation_sharding,
    data_sharding,
    mesh_kernels,
    mesh_platform,
    mesh_sizes,
    param_shardings,
    resolve,
    train_rules,
)
from megamesh.train.config import TrainConfig, document_mask
from megamesh.train.optim import lr_schedule, make_optimizer

State = dict[str, Any]


def document_segments(tokens: jax.Array, eos: int) -> jax.Array:
    """(B, T) the document of each token of packed rows whose documents end with `eos`:
    the count of EOS tokens before it (an EOS belongs to the document it ends). The same
    boundaries `megamesh data prepare` records (each document is followed by its EOS),
    read from the tokens themselves, as torchtitan's document mask does."""
    ends = (tokens == eos).astype(jnp.int32)
    return jnp.cumsum(ends, axis=1) - ends


def document_positions(segments: jax.Array) -> jax.Array:
    """(B, T) positions that restart at 0 at every document's first token."""
    B, T = segments.shape
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    first = jnp.concatenate([jnp.ones((B, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(first, idx, 0), axis=1)


def loss_fn(params: Any, batch: jax.Array, cfg: ModelConfig, loss_chunks: int = 1,
            remat: str = "none", document_eos: int | None = None,
            restart_positions: bool = False, pipeline: Stages | None = None
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-token cross-entropy (+ MoE aux loss) of a (B, T+1) token batch; the
    fused cross-entropy over `loss_chunks` slices of the sequence (`model.loss`); `remat`:
    what each layer saves for the backward pass (a resolved policy). `document_eos`:
    attention stays within each packed document (documents end with this id);
    `restart_positions`: and positions count from 0 in each document. `pipeline`: the
    layer stacks run as pipeline stages (`model.pipeline`)."""
    tokens, targets = batch[:, :-1], batch[:, 1:]
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    segments = None
    if document_eos is not None:
        segments = document_segments(tokens, document_eos)
        if restart_positions:
            positions = document_positions(segments)
    order = context_parallel_order(T)
    if order is not None:  # load-balanced context parallelism: every token's data alike
        tokens, targets, positions = tokens[:, order], targets[:, order], positions[:, order]
        segments = None if segments is None else segments[:, order]
    if segments is not None:
        segments = constrain(segments, ("batch", "seq"))
    out = forward(params, tokens, positions, cfg=cfg, remat=remat, logits=False, segments=segments,
                  pipeline=pipeline)
    nll = cross_entropy(out.hidden, head_weight(params, cfg), targets, loss_chunks, fused=True)
    coef = cfg.moe.aux_loss_coef if cfg.moe else 0.0
    return nll + coef * out.aux, {"nll": nll, "aux": out.aux}


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point element of `tree` is finite (one boolean)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def loss_chunks(cfg: ModelConfig, tc: TrainConfig, sizes: dict[str, int], rules: Rules, *,
                platform: str) -> int:
    """How many slices of the sequence the train step's fused cross-entropy takes at a
    time: the fewest that bring one device's f32 logits per slice under
    LOSS_CHUNK_BYTES[platform] (and keep each slice split evenly over `sequence`)."""
    V, T = cfg.vocab_size, tc.seq_len
    per_micro = tc.global_batch // tc.microbatches
    dims = resolve(("batch", "seq", "vocab"), (per_micro, T, V), sizes, rules)
    b_shards, t_shards, v_shards = (math.prod(sizes[m] for m in d) for d in dims)
    logits_bytes = per_micro / b_shards * T / t_shards * V / v_shards * 4
    limit = LOSS_CHUNK_BYTES[platform]
    best = 1
    for n in range(1, T + 1):
        if T % n == 0 and (T // n) % t_shards == 0:
            best = n
            if logits_bytes / n <= limit:
                return n
    return best


# Fastest first: each saves less for the backward pass and recomputes more.
AUTO_REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")
AUTO_REMAT_HEADROOM = 0.85  # the memory model is approximate (±10% vs XLA:TPU, BENCHMARKS.md)


def device_memory_bytes(device: Any) -> float:
    """Memory one device can allocate: the accelerator's limit (memory_stats), or for
    CPU devices the host's RAM shared by the process's devices."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / max(1, len(jax.local_devices()))


def resolve_remat(cfg: ModelConfig, tc: TrainConfig, mesh: Mesh, kernels: Kernels,
                  capacity: float | None = None) -> str:
    """The run spec's remat, or for "auto" the fastest policy of AUTO_REMAT_ORDER whose
    planned memory per device (`plan.memory.estimate_memory`, this mesh and kernels) is
    within AUTO_REMAT_HEADROOM of `capacity` (default: the devices' own); "full" if none is."""
    if tc.run.remat != "auto":
        return tc.run.remat
    platform = mesh_platform(mesh)
    # a device of this process: asking another host's device for its memory can block
    cap = capacity if capacity is not None else device_memory_bytes(mesh.local_devices[0])
    spec = tc.run.replace(layout=format_layout(mesh_sizes(mesh)))
    # with pipeline stages the planner's layout is one pass (an accumulation slice)
    passes = tc.microbatches if spec.stages > 1 else 1
    w = Workload(cfg, tc.seq_len, tc.global_batch // passes, kernels=planner_kernels(kernels))
    for policy in AUTO_REMAT_ORDER:
        lay = run_layout(spec.replace(remat=policy))
        if estimate_memory(w, lay, tc.run.strategy, tpu=platform == "tpu").total <= AUTO_REMAT_HEADROOM * cap:
            return policy
    return "full"


def pipeline_stages(cfg: ModelConfig, tc: TrainConfig, sizes: dict[str, int]) -> Stages | None:
    """The pipeline the step runs on a mesh with a `stage` axis (None without one); a
    ConfigError when the layers or the batch do not split as it needs."""
    P = sizes.get("stage", 1)
    if P == 1:
        return None
    M, R = tc.run.pipeline_passes, tc.run.pipeline_virtual
    for st in layer_stacks(cfg):
        if st.n_layers % (P * R):
            raise ConfigError(f"{P} pipeline stages x {R} chunks each do not split the "
                              f"{st.n_layers} layers of {cfg.name}'s {st.name!r} stack evenly: "
                              f"use a stage count (x pipeline_virtual) that divides {st.n_layers}")
    rows = tc.global_batch // tc.microbatches
    if rows % M:
        raise ConfigError(f"pipeline_microbatches {M} does not divide the {rows} sequences of a "
                          f"pass (global batch {tc.global_batch} / {tc.microbatches} accumulation "
                          f"microbatches)")
    if R > 1 and M < P:
        raise ConfigError(f"the circular schedule (pipeline_virtual {R}) needs "
                          f"pipeline_microbatches >= stages: {M} < {P}")
    return Stages(P, M, R)


@dataclass(frozen=True)
class TrainStep:
    """The jitted step and everything needed to feed it."""

    fn: Any  # jitted (state, batch) -> (state, metrics); donates state
    init: Any  # jitted (key) -> state, created sharded
    state_shardings: Any
    batch_sharding: NamedSharding
    mesh: Mesh
    schedule: optax.Schedule
    rules: Rules  # the sharding rules the step was built with (`train_rules`)
    remat: str  # the remat policy the step runs ("auto" resolved)
    kernels: Kernels  # the attention / MoE / matmul implementations (`model.backend`)
    loss_chunks: int = 1  # slices of the sequence the cross-entropy takes at a time
    document_eos: int | None = None  # document masking: documents end with this id
    pipeline: Stages | None = None  # the layer stacks' pipeline stages (`pipeline_stages`)

    def abstract_state(self) -> Any:
        """ShapeDtypeStructs (with shardings) of the state: for restore and AOT compile."""
        shapes = jax.eval_shape(self.init, jax.random.key(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)


def _state_shardings(opt_state_shape: Any, params_shardings: Any, params_def: Any,
                     replicated: NamedSharding) -> Any:
    """Optimizer-state subtrees shaped like the params get the params' shardings."""
    return jax.tree.map(
        lambda node: params_shardings if jax.tree.structure(node) == params_def else replicated,
        opt_state_shape, is_leaf=lambda node: jax.tree.structure(node) == params_def)


def build_train_step(cfg: ModelConfig, tc: TrainConfig, mesh: Mesh, *,
                     hbm_bytes: float | None = None, eos_id: int = 0) -> TrainStep:
    """The train step on `mesh`. `hbm_bytes`: per-device memory for remat "auto" (default:
    the devices' own; `megamesh compile` passes the target chip's). `eos_id`: the id that
    ends each packed document, for document masking (`train.config.document_mask`)."""
    kernels = dataclasses.replace(mesh_kernels(mesh, tc.run.kernels), precision=tc.run.precision)
    remat = resolve_remat(cfg, tc, mesh, kernels, hbm_bytes)
    # the strategy's rules, vocab-parallel where that moves fewer bytes
    sizes = mesh_sizes(mesh)
    rules = train_rules(tc.run.strategy, sizes, vocab=cfg.vocab_size,
                        global_batch=tc.global_batch, microbatches=tc.microbatches,
                        seq_len=tc.seq_len)
    opt = make_optimizer(cfg, tc)
    schedule = lr_schedule(tc)
    replicated = NamedSharding(mesh, PartitionSpec())
    p_shard = param_shardings(cfg, mesh, rules)

    def init(key: jax.Array) -> State:
        params = init_params(cfg, key)
        return {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32),
                "bad_steps": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32)}

    shapes = jax.eval_shape(init, jax.random.key(0))
    params_def = jax.tree.structure(shapes["params"])
    state_shardings = {
        "params": p_shard,
        "opt_state": _state_shardings(shapes["opt_state"], p_shard, params_def, replicated),
        "step": replicated, "bad_steps": replicated, "skipped": replicated,
    }
    batch_shape = (tc.global_batch, tc.seq_len + 1)
    batch_sharding = data_sharding(mesh, rules, batch_shape)
    micro_sharding = data_sharding(mesh, rules, (tc.global_batch // tc.microbatches, tc.seq_len + 1))
    chunks = loss_chunks(cfg, tc, sizes, rules, platform=mesh_platform(mesh))
    doc_eos = eos_id if document_mask(tc) else None
    pipeline = pipeline_stages(cfg, tc, sizes)
    grad_fn = jax.value_and_grad(functools.partial(
        loss_fn, loss_chunks=chunks, remat=remat, document_eos=doc_eos,
        restart_positions=tc.data.document_positions, pipeline=pipeline), has_aux=True)

    def step(state: State, batch: jax.Array) -> tuple[State, dict[str, jax.Array]]:
        params = state["params"]
        with activation_sharding(mesh, rules, kernels):
            if tc.microbatches == 1:
                (loss, parts), grads = grad_fn(params, batch, cfg)
            else:
                micro = batch.reshape(tc.microbatches, -1, batch.shape[-1])

                def accumulate(carry, mb):
                    mb = jax.lax.with_sharding_constraint(mb, micro_sharding)
                    (mb_loss, pt), g = grad_fn(params, mb, cfg)
                    # each microbatch's gradient is reduced to the parameters' own
                    # (ZeRO) layout before it is added: the running sum is kept sharded,
                    # never gathered (XLA kept the tables' f32 sums whole otherwise)
                    g = jax.lax.with_sharding_constraint(g, p_shard)
                    return jax.tree.map(jnp.add, carry, (mb_loss, pt, g)), None

                zeros = (jnp.zeros((), jnp.float32), {"nll": jnp.zeros(()), "aux": jnp.zeros(())},
                         jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params),
                                                          p_shard))
                (loss, parts, grads), _ = jax.lax.scan(accumulate, zeros, micro)
                loss, parts, grads = jax.tree.map(lambda x: x / tc.microbatches, (loss, parts, grads))
        grad_norm = optax.tree.norm(grads)
        updates, new_opt = opt.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # the update is kept only if everything it produces is finite: a finite gradient
        # can still overflow a parameter or a moment (a corrupted batch, a huge step)
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(new_params)
                  & all_finite(new_opt))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {
            "params": keep(new_params, params),
            "opt_state": keep(new_opt, state["opt_state"]),
            "step": state["step"] + 1,
            "bad_steps": jnp.where(finite, 0, state["bad_steps"] + 1),
            "skipped": state["skipped"] + jnp.where(finite, 0, 1),
        }
        metrics = {"loss": loss, "nll": parts["nll"], "aux": parts["aux"], "grad_norm": grad_norm,
                   "lr": schedule(state["step"]), "finite": finite,
                   "bad_steps": new_state["bad_steps"], "skipped": new_state["skipped"]}
        return new_state, metrics

    fn = jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
    init_fn = jax.jit(init, out_shardings=state_shardings)
    return TrainStep(fn=fn, init=init_fn, state_shardings=state_shardings,
                     batch_sharding=batch_sharding, mesh=mesh, schedule=schedule, rules=rules,
                     remat=remat, kernels=kernels, loss_chunks=chunks, document_eos=doc_eos,
                     pipeline=pipeline)


def build_eval_step(cfg: ModelConfig, tc: TrainConfig, ts: TrainStep) -> Any:
    """Jitted validation loss (mean nll) of one (B, T+1) batch, on the train step's shardings."""

    def ev(params: Any, batch: jax.Array) -> jax.Array:
        with activation_sharding(ts.mesh, ts.rules, ts.kernels):
            return loss_fn(params, batch, cfg, ts.loss_chunks, document_eos=ts.document_eos,
                           restart_positions=tc.data.document_positions)[1]["nll"]

    return jax.jit(ev, in_shardings=(ts.state_shardings["params"], ts.batch_sharding))
