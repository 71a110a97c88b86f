"""Model configuration: frozen dataclasses, presets by exact name, config files, overrides.

Pure Python (no jax): plan and fleet import this. Every check raises `ConfigError`
naming the offending field and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megamesh.errors import ConfigError
from megamesh.fileio import read_json_or_yaml
from megamesh.settings import apply_overrides, build, dotted, require, to_dict

DTYPES = ("float32", "bfloat16", "float16")
# Keys older megamesh versions wrote into a model config and that moved elsewhere: dropped
# when a saved config is read (`remat` is a run setting now: `runspec.RunSpec.remat`).
LEGACY_KEYS = ("remat",)


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (rope_type "llama3" in Hugging Face)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def validate(self) -> None:
        require(self.factor >= 1.0, "rope_scaling.factor", self.factor, ">= 1")
        require(
            0 < self.low_freq_factor < self.high_freq_factor,
            "rope_scaling.low_freq_factor",
            self.low_freq_factor,
            f"0 < low_freq_factor < high_freq_factor ({self.high_freq_factor})",
        )
        require(self.original_max_position > 0, "rope_scaling.original_max_position",
                 self.original_max_position, "> 0")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Mixture of experts in the MLP: softmax router, top-k, optional shared experts."""

    n_experts: int
    top_k: int
    d_ff_expert: int
    n_shared_experts: int = 0
    # The first n_dense_layers use a dense SwiGLU MLP of ModelConfig.d_ff (DeepSeek-V3: 3).
    n_dense_layers: int = 0
    # None = dropless (every routed token is computed); else tokens past
    # capacity_factor * tokens * top_k / n_experts per expert are dropped.
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.01

    def validate(self, n_layers: int) -> None:
        require(self.n_experts >= 1, "moe.n_experts", self.n_experts, ">= 1")
        require(1 <= self.top_k <= self.n_experts, "moe.top_k", self.top_k,
                 f"1 <= top_k <= n_experts ({self.n_experts})")
        require(self.d_ff_expert >= 1, "moe.d_ff_expert", self.d_ff_expert, ">= 1")
        require(self.n_shared_experts >= 0, "moe.n_shared_experts", self.n_shared_experts, ">= 0")
        require(0 <= self.n_dense_layers < n_layers, "moe.n_dense_layers", self.n_dense_layers,
                 f"0 <= n_dense_layers < n_layers ({n_layers})")
        if self.capacity_factor is not None:
            require(self.capacity_factor > 0, "moe.capacity_factor", self.capacity_factor,
                     "> 0, or null for dropless")
        require(self.aux_loss_coef >= 0, "moe.aux_loss_coef", self.aux_loss_coef, ">= 0")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only transformer: pre-norm RMSNorm, RoPE, GQA attention, SwiGLU or MoE MLP."""

    name: str = "custom"
    description: str = ""
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    moe: MoEConfig | None = None
    max_seq_len: int = 4096
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    # Published parameter counts (total, active) with their source; checked by tests.
    published_params: tuple[float, float] | None = None
    published_source: str = ""

    def __post_init__(self) -> None:
        self.validate()

    # ----- derived values -----
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def validate(self) -> None:
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            v = getattr(self, f)
            require(isinstance(v, int) and v >= 1, f, v, "a positive integer")
        if self.head_dim is None:
            require(self.d_model % self.n_heads == 0, "n_heads", self.n_heads,
                     f"a divisor of d_model ({self.d_model}), or set head_dim explicitly")
        else:
            require(self.head_dim >= 2, "head_dim", self.head_dim, ">= 2")
        require(self.resolved_head_dim % 2 == 0, "head_dim", self.resolved_head_dim,
                 "an even number (RoPE rotates pairs)")
        require(self.n_kv_heads <= self.n_heads and self.n_heads % self.n_kv_heads == 0,
                 "n_kv_heads", self.n_kv_heads, f"a divisor of n_heads ({self.n_heads})")
        require(self.norm_eps > 0, "norm_eps", self.norm_eps, "> 0")
        require(self.rope_theta > 0, "rope_theta", self.rope_theta, "> 0")
        require(self.param_dtype in DTYPES, "param_dtype", self.param_dtype, f"one of {DTYPES}")
        require(self.compute_dtype in DTYPES, "compute_dtype", self.compute_dtype, f"one of {DTYPES}")
        if self.rope_scaling is not None:
            self.rope_scaling.validate()
        if self.moe is not None:
            self.moe.validate(self.n_layers)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# --------------------------------------------------------------------------- presets

_LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position=8192)

PRESETS: dict[str, ModelConfig] = {}


def _preset(cfg: ModelConfig) -> None:
    PRESETS[cfg.name] = cfg


_preset(ModelConfig(
    name="tiny",
    description="~18M-parameter Llama-style model that trains and serves on one CPU",
    vocab_size=8192, d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=1024,
    rope_theta=10000.0, max_seq_len=1024, compute_dtype="float32",
))
_preset(ModelConfig(
    name="tiny-moe",
    description="~18M-total / ~11M-active Mixtral-style MoE (4 experts, top-2) for CPU tests",
    vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=1024,
    rope_theta=10000.0, max_seq_len=1024, compute_dtype="float32",
    moe=MoEConfig(n_experts=4, top_k=2, d_ff_expert=1024),
))
_preset(ModelConfig(
    name="llama3.1-8b",
    description="Llama 3.1 8B (Meta, 2024)",
    vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
    rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, max_seq_len=131072,
    published_params=(8.03e9, 8.03e9),
    published_source="Hugging Face meta-llama/Llama-3.1-8B model page: 8.03B params",
))
_preset(ModelConfig(
    name="llama3.1-70b",
    description="Llama 3.1 70B (Meta, 2024)",
    vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
    rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, max_seq_len=131072,
    published_params=(70.6e9, 70.6e9),
    published_source="Hugging Face meta-llama/Llama-3.1-70B model page: 70.6B params",
))
_preset(ModelConfig(
    name="llama3.1-405b",
    description="Llama 3.1 405B (Meta, 2024)",
    vocab_size=128256, d_model=16384, n_layers=126, n_heads=128, n_kv_heads=8, d_ff=53248,
    rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, max_seq_len=131072,
    published_params=(405.9e9, 405.9e9),
    published_source="Hugging Face meta-llama/Llama-3.1-405B model page: 406B params",
))
_preset(ModelConfig(
    name="llama2-70b",
    description="Llama 2 70B (Meta, 2023)",
    vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672,
    rope_theta=10000.0, max_seq_len=4096,
    published_params=(69.0e9, 69.0e9),
    published_source="Hugging Face meta-llama/Llama-2-70b-hf model page: 69B params "
    "(the paper rounds to 70B)",
))
_preset(ModelConfig(
    name="mixtral-8x7b",
    description="Mixtral 8x7B (Mistral AI, 2023): 8 experts, top-2",
    vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336,
    rope_theta=1e6, max_seq_len=32768,
    moe=MoEConfig(n_experts=8, top_k=2, d_ff_expert=14336, aux_loss_coef=0.02),
    published_params=(46.7e9, 12.9e9),
    published_source="Mistral AI, 'Mixtral of experts' (2023-12-11): 46.7B total, 12.9B active",
))
_preset(ModelConfig(
    name="deepseek-v3",
    description=(
        "DeepSeek-V3-scale MoE: 61 layers (3 dense), 256 routed experts top-8 + 1 shared, "
        "d_ff_expert 2048. Attention is a standard-GQA STAND-IN for MLA (80 heads x 128, "
        "16 KV heads), sized so total/active parameters match; its KV cache is ~7x MLA's "
        "compressed cache, and the router is softmax rather than DeepSeek's sigmoid."
    ),
    vocab_size=129280, d_model=7168, n_layers=61, n_heads=80, n_kv_heads=16, head_dim=128,
    d_ff=18432, rope_theta=10000.0, max_seq_len=163840,
    moe=MoEConfig(n_experts=256, top_k=8, d_ff_expert=2048, n_shared_experts=1,
                  n_dense_layers=3, capacity_factor=1.25, aux_loss_coef=0.0001),
    published_params=(671e9, 37e9),
    published_source="DeepSeek-V3 Technical Report (arXiv 2412.19437): 671B total, "
    "37B activated per token (excluding the 14B MTP module)",
))
_preset(ModelConfig(
    name="frontier-2t",
    description=(
        "~2T-parameter MoE a million-chip fleet could train (megamesh design, not a "
        "published model): 96 layers, d_model 12288, 136 experts top-8 + 1 shared"
    ),
    vocab_size=200064, d_model=12288, n_layers=96, n_heads=96, n_kv_heads=16, head_dim=128,
    d_ff=49152, rope_theta=500000.0, max_seq_len=131072,
    moe=MoEConfig(n_experts=136, top_k=8, d_ff_expert=4096, n_shared_experts=1,
                  n_dense_layers=2, capacity_factor=1.25, aux_loss_coef=0.0001),
))


def preset(name: str) -> ModelConfig:
    """The preset with exactly this name."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: allowed presets are {', '.join(PRESETS)}")
    return PRESETS[name]


# --------------------------------------------------------------------------- dicts, files


def config_from_dict(data: dict[str, Any], *, saved: bool = False) -> ModelConfig:
    """A ModelConfig from a mapping; `{"base": "tiny", ...}` starts from a preset.
    `saved`: a config megamesh wrote (a checkpoint's), where LEGACY_KEYS are dropped."""
    data = {k: v for k, v in data.items() if not (saved and k in LEGACY_KEYS)}
    base = data.pop("base", None)
    if base is not None:
        return apply_overrides(preset(str(base)), dotted(data, ModelConfig))
    return build(ModelConfig, data)


def load_config_file(path: str | Path) -> ModelConfig:
    """Load a model config from a .json, .yaml or .yml file."""
    p = Path(path)
    if p.is_file() and p.suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"config file {str(p)!r}: allowed suffixes are .json, .yaml, .yml")
    data = read_json_or_yaml(p, "config file")
    return config_from_dict(data)


__all__ = [
    "DTYPES",
    "LEGACY_KEYS",
    "MoEConfig",
    "ModelConfig",
    "PRESETS",
    "RopeScaling",
    "apply_overrides",
    "config_from_dict",
    "load_config_file",
    "preset",
]
