"""Parameters declared once, as data: the spec table and the counts derived from it.

Every parameter's name, shape, logical axes, dtype and initializer live in one table
built from a ModelConfig. Init, sharding, checkpoint layout, HF conversion and the
planner's memory and FLOP accounting all read this table. Pure Python: no jax here.

Layer weights are stacked along a leading "layers" axis so the forward pass can scan
them. A MoE model with `moe.n_dense_layers > 0` has two stacks: `dense_layers` (the
first k, dense MLP) then `layers` (MoE MLP).

FLOP convention (MaxText's since its PR #1988; docs/sources.md): model FLOPs per token =
2 * (active matmul parameters) forward, 6 * ... for a training step, plus attention,
with causal attention counted once (half of the full T x T score matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megamesh.config import ModelConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "int8": 1}


@dataclass(frozen=True)
class ParamSpec:
    """One parameter: where it lives in the tree, its shape and how it is sharded and made."""

    name: str  # "/"-joined path in the parameter tree, e.g. "layers/attn/wq"
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis per dimension
    dtype: str
    init: str  # "normal" (truncated, std below), "ones" or "zeros"
    std: float = 0.0
    matmul: bool = True  # its FLOPs count as a matmul (2 per parameter per token, forward)
    active_fraction: float = 1.0  # share used per token (routed experts: top_k / n_experts)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class LayerStack:
    """A run of identical layers scanned together."""

    name: str
    n_layers: int
    moe: bool


def layer_stacks(cfg: ModelConfig) -> list[LayerStack]:
    """The stacks of identical layers, in order."""
    if cfg.moe is None:
        return [LayerStack("layers", cfg.n_layers, moe=False)]
    k = cfg.moe.n_dense_layers
    stacks = [LayerStack("dense_layers", k, moe=False)] if k else []
    return stacks + [LayerStack("layers", cfg.n_layers - k, moe=True)]


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """The spec table: every parameter of the model, in a stable order."""
    D, V = cfg.d_model, cfg.vocab_size
    H, K, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    dt = cfg.param_dtype
    # Residual-branch outputs are scaled down by sqrt(2L) (GPT-2), inputs by fan-in.
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
    specs: list[ParamSpec] = [
        # A tied table is also the output head, so it starts at the head's scale.
        ParamSpec("embed", (V, D), ("vocab", "embed"), dt, "normal",
                  std=D**-0.5 if cfg.tie_embeddings else 1.0, matmul=cfg.tie_embeddings),
    ]
    for stack in layer_stacks(cfg):
        L, p = stack.n_layers, stack.name + "/"
        specs += [
            ParamSpec(p + "attn_norm", (L, D), ("layers", "norm"), dt, "ones", matmul=False),
            ParamSpec(p + "attn/wq", (L, D, H, Dh), ("layers", "embed", "heads", "head_dim"), dt,
                      "normal", std=D**-0.5),
            ParamSpec(p + "attn/wk", (L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), dt,
                      "normal", std=D**-0.5),
            ParamSpec(p + "attn/wv", (L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim"), dt,
                      "normal", std=D**-0.5),
            ParamSpec(p + "attn/wo", (L, H, Dh, D), ("layers", "heads", "head_dim", "embed"), dt,
                      "normal", std=(H * Dh) ** -0.5 * out_scale),
            ParamSpec(p + "mlp_norm", (L, D), ("layers", "norm"), dt, "ones", matmul=False),
        ]
        if not stack.moe:
            F = cfg.d_ff
            specs += _swiglu_specs(p + "mlp/", (L,), ("layers",), D, F, dt, out_scale)
        else:
            m = cfg.moe
            assert m is not None
            E, Fe = m.n_experts, m.d_ff_expert
            frac = m.top_k / E
            specs.append(ParamSpec(p + "moe/router", (L, D, E), ("layers", "embed", "router"), dt,
                                   "normal", std=D**-0.5))
            specs += [
                ParamSpec(s.name, s.shape, s.axes, s.dtype, s.init, s.std, active_fraction=frac)
                for s in _swiglu_specs(p + "moe/", (L, E), ("layers", "expert"), D, Fe, dt,
                                       out_scale)
            ]
            if m.n_shared_experts:
                specs += _swiglu_specs(p + "moe/shared/", (L,), ("layers",), D,
                                       m.n_shared_experts * Fe, dt, out_scale)
    specs.append(ParamSpec("final_norm", (D,), ("norm",), dt, "ones", matmul=False))
    if not cfg.tie_embeddings:
        specs.append(ParamSpec("lm_head", (D, V), ("embed", "vocab"), dt, "normal", std=D**-0.5))
    return {s.name: s for s in specs}


def _swiglu_specs(prefix: str, lead: tuple[int, ...], lead_axes: tuple[str, ...], D: int, F: int,
                  dt: str, out_scale: float) -> list[ParamSpec]:
    return [
        ParamSpec(prefix + "w_gate", (*lead, D, F), (*lead_axes, "embed", "mlp"), dt, "normal",
                  std=D**-0.5),
        ParamSpec(prefix + "w_up", (*lead, D, F), (*lead_axes, "embed", "mlp"), dt, "normal",
                  std=D**-0.5),
        ParamSpec(prefix + "w_down", (*lead, F, D), (*lead_axes, "mlp", "embed"), dt, "normal",
                  std=F**-0.5 * out_scale),
    ]


# --------------------------------------------------------------------------- counts


def param_count(cfg: ModelConfig) -> int:
    """Total parameters."""
    return sum(s.size for s in param_specs(cfg).values())


def active_param_count(cfg: ModelConfig) -> int:
    """Parameters used per token (routed experts count top_k of n_experts)."""
    return round(sum(s.size * s.active_fraction for s in param_specs(cfg).values()))


def matmul_param_count(cfg: ModelConfig) -> int:
    """Active parameters that take part in a matmul per token (the N of 6N)."""
    return round(sum(s.size * s.active_fraction for s in param_specs(cfg).values() if s.matmul))


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
    """Forward attention FLOPs (QK^T and AV) per token, averaged over a sequence of seq_len.

    Full attention is 4 * S * H * Dh per layer per token; causal attention counts half
    the score matrix (the convention of MaxText and docs/sources.md).
    """
    full = 4.0 * seq_len * cfg.n_heads * cfg.resolved_head_dim * cfg.n_layers
    return full / 2 if causal else full


def flops_per_token(cfg: ModelConfig, seq_len: int, kind: str = "train") -> float:
    """Model FLOPs per token.

    kind: "forward" (2N + causal attention), "train" (3x forward: 6N + 3x attention) or
    "decode" (2N + attention over a context of seq_len, no causal halving).
    """
    n = matmul_param_count(cfg)
    if kind == "forward":
        return 2.0 * n + attention_flops_per_token(cfg, seq_len)
    if kind == "train":
        return 6.0 * n + 3.0 * attention_flops_per_token(cfg, seq_len)
    if kind == "decode":
        return 2.0 * n + attention_flops_per_token(cfg, seq_len, causal=False)
    raise ValueError(f"kind={kind!r}: allowed are forward, train, decode")


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str | None = None) -> int:
    """Bytes of K and V cached per token over all layers."""
    b = DTYPE_BYTES[dtype or cfg.compute_dtype]
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.resolved_head_dim * b


def param_bytes(cfg: ModelConfig, dtype: str | None = None) -> int:
    """Bytes of all parameters in `dtype` (default: the parameter dtype)."""
    return sum(s.size * DTYPE_BYTES[dtype or s.dtype] for s in param_specs(cfg).values())


# KV cache positions per page (`model.kvcache`; vLLM's default block size): divides every
# attention bucket of the serving engine
DEFAULT_PAGE = 16
SCRATCH = 0  # the KV page that padding and idle rows write to (never handed to a request)


def held_kv_heads(n_kv_heads: int, split: int) -> int:
    """The kv heads the pages hold when the mesh splits kv heads `split` ways: the model's
    K when the split divides them (or does not fit them evenly either way: then the pages
    stay whole on every device); `split` when it is a multiple of K (more tensor-parallel
    devices than kv heads, llama3.1-405b's 8 over 16): each head then sits on split / K
    devices, repeated as the queries that read it are split (vLLM's way), so a device
    holds 1/K of the cache instead of all of it."""
    return split if split > n_kv_heads and split % n_kv_heads == 0 else n_kv_heads


def kv_split_ways(n_kv_heads: int, split: int) -> int:
    """The share of the KV cache one device holds, as 1 / this, over a `split`-way kv head
    split (`held_kv_heads`): `split` when it divides the kv heads, K when it is a multiple
    of them (each device holds one repeated head), else 1 (whole on every device)."""
    if n_kv_heads % split == 0:
        return split
    return n_kv_heads if held_kv_heads(n_kv_heads, split) != n_kv_heads else 1


def splash_block(seq: int) -> int:
    """Splash attention's tile size for a sequence (`model.kernels`, and the planner's
    FLOP count): 512 (MaxText's default sa_block_*), or the sequence rounded up to 128
    if shorter."""
    return min(512, -(-seq // 128) * 128)


# serving's --weights: the layers' matmul weights as loaded ("bf16") or quantized
# (`model.quant`); one list for serve, plan, compile and the engine
WEIGHT_FORMATS = ("bf16", "fp8", "int8")


def quantized_weights(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The parameters serving's `--weights fp8|int8` quantizes (`model.quant`), by name,
    with their contracted (input) axes: every matmul weight of a layer stack (attention
    projections, MLP, experts), not the router (a small matmul whose output picks
    experts), the embedding or the output head."""
    out = {}
    for name, sp in param_specs(cfg).items():
        if not sp.matmul or sp.axes[0] != "layers" or name.endswith("router"):
            continue
        lead = 2 if "expert" in sp.axes else 1  # the stack's layers, then the experts
        n_in = 2 if name.endswith("/wo") else 1  # wo contracts heads and head_dim
        out[name] = tuple(range(lead, lead + n_in))
    return out


def serving_weight_bytes(cfg: ModelConfig, weights: str = "bf16") -> float:
    """Bytes of the served parameters: bf16, or with `quantized_weights` at 1 byte per
    value plus an f32 scale per output channel ("fp8", "int8")."""
    total = 0.0
    quant = quantized_weights(cfg) if weights != "bf16" else {}
    for name, sp in param_specs(cfg).items():
        n = math.prod(sp.shape)
        if name in quant:
            total += n + 4 * n // math.prod(sp.shape[a] for a in quant[name])
        else:
            total += 2 * n
    return total
