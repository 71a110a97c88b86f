"""The decoder: one forward pass for training, prefill and decode.

    forward(params, tokens, positions, cache=None, *, cfg) -> Output(logits, hidden, cache, aux)

- training: cache=None; tokens (B, T) attend causally by index (`kernels.causal_attention`,
  the platform's kernel); positions give RoPE angles.
- prefill / decode: pass a paged KV cache (`model.kvcache.KVCache`: pages and a page table
  per row); the T new tokens of each row are written at their positions and attend to
  everything cached at positions <= their own (`kernels.paged_attention`).

Glossary: B batch, T tokens, S cache length, D d_model, F d_ff, H heads, K kv heads,
Dh head dim, V vocab, L layers, E experts.

Layers of a stack share one set of stacked weights and run under `jax.lax.scan`
(optionally rematerialized). No mesh or device code: activations only name their
logical axes (`constrain`), and sharding rules are applied from outside.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from megamesh.config import ModelConfig
from megamesh.model.attention import apply_rope, rope_tables
from megamesh.model.axes import compute_weight, constrain
from megamesh.model.backend import matmul_inputs, matmul_precision, native_matmuls
from megamesh.model.kernels import causal_attention, paged_attention
from megamesh.model.kvcache import KVCache, write_kv
from megamesh.model.moe import dispatch_compute_combine, load_balancing_loss, route
from megamesh.model.pipeline import Stages, run_pipeline
from megamesh.model.quant import QuantizedWeight, fp8_dot_general
from megamesh.model.specs import layer_stacks, param_specs
from megamesh.pytree import unflatten

Params = dict[str, Any]

# Saved to host memory under remat "offload" (MaxText's names and its v6e recipes' policy):
# each layer's input and its attention projections; attention and the MLP are recomputed.
OFFLOADED = ("decoder_layer_input", "query_proj", "key_proj", "value_proj", "out_proj")
# each remat policy of `runspec.REMAT_POLICIES` ("auto" is resolved by the train step;
# tests/test_model.py checks every one has an entry): what a layer saves for the backward
# pass. No policy keeps a layer's weights in their compute layout (cast and, under FSDP,
# all-gathered): the backward gathers them again, as ZeRO-3 does and the planner counts.
# "none" saves every activation but not what layout ops produce (casts, sharding
# constraints, reshapes: cheap to redo from what is saved), and so not the weights'
# gathered copies: saving everything kept every layer's gathered weights for the whole
# step (405B on two Ironwood pods: 150 GiB per device where the plan counted 77).
_LAYOUT_OPS = frozenset({"convert_element_type", "sharding_constraint", "reshape", "transpose",
                         "broadcast_in_dim", "squeeze", "expand_dims", "copy", "copy_p"})


def _save_all_but_layout_ops(prim: Any, *_: Any, **__: Any) -> bool:
    return prim.name not in _LAYOUT_OPS


REMAT = {
    "none": _save_all_but_layout_ops,
    "full": None,  # save nothing inside a layer: recompute it all in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(OFFLOADED),
        offload_src="device", offload_dst="pinned_host"),
}


class Output(NamedTuple):
    """What `forward` returns (a pytree: None fields are empty)."""

    logits: jax.Array | None  # (B, T, V) float32; (B, 1, V) with logits_at; None with logits=False
    hidden: jax.Array  # the final normed hidden state (B, T, D) in compute dtype
    cache: KVCache | None  # the updated KV cache; None when training
    aux: jax.Array  # MoE load-balancing loss (mean over MoE layers; 0 for dense models)


# --------------------------------------------------------------------------- parameters


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Random parameters from the spec table (truncated normal, ones for norms)."""
    specs = param_specs(cfg)
    keys = jax.random.split(key, len(specs))
    flat = {}
    for k, spec in zip(keys, specs.values()):
        dtype = jnp.dtype(spec.dtype)
        if spec.init == "ones":
            flat[spec.name] = jnp.ones(spec.shape, dtype)
        elif spec.init == "zeros":
            flat[spec.name] = jnp.zeros(spec.shape, dtype)
        else:
            w = jax.random.truncated_normal(k, -2.0, 2.0, spec.shape, jnp.float32)
            flat[spec.name] = (w * (spec.std / 0.87962566)).astype(dtype)  # unit-std truncation
    return unflatten(flat)


