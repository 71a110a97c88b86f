"""HBM per device of megamesh's train step, part by part.

Exact where the step is exact: the state (fp32 master weights and AdamW's two moments)
and the gradients are summed parameter by parameter over the spec table, each sharded
by the same rules the step uses (`sharding.logical`). Activations and temporaries are
formulas per token and per layer for each remat policy, checked against what XLA
allocates for the real step (`megamesh compile`; tests/test_plan_vs_compile.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from megamesh.config import ModelConfig
from megamesh.model.backend import LOSS_CHUNK_BYTES
from megamesh.model.specs import (
    DEFAULT_PAGE,
    DTYPE_BYTES,
    kv_cache_bytes_per_token,
    kv_split_ways,
    layer_stacks,
    param_count,
    param_specs,
    serving_weight_bytes,
)
from megamesh.plan.layout import Layout, Workload
from megamesh.sharding.logical import ZERO_AXES, resolve, strategy, train_rules

ADAM_BYTES = 8  # two fp32 moments per parameter
# Bytes (or multiples) per unit of each temporary, fitted on XLA:TPU's HBM for the step
# with the TPU's kernels (splash attention, grouped MoE, native bf16 matmuls, fused chunked
# loss, document mask): `python bench/memory_fit.py` holds XLA's figures (9 cases at
# 2k tokens and the 405B pod step at 8k; 10 at 16k-128k, the plan's own 128k pick
# reported but not fitted; from bench/plan_vs_compile.py --quick / --long) and the grid
# these were chosen on (the long cases' worst error, the short ones over-predicted by at
# most 40%, every calibration row within 5 MFU points: bench/plan_calibration.py, since
# memory decides which layouts fit). A layer's working set is its un-rematerialized
# intermediates x1 (flash kernels hold no T x T probabilities: none counted), plus the
# keys and values context parallelism gathers x1; tables gathered over fsdp (not
# vocab-parallel) 2 bytes per parameter and half an f32 copy of their gradients (the
# embedding's scatter-add, the head's, summed whole before the reduce-scatter); one slice
# of f32 logits x1.5 plus the head's f32 gradient accumulator; saved activations x1.0;
# the fp32 gradient twice (the scan's stacked gradient and the update's input). Refit
# 2026-12-06 after the step kept its running gradient sum sharded: long cases within
# 10.3% (the held-out 128k pick -4.9%), short ones over-predicted up to +38.6% (v6e
# fsdp=16 dots_no_batch at 2k: XLA does not hold the tables' f32 gradients at once
# there); BENCHMARKS.md "Long context". Approximate: refit when the step changes.
COEF = {"layer_weights": 0.0, "tables": 2.0, "table_grads": 0.5, "logits": 1.5, "recompute": 1.0,
        "activations": 1.0, "grads": 2.0, "cp_kv": 1.0}


@dataclass(frozen=True)
class Memory:
    state: float  # params + optimizer moments (arguments of the step)
    grads: float
    weights_gathered: float  # layer weights all-gathered for compute, and their full grads
    activations: float  # saved for the backward pass over all layers
    working: float  # one layer's recompute / backward working set, logits and loss

    @property
    def total(self) -> float:
        return self.state + self.grads + self.weights_gathered + self.activations + self.working

    def parts(self) -> dict[str, float]:
        return {"state": self.state, "grads": self.grads, "weights_gathered": self.weights_gathered,
                "activations": self.activations, "working": self.working}


def sharded_params(w: Workload, layout: Layout, strat: str = "fsdp",
                   tpu: bool = False) -> tuple[float, float]:
    """(parameters held per device, parameters per device once fsdp is gathered).

    With `tpu`, each held shard is counted as TPU memory lays it out: the minor two
    dimensions padded to (8, 128) tiles (visible as `T(8,128)` in XLA:TPU's layouts); a
    (1, 128) slice of a kv-head weight occupies 8x its size. With pipeline stages, the
    busiest stage's share of the layers plus the embedding and head (which sit on the
    first and last stage; both counted, conservatively).
    """
    hl, gl, ho, go = _sharded_params(w.cfg, tuple(sorted(layout.sizes.items())), strat, tpu)
    frac = layout.stage_layers(w.cfg.n_layers) / w.cfg.n_layers
    return hl * frac + ho, gl * frac + go


def _tiled(shape: list[int]) -> int:
    """Elements of an f32 array in (8, 128) tiles, with XLA free to pick which two dims
    are minor (it picks the layout with the least padding)."""
    n = math.prod(shape)
    if len(shape) < 2:
        return -(-n // 128) * 128 if shape else 1
    best = None
    for i, a in enumerate(shape):
        for j, b in enumerate(shape):
            if i != j:
                cand = n // (a * b) * (-(-a // 128) * 128) * (-(-b // 8) * 8)
                best = cand if best is None else min(best, cand)
    return best


@functools.lru_cache(maxsize=4096)
def _sharded_params(cfg: ModelConfig, sizes_items: tuple, strat: str,
                    tpu: bool) -> tuple[float, float, float, float]:
    """(held, gathered) of the layer stacks' parameters, then of the others."""
    rules = strategy(strat)
    sizes = dict(sizes_items)
    stacks = tuple(st.name + "/" for st in layer_stacks(cfg))
    out = [0.0, 0.0, 0.0, 0.0]
    for s in _specs(cfg):
        dims = resolve(s.axes, s.shape, sizes, rules)
        shard = list(s.shape)
        gways = 1
        for i, d in enumerate(dims):
            for m in d:
                shard[i] //= sizes[m]
                if m not in ZERO_AXES:
                    gways *= sizes[m]
        i = 0 if s.name.startswith(stacks) else 2
        out[i] += _tiled(shard) if tpu else math.prod(shard)
        out[i + 1] += s.size / gways
    return out[0], out[1], out[2], out[3]


