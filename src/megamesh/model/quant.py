"""Low-precision matmuls: FP8 in the train step, FP8 / int8 weights for serving.

Training (`--precision fp8`, `RunSpec.precision`): every matmul inside a decoder layer
(the attention projections, the MLP, the MoE experts) multiplies in FP8 through Qwix's
quantized-training dot (`qwix`, Google's JAX quantization library; the same op and
settings as MaxText's `fp8_full` recipe, which Google's published Ironwood FP8 runs use):

- forward: activations and weights in float8_e4m3fn; backward: the incoming gradient in
  float8_e5m2 (more range, less precision) against the e4m3 residuals of the forward;
- scaling: "current" (absmax of the tensor itself, computed in the same step, no state),
  per channel: one scale per row of the activations (per token) and per output column
  of the weight; the gradient per row of its contraction's free axis;
- accumulation in f32 inside the unit (MXU / tensor cores; XLA:CPU upcasts), output in
  the compute dtype; the f32 master weights and optimizer state are untouched: only the
  step's copies are quantized.

Why this recipe (BENCHMARKS.md "FP8" has the measurements): delayed scaling (an amax
history in the train state, as Transformer Engine's default and flax's `Fp8DotGeneralOp`)
saves the amax reduction but adds state to checkpoint and reshard and lags a changing
distribution; current scaling's extra cost is one reduction over a tensor the step reads
anyway. Per-channel scales cost the same reduction and keep an outlier channel from
crushing the rest of a tensor; measured on this project's small models, per-channel,
per-tensor and MaxText's fixed range all land within 0.04% of bf16's loss (BENCHMARKS.md).

The embedding, the output head, the loss, attention's own score and value matmuls
(kernels) and the MoE router stay in the compute dtype, as in MaxText's recipe.

Serving (`megamesh serve --weights fp8|int8`): each layer matmul weight is quantized once
at load (`quantize_params`) to a `QuantizedWeight` (int8 or float8_e4m3fn values and one
f32 scale per output channel); `dense` multiplies the activations by the values upcast in
the matmul's operand read (XLA fuses the convert into the dot's input) and scales the
output, so a decode step reads 1 byte per weight instead of 2 (weight-only: activations
stay in the compute dtype, which also serves platforms without FP8 matmul units).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from megamesh.model.specs import quantized_weights

WEIGHT_DTYPES = {"fp8": jnp.float8_e4m3fn, "int8": jnp.int8}  # serving weight formats
# FP8 scaling of the forward operands (bench/fp8_quality.py compares them): "channel"
# (absmax per row / output column, the default), "tensor" (absmax of the whole operand),
# "fixed" (MaxText's Ironwood recipes: a constant +-224 range, no reduction)
SCALINGS = ("channel", "tensor", "fixed")
_scaling = "channel"


@functools.cache
def _configs(scaling: str) -> tuple[Any, Any]:
    """Qwix's configs for the dot and the grouped (MoE) dot. MaxText's fp8_full (maxtext
    layers/quantizations.py, QwixQuantization): e4m3 forward, e5m2 gradients, absmax
    calibration, per channel (tile_size None, channelwise axes on); "tensor" turns the
    channelwise axes off (one scale per operand). Imported here, not at module load:
    Qwix pulls in flax, which a bf16 run (and the GPU bench image) does without."""
    # Qwix's quantized-training ops live in its private modules (MaxText imports them
    # the same way); the version is pinned in pyproject.toml
    from qwix._src.core.dot_general_qt import DotGeneralQtConfig
    from qwix._src.core.ragged_dot_qt import RaggedDotQtConfig

    e4, e5 = jnp.float8_e4m3fn, jnp.float8_e5m2
    per_tensor = scaling == "tensor"
    fwd = "fixed,-224,224" if scaling == "fixed" else "absmax"
    dot = DotGeneralQtConfig(
        lhs_qtype=e4, rhs_qtype=e4, dlhs_grad_qtype=e5, drhs_grad_qtype=e5,
        lhs_calibration_method=fwd, rhs_calibration_method=fwd,
        lhs_disable_channelwise_axes=per_tensor, rhs_disable_channelwise_axes=per_tensor,
        dlhs_grad_disable_channelwise_axes=per_tensor,
        drhs_grad_disable_channelwise_axes=per_tensor)
    ragged = RaggedDotQtConfig(lhs_qtype=e4, rhs_qtype=e4, dlhs_grad_qtype=e5, drhs_grad_qtype=e5)
    return dot, ragged


def fp8_dot_general(a: jax.Array, b: jax.Array, dimension_numbers: Any) -> jax.Array:
    """dot_general in FP8 (forward e4m3, gradients e5m2), in a's dtype."""
    from qwix._src.core.dot_general_qt import dot_general_qt

    return dot_general_qt(a, b, dimension_numbers, _configs(_scaling)[0])