# --------------------------------------------------------------------------- forward


def dense(x: jax.Array, w: Any, n_in: int = 1, out_dtype: Any = None, *, fp8: bool = True) -> jax.Array:
    """x (..., *in) @ w (*in, *out), contracting the last n_in dims of x with the first of w.

    Written as one 2-D matmul with output `out_dtype` (default: x's dtype), accumulated
    in float32. How depends on the backend's matmul mode (`model.backend`): `native`
    (TPU, GPU) asks the unit for the output dtype directly, so a bf16 layer's cotangent
    and both of its backward GEMMs stay bf16 (the MXU / tensor cores accumulate in f32
    anyway); `f32` (XLA:CPU) multiplies f32 copies of the operands and casts: measured
    there (BENCHMARKS.md), the weight gradient of a dot with several contracting dims runs
    ~2x slower than the same 2-D GEMM, and a bf16 dot ~2x slower than an f32 one.

    Under the run's fp8 precision (`model.quant`) the product is an FP8 one, unless
    `fp8=False` (the output head and the loss stay in the compute dtype). A serving
    `QuantizedWeight` (int8 / fp8 values) is read as such and its scales applied to the
    f32 product.
    """
    lead, K = x.shape[:x.ndim - n_in], math.prod(w.shape[:n_in])
    out = jnp.dtype(out_dtype or x.dtype)
    quantized = isinstance(w, QuantizedWeight)  # serving: int8 / fp8 values, a scale per output
    values = w.values if quantized else w
    fp8_train = not quantized and fp8 and matmul_precision() == "fp8"
    # native bf16 matmuls keep x's leading (batch, sequence) dims: merged into one, a
    # sequence split over devices (context parallelism) made XLA gather the whole
    # sequence for the backward's recompute (4x the MLP's temporaries at 32k tokens over
    # 4 devices; BENCHMARKS.md "Long context")
    keep_lead = native_matmuls() and not quantized and not fp8_train
    a, b = matmul_inputs(x.reshape(*lead, K) if keep_lead else x.reshape(-1, K),
                         values.reshape(K, -1).astype(x.dtype))
    if quantized:
        y = jnp.dot(a, b, preferred_element_type=jnp.float32) * w.scale.reshape(1, -1)
    elif fp8_train:  # training in FP8 (`model.quant`)
        y = fp8_dot_general(a, b, (((1,), (0,)), ((), ())))
    else:
        y = jnp.dot(a, b, preferred_element_type=out if native_matmuls() else jnp.float32)
    return y.reshape(*lead, *w.shape[n_in:]).astype(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, output in x's dtype. x (..., D), w (D,).

    Its gradient saves only the input (in its own dtype, bf16 in training) and one f32
    rsqrt per token; autodiff of the f32 formula saved up to four f32 copies of x (on an
    H200, 16 GiB of a 120 GiB step at 512 x 64 tokens; issue 14)."""
    return _rms_norm_fwd(x, w, eps)[0]


def _rms_norm_fwd(x: jax.Array, w: jax.Array, eps: float) -> tuple[jax.Array, Any]:
    xf = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (xf * r * w.astype(jnp.float32)).astype(x.dtype), (x, w, r)


def _rms_norm_bwd(eps: float, res: Any, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w, r = res
    n = x.astype(jnp.float32) * r  # the normalized input
    g = g.astype(jnp.float32)
    dw = jnp.sum(g * n, axis=tuple(range(x.ndim - 1)))
    gn = g * w.astype(jnp.float32)
    dx = r * (gn - n * jnp.mean(gn * n, axis=-1, keepdims=True))
    return dx.astype(x.dtype), dw.astype(w.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def swiglu(h: jax.Array, p: Params) -> jax.Array:
    gate = dense(h, p["w_gate"])  # (B,T,F)
    up = dense(h, p["w_up"])
    act = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
    return dense(act, p["w_down"])  # (B,T,D)


def moe_mlp(h: jax.Array, p: Params, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    moe = cfg.moe
    assert moe is not None
    probs, weights, experts = route(h, p["router"], moe)
    y = dispatch_compute_combine(h, weights, experts, p, moe)
    if moe.n_shared_experts:
        y = y + swiglu(h, p["shared"])
    return y, load_balancing_loss(probs, experts, moe.n_experts)


def block(x: jax.Array, p: Params, positions: jax.Array, rope: tuple[jax.Array, jax.Array],
          kv: tuple[jax.Array, jax.Array, jax.Array] | None, cfg: ModelConfig, moe: bool,
          attend_len: int | None = None, segments: jax.Array | None = None
          ) -> tuple[jax.Array, Any, jax.Array]:
    """One pre-norm layer: x + attn(norm(x)), then + mlp(norm(x)). x (B, T, D).
    `segments` (B, T), training only: attention stays within each packed document.

    kv: None (training), or (pages, page table, base) with the stack's pages
    (L*N, P, 2K, Dh), the batch's table (B, pages_per_seq) and this layer's first page
    id (layer * N); the new keys and values are written in place and the queries attend
    to positions below `attend_len` (default: the whole table).
    """
    x = checkpoint_name(x, "decoder_layer_input")  # names only matter to remat "offload"
    h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
    q = checkpoint_name(dense(h, p["attn"]["wq"]), "query_proj")  # (B,T,H,Dh)
    k = checkpoint_name(dense(h, p["attn"]["wk"]), "key_proj")  # (B,T,K,Dh)
    v = checkpoint_name(dense(h, p["attn"]["wv"]), "value_proj")
    q = constrain(apply_rope(q, *rope), ("batch", "seq", "heads", "head_dim"))
    k = constrain(apply_rope(k, *rope), ("batch", "seq", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
    if kv is None:  # training: causal by token index (positions only rotate q and k)
        out = causal_attention(q, k, v, segments)
    else:
        pages, table, base = kv
        if pages.shape[2] // 2 != k.shape[2]:  # the pages hold each kv head repeated
            r = pages.shape[2] // 2 // k.shape[2]  # (`kvcache.held_kv_heads`)
            k = constrain(jnp.repeat(k, r, axis=2), ("batch", "seq", "kv_heads", "head_dim"))
            v = constrain(jnp.repeat(v, r, axis=2), ("batch", "seq", "kv_heads", "head_dim"))
        pages = write_kv(pages, k, v, table, positions, base)
        S = table.shape[1] * pages.shape[1] if attend_len is None else attend_len
        out = paged_attention(q, pages, table, base, positions, S)
        kv = (pages, table, base)
    x = x + checkpoint_name(dense(out, p["attn"]["wo"], n_in=2), "out_proj")
    x = constrain(x, ("batch", "seq", "embed"))

    h = rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    if moe:
        y, aux = moe_mlp(h, p["moe"], cfg)
    else:
        y, aux = swiglu(h, p["mlp"]), jnp.zeros((), jnp.float32)
    x = constrain(x + y, ("batch", "seq", "embed"))
    return x, kv, aux


def embed_lookup(w: jax.Array, tokens: jax.Array, axes: tuple[str, ...], dtype: Any) -> jax.Array:
    """Rows `tokens` of the table w (V, D), in compute dtype and compute layout.

    Its gradient is summed in float32 (a scatter-add of the rows' cotangents into an f32
    table): autodiff through the cast would sum every occurrence of a token in the
    compute dtype, and in bf16 a frequent token's many small contributions round away.
    (The custom VJP is made per call: its body reads the sharding context, and jax
    caches a custom VJP's trace by function.)"""

    @jax.custom_vjp
    def lookup(w: jax.Array, tokens: jax.Array) -> jax.Array:
        return jnp.take(compute_weight(w, axes, dtype), tokens, axis=0)

    def fwd(w: jax.Array, tokens: jax.Array) -> Any:
        # w itself is kept only for its shape and dtype (a parameter: alive anyway)
        return lookup(w, tokens), (tokens, w)

    def bwd(res: Any, g: jax.Array) -> tuple[Any, None]:
        tokens, w = res
        grad = compute_weight(jnp.zeros(w.shape, jnp.float32), axes, jnp.float32)
        return grad.at[tokens].add(g.astype(jnp.float32)).astype(w.dtype), None

    lookup.defvjp(fwd, bwd)
    return lookup(w, tokens)


def _layer_weight(w: Any, sp: Any, cd: Any) -> Any:
    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(compute_weight(w.values, sp.axes[1:], w.values.dtype), w.scale)
    return compute_weight(w, sp.axes[1:], cd) if sp.matmul else w


def head_weight(params: Params, cfg: ModelConfig) -> jax.Array:
    """The output head (D, V) in compute dtype and compute layout (the embedding's
    transpose when tied)."""
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    return compute_weight(head, ("embed", "vocab"), jnp.dtype(cfg.compute_dtype))


def _layer_scan(x: jax.Array, stacked: Params, weights: Any, positions: jax.Array,
                rope: tuple[jax.Array, jax.Array], segments: jax.Array | None, *,
                cfg: ModelConfig, moe: bool, remat: str) -> tuple[jax.Array, jax.Array]:
    """Training: x through the layers of `stacked` (a scan, each layer under `remat`'s
    policy, its weights in compute layout by `weights`): (x, each layer's MoE aux)."""

    def body(x, p):
        x, _, aux = block(x, weights(p), positions, rope, None, cfg, moe, segments=segments)
        return x, aux

    body = jax.checkpoint(body, policy=REMAT[remat], prevent_cse=False)
    return jax.lax.scan(body, x, stacked)


def _pipelined_stack(x: jax.Array, stacked: Params, stack_specs: Any, weights: Any,
                     positions: jax.Array, segments: jax.Array | None, *, cfg: ModelConfig,
                     moe: bool, remat: str, pipeline: Stages) -> tuple[jax.Array, jax.Array]:
    """One layer stack as a pipeline (`model.pipeline.run_pipeline`): (x, the stack's
    MoE aux loss, a mean over the microbatches of each one's sum over the layers).

    Each stage runs its chunk of layers as the plain stack does (a scan, remat per
    layer, every layer's weights gathered inside the loop: FSDP within a stage streams
    the weights once per microbatch, as MaxText's pipeline does by default); the rotary
    tables are made per microbatch from its positions."""

    def stage_fn(chunk: Params, h: jax.Array, extra: Any) -> tuple[jax.Array, jax.Array]:
        pos, seg = extra
        h, aux = _layer_scan(h, chunk, weights, pos, rope_tables(pos, cfg), seg, cfg=cfg,
                             moe=moe, remat=remat)
        return h, jnp.sum(aux)

    def pin_weights(tree: Params) -> Params:
        # (stages, layers of a chunk, ...): the stage axis over the mesh's stage axis, the
        # rest stored as the stack is (gathered layer by layer inside the chunk's scan)
        return jax.tree.map(lambda w, sp: constrain(w, ("stage", None) + tuple(sp.axes[1:])),
                            tree, stack_specs)

    x, aux = run_pipeline(
        stage_fn, stacked, x, (positions, segments), stages=pipeline.stages,
        microbatches=pipeline.microbatches, repeats=pipeline.repeats,
        pin_state=lambda a: constrain(a, ("stage", "batch", "seq", "embed")),
        pin_weights=pin_weights, spmd_axis_name="stage")
    return x, aux / pipeline.microbatches


def forward(params: Params, tokens: jax.Array, positions: jax.Array, cache: KVCache | None = None,
            *, cfg: ModelConfig, remat: str = "none", attend_len: int | None = None,
            logits_at: jax.Array | None = None, logits: bool = True,
            segments: jax.Array | None = None, pipeline: Stages | None = None) -> Output:
    """One pass of the decoder (`Output`: logits, hidden state, cache, MoE aux loss).

    Training: cache=None; `remat` (a resolved `runspec.REMAT_POLICIES` name) says what each
    layer saves for the backward pass. With a cache: `attend_len` (static) limits attention
    to positions below it (a shape bucket: every position attended must be below it);
    `logits_at` (B,) computes the logits only at that token index of each row, (B, 1, V)
    (a prefill needs just its last prompt token's). `logits=False` skips the output head
    (a loss that applies `head_weight` itself reads `hidden`). `segments` (B, T),
    training only: the document of each token of a packed row (document masking).
    `pipeline` (training only): each layer stack runs as a pipeline over that many stages
    (`model.pipeline`; the stage axis of the mesh splits each stack's layers), the
    embedding, the head and the loss outside it.
    """
    if remat == "auto":
        raise ValueError("remat 'auto' must be resolved before the forward pass (train.step.resolve_remat)")
    cd = jnp.dtype(cfg.compute_dtype)
    specs = param_specs(cfg)
    x = embed_lookup(params["embed"], tokens, specs["embed"].axes, cd)  # (B,T,D)
    x = constrain(x, ("batch", "seq", "embed"))
    rope = rope_tables(positions, cfg)
    new_pages: dict[str, jax.Array] = {}
    aux_total = jnp.zeros((), jnp.float32)
    n_moe = 0
    for stack in layer_stacks(cfg):
        prefix = stack.name + "/"
        stack_specs = unflatten({n[len(prefix):]: s for n, s in specs.items() if n.startswith(prefix)})

        def weights(p, stack_specs=stack_specs):
            # matmul weights in compute dtype and layout (one layer at a time: FSDP gathers
            # inside the scan); norm scales stay in their parameter dtype
            # (a serving QuantizedWeight keeps its values' dtype and its scales)
            return jax.tree.map(lambda w, sp: _layer_weight(w, sp, cd), p, stack_specs,
                                is_leaf=lambda leaf: isinstance(leaf, QuantizedWeight))

        if cache is None and pipeline is not None and pipeline.stages > 1:
            x, aux = _pipelined_stack(x, params[stack.name], stack_specs, weights, positions,
                                      segments, cfg=cfg, moe=stack.moe, remat=remat,
                                      pipeline=pipeline)
        elif cache is None:
            x, aux = _layer_scan(x, params[stack.name], weights, positions, rope, segments,
                                 cfg=cfg, moe=stack.moe, remat=remat)
        else:
            # the stack's pages ride in the loop carry and are updated in place
            n_pages = cache.pages[stack.name].shape[0] // stack.n_layers

            def body(carry, layer, stack=stack, n_pages=n_pages):
                x, pages = carry
                p, i = layer
                x, (pages, _, _), aux = block(x, weights(p), positions, rope,
                                              (pages, cache.table, i * n_pages), cfg, stack.moe,
                                              attend_len)
                return (x, pages), aux

            (x, pages), aux = jax.lax.scan(
                body, (x, cache.pages[stack.name]),
                (params[stack.name], jnp.arange(stack.n_layers, dtype=jnp.int32)))
            new_pages[stack.name] = pages
        if stack.moe:
            aux_total = aux_total + jnp.sum(aux)
            n_moe += stack.n_layers

    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)  # (B,1,D)
    hidden = rms_norm(x, params["final_norm"], cfg.norm_eps)
    out = None
    if not logits:  # the loss reads it: laid out like the residual stream
        hidden = constrain(hidden, ("batch", "seq", "embed"))
    else:
        out = constrain(dense(hidden, head_weight(params, cfg), out_dtype=jnp.float32, fp8=False),
                        ("batch", "seq", "vocab"))
    new_cache = None if cache is None else KVCache(new_pages, cache.table)
    return Output(logits=out, hidden=hidden, cache=new_cache, aux=aux_total / max(n_moe, 1))