@functools.lru_cache(maxsize=64)
def specs_table(cfg: ModelConfig) -> dict:
    """The spec table, memoized (the search evaluates thousands of layouts of one model)."""
    return param_specs(cfg)


def _specs(cfg: ModelConfig) -> tuple:
    return tuple(specs_table(cfg).values())


def tokens_per_microbatch(w: Workload, layout: Layout) -> float:
    """Tokens one device computes per microbatch."""
    return w.tokens / layout.batch_ways / layout.size("sequence") / layout.microbatches


def layer_activation_bytes(w: Workload, layout: Layout, remat: str, moe: bool) -> float:
    """Bytes saved per token per layer for the backward pass, under a remat policy."""
    c = w.cfg
    t = layout.size("tensor")
    D, Dh = c.d_model, c.resolved_head_dim
    H, K = c.n_heads / t, max(c.n_kv_heads / t, 1)
    Tk = w.seq  # keys each query attends to (full score row in the xla kernel)
    if moe:
        m = c.moe
        assert m is not None
        # grouped MoE (flash kernels) computes each token's k copies; einsum pads to capacity
        pad = 1.0 if w.flash else (m.capacity_factor or m.n_experts / m.top_k)
        F = m.d_ff_expert * m.top_k * pad / t
        F += m.n_shared_experts * m.d_ff_expert / t
    else:
        F = c.d_ff / t
    scores = 0 if w.flash else H * Tk * 4  # f32 score row per query head
    # the residual stream between matmuls is split over tensor too (embed -> tensor)
    Dr = D / t if D % t == 0 else D
    if remat == "full":
        return 2 * Dr
    # layer input, q, k, v and the out-projection output: what remat "offload" sends to host
    attn = 2 * (Dr + H * Dh + 2 * K * Dh + Dr)
    if remat == "offload":
        return attn
    dots_nb = attn + 2 * (2 * F + Dr)  # the attention projections and the MLP matmuls
    if remat == "dots_no_batch":
        return dots_nb + 2 * Dr
    if remat == "dots":
        # the f32 score matrix is a dot output too, but XLA:TPU does not keep it (measured
        # with `megamesh compile`; BENCHMARKS.md), so it is not counted
        return dots_nb + 2 * Dr + 2 * H * Dh
    # none: every intermediate the backward pass reads; the xla kernels' bf16
    # probabilities too (flash kernels hold no T x T tensor: a row's max and sum at most)
    probs = 0 if w.flash else H * Tk * 2
    # SwiGLU keeps six MLP-wide bf16 tensors per token (both projections, the sigmoid,
    # the SiLU, their product and its copy for the down projection: counted in XLA's
    # buffers at 32k tokens, BENCHMARKS.md "Long context"): three beyond the dots
    swiglu = 2 * 3 * F
    return dots_nb + 4 * Dr * 2 + scores + probs + 2 * (2 * H * Dh + K * Dh + F) + swiglu