def fp8_ragged_dot(a: jax.Array, b: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """ragged_dot (a (M, K), b (G, K, N)) in FP8 (Qwix's grouped dot: per-channel), in
    a's dtype."""
    from qwix._src.core.ragged_dot_qt import ragged_dot_qt

    return ragged_dot_qt(a, b, group_sizes, _configs(_scaling)[1])


# --------------------------------------------------------------------------- serving


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A matmul weight quantized per output channel: w ~= values * scale.

    values: int8 or float8_e4m3fn, the weight's shape (*in, *out) (stacked layers first);
    scale: float32, the weight's shape with every input dim 1 (`n_in` of them after the
    stacked dims)."""

    values: jax.Array
    scale: jax.Array

    def tree_flatten(self) -> tuple[tuple[jax.Array, jax.Array], None]:
        return (self.values, self.scale), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: tuple[jax.Array, jax.Array]) -> QuantizedWeight:
        return cls(*children)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scale.nbytes


def quantize_weight(w: jax.Array, fmt: str, in_axes: tuple[int, ...]) -> QuantizedWeight:
    """w quantized to `fmt` ("int8", "fp8") with one scale per output channel: the absmax
    over the contracted `in_axes` maps to the format's largest value (127, 448)."""
    dtype = WEIGHT_DTYPES[fmt]
    top = 127.0 if fmt == "int8" else float(jnp.finfo(dtype).max)
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=in_axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / top, 1.0).astype(jnp.float32)
    q = wf / scale
    q = jnp.clip(jnp.round(q), -127, 127) if fmt == "int8" else jnp.clip(q, -top, top)
    return QuantizedWeight(q.astype(dtype), scale)


def dequantized(w: Any, dtype: Any) -> jax.Array:
    """A weight (plain or quantized) as a dense array in `dtype` (for the grouped MoE
    kernel, which takes the experts' weights whole)."""
    if isinstance(w, QuantizedWeight):
        return (w.values.astype(jnp.float32) * w.scale).astype(dtype)
    return w.astype(dtype)


def quantized_shardings(shardings: Any, cfg: Any, fmt: str) -> Any:
    """The parameters' shardings with each weight `fmt` quantizes as a QuantizedWeight of
    shardings: the values keep the weight's, the scale the same without the contracted
    axes ("bf16": unchanged)."""
    if fmt == "bf16":
        return shardings
    if fmt not in WEIGHT_DTYPES:
        raise ValueError(f"weights {fmt!r}: one of bf16, {', '.join(WEIGHT_DTYPES)}")
    from jax.sharding import NamedSharding, PartitionSpec

    from megamesh.model.specs import param_specs
    from megamesh.pytree import flatten, unflatten

    specs, flat = param_specs(cfg), flatten(shardings)
    for name, in_axes in quantized_weights(cfg).items():
        sh = flat[name]
        spec = tuple(sh.spec) + (None,) * (len(specs[name].shape) - len(sh.spec))
        scale = PartitionSpec(*(None if i in in_axes else a for i, a in enumerate(spec)))
        flat[name] = QuantizedWeight(sh, NamedSharding(sh.mesh, scale))
    return unflatten(flat)


def _quantize_each(params: Any, cfg: Any, fmt: str, quantize: Any) -> Any:
    """`params` with each weight `quantized_weights` names replaced by
    quantize(name, weight, in_axes) ("bf16": unchanged)."""
    if fmt == "bf16":
        return params
    from megamesh.pytree import flatten, unflatten

    flat = flatten(params)
    for name, in_axes in quantized_weights(cfg).items():
        flat[name] = quantize(name, flat[name], in_axes)
    return unflatten(flat)


def quantize_params(params: Any, shardings: Any, cfg: Any, fmt: str) -> Any:
    """`params` (on `shardings`) with the layers' matmul weights quantized to `fmt`
    ("bf16": unchanged; "fp8", "int8"), on the devices where they are
    (`quantized_shardings`); each original is released as its copy is made."""
    from megamesh.pytree import flatten

    out = flatten(quantized_shardings(shardings, cfg, fmt))
    return _quantize_each(params, cfg, fmt, lambda name, w, in_axes: jax.jit(
        quantize_weight, static_argnums=(1, 2), out_shardings=out[name])(w, fmt, in_axes))


def quantize_tree(params: Any, cfg: Any, fmt: str) -> Any:
    """`params` with the layers' matmul weights quantized to `fmt` (traceable: for shapes)."""
    return _quantize_each(params, cfg, fmt, lambda name, w, in_axes: quantize_weight(w, fmt, in_axes))


def weight_bytes(params: Any) -> int:
    """Bytes of a parameter tree, quantized weights as stored (values and scales)."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(params))