def context_parallel_kv_bytes(w: Workload, layout: Layout) -> float:
    """Bytes per device of one layer's keys and values gathered over the sequence axis
    for a microbatch (bf16, the whole sequence of this device's rows; 0 without context
    parallelism). The kv heads split over tensor like the query heads (repeated where
    tensor exceeds them, `model.specs.kv_split_ways`)."""
    s = layout.size("sequence")
    if s == 1:
        return 0.0
    c = w.cfg
    kv_dev = c.n_kv_heads / kv_split_ways(c.n_kv_heads, layout.size("tensor"))
    return tokens_per_microbatch(w, layout) * s * 2 * kv_dev * c.resolved_head_dim * 2


@functools.lru_cache(maxsize=4096)
def _vocab_split(strat: str, sizes_items: tuple, vocab: int, batch: int, microbatches: int,
                 seq: int) -> int:
    """How many ways the step splits the tables on vocab over fsdp (1: not vocab-parallel);
    memoized (the search asks for thousands of layouts)."""
    sizes = dict(sizes_items)
    vp = train_rules(strat, sizes, vocab=vocab, global_batch=batch, microbatches=microbatches,
                     seq_len=seq) != strategy(strat)
    return sizes.get("fsdp", 1) if vp else 1


def estimate_memory(w: Workload, layout: Layout, strat: str = "fsdp", tpu: bool = False) -> Memory:
    c = w.cfg
    held, gathered = sharded_params(w, layout, strat, tpu)
    pbytes = DTYPE_BYTES[c.param_dtype]
    state = held * (pbytes + (0 if layout.offload_optimizer else ADAM_BYTES))
    # fp32 gradients; with accumulation a second copy (the running sum and the microbatch's)
    grads = held * 4 * (2 if layout.microbatches > 1 else 1)
    specs = specs_table(c)
    tok = tokens_per_microbatch(w, layout)
    t, e = layout.size("tensor"), layout.size("expert")
    acts = 0.0
    widest_layer = 0.0
    for st in layer_stacks(c):
        # offloaded activations stay in HBM only while in flight (two layers' worth); a
        # pipeline stage keeps its layers' activations of every iteration of the pass
        # (`model.pipeline`: autodiff of the schedule, idle iterations included), or
        # under 1F1B of up to `stages` microbatches
        in_flight = 1
        if layout.stages > 1:
            in_flight = (min(layout.microbatches, layout.stages) if layout.schedule == "1f1b"
                         else layout.pipeline_iterations)
        n_layers = layout.stage_layers(st.n_layers) * in_flight
        n_saved = min(2, n_layers) if layout.remat == "offload" else n_layers
        acts += n_saved * tok * layer_activation_bytes(w, layout, layout.remat, st.moe)
        if layout.remat not in ("full", "offload"):
            # splash's residuals keep each layer's gathered keys and values
            acts += n_saved * context_parallel_kv_bytes(w, layout)
        per_layer = sum(s.size for n, s in specs.items() if n.startswith(st.name + "/")) / st.n_layers
        if st.moe and c.moe:
            per_layer = per_layer / e
        widest_layer = max(widest_layer, per_layer / t)
    # Coefficients fitted to XLA:TPU's allocation for this step (bench/plan_vs_compile.py,
    # BENCHMARKS.md "Plan vs compile"); approximate, XLA's choices vary with the layout.
    k = COEF
    # under fsdp with a small microbatch the step keeps the tables split on vocab
    # (`sharding.logical.train_rules`): never gathered, and so is the head's gradient
    split = _vocab_split(strat, tuple(sorted(layout.sizes.items())), c.vocab_size, w.batch,
                         layout.microbatches, w.seq)
    # tables gathered over fsdp (not vocab-parallel) are held whole (over tensor) while
    # used, and their f32 gradients summed whole before the reduce-scatter (the embedding's
    # scatter-add, the head's from the loss): k["table_grads"] f32 copies per table; with
    # a 128k vocabulary and no tensor split, several GiB
    table = c.vocab_size * c.d_model / t * (1 if c.tie_embeddings else 2) if split == 1 else 0.0
    weights_gathered = (widest_layer * k["layer_weights"] + table * k["tables"]
                        + table * 4 * k["table_grads"])
    if layout.stages > 1 and layout.schedule == "1f1b" and layout.zero_ways > 1:
        # 1F1B as Llama 3 ran it: the stage's weights gathered once per step and kept
        # (bf16, embedding and head included), plus one layer's gathered gradient in flight
        weights_gathered = gathered * 2 + widest_layer * k["layer_weights"]
    recompute = max(layer_activation_bytes(w, layout, "none", st.moe) for st in layer_stacks(c))
    # the fused cross-entropy holds one slice of f32 logits (and its softmax and gradient)
    # at a time, at most LOSS_CHUNK_BYTES, plus the head's f32 gradient accumulator
    logits_f32 = tok * c.vocab_size / t * 4
    logits = (min(logits_f32, LOSS_CHUNK_BYTES["tpu"]) * k["logits"]
              + c.vocab_size * c.d_model / t / split * 4)
    working = (tok * recompute * k["recompute"] + logits
               + context_parallel_kv_bytes(w, layout) * k["cp_kv"])
    acts *= k["activations"]
    grads *= k["grads"]
    return Memory(state=state, grads=grads, weights_gathered=weights_gathered, activations=acts,
                  working=working)


def decode_memory(cfg: ModelConfig, layout: Layout, batch: int, max_len: int, *,
                  weight_bytes: int = 2, tpu: bool = False, weights: str = "bf16") -> Memory:
    """HBM per device of the serving decode step: weights (serving dtype, `serve` rules;
    `weights` fp8 / int8: the layers' matmul weights at 1 byte and their scales, an even
    share on every device, `model.specs.serving_weight_bytes`), the KV cache's pages for
    `batch` rows of `max_len` tokens (pages split by kv head only: any row may own any
    page, `model.kvcache`; in the 2-byte dtype whatever the weights), and the step's logits."""

    hl, _, ho, _ = _sharded_params(cfg, tuple(sorted(layout.sizes.items())), "serve", tpu)
    held = hl + ho
    slots = batch / (layout.size("dcn") * layout.size("data") * layout.size("fsdp"))
    t = layout.size("tensor")
    kv_ways = kv_split_ways(cfg.n_kv_heads, t)
    page = DEFAULT_PAGE
    positions = (batch * -(-max_len // page) + 1) * page  # every row's pages and the scratch page
    # pages in the serving dtype (the weights')
    cache = positions * kv_cache_bytes_per_token(cfg, "float32") / 4 * weight_bytes / kv_ways
    logits = slots * cfg.vocab_size / t * 4 * 2
    # the pages are donated and updated in place (compiled for tpu7x: the step's temporaries
    # are a few MB beside them); XLA's gather path, taken on TPU for head dims that are not
    # a multiple of 128, holds gathered keys and values on top (not modelled)
    per_param = weight_bytes
    if weights != "bf16":
        per_param = serving_weight_bytes(cfg, weights) / param_count(cfg)
    return Memory(state=held * per_param, grads=0.0, weights_gathered=0.0, activations=cache,
                  working=logits)
