"""Hugging Face interop: Llama- and Mixtral-architecture checkpoints (config.json + safetensors).

No download, no torch: numpy and the `safetensors` library only. Importing gives a
ModelConfig and a parameter tree in megamesh's layout (layers stacked on a leading
axis); exporting writes the layout transformers loads. Both directions go through one
name-and-transform table (`_layer_map`), so they cannot drift apart.

RoPE uses the "rotate halves" convention, as Hugging Face does, so q/k weights map
with a reshape only (no permutation).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from megamesh.config import ModelConfig, MoEConfig, RopeScaling
from megamesh.errors import ConfigError
from megamesh.model.specs import layer_stacks, param_specs

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def is_hf_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


# --------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    """A ModelConfig from a transformers config.json dict (v4 or v5 rope fields)."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"config.json architectures={arch!r} is not supported: allowed are "
                          f"{', '.join(ARCHITECTURES)}")
    for key, bad in (("attention_bias", True), ("mlp_bias", True)):
        if hf.get(key) is bad:
            raise ConfigError(f"config.json {key}=true is not supported: megamesh models have no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json hidden_act={hf['hidden_act']!r} is not supported: must be silu")
    if hf.get("sliding_window") not in (None, 0) and arch != "LlamaForCausalLM":
        raise ConfigError("config.json sliding_window is not supported: must be null")
    rope = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = None
    if rope_type == "llama3":
        src = rope if "factor" in rope else legacy
        scaling = RopeScaling(factor=float(src["factor"]), low_freq_factor=float(src["low_freq_factor"]),
                              high_freq_factor=float(src["high_freq_factor"]),
                              original_max_position=int(src["original_max_position_embeddings"]))
    elif rope_type != "default":
        raise ConfigError(f"config.json rope_type={rope_type!r} is not supported: allowed are "
                          "default, llama3")
    moe = None
    if arch == "MixtralForCausalLM":
        moe = MoEConfig(n_experts=int(hf["num_local_experts"]), top_k=int(hf["num_experts_per_tok"]),
                        d_ff_expert=int(hf["intermediate_size"]),
                        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.02)))
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    n_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * n_heads == int(hf["hidden_size"]):
        head_dim = None
    return ModelConfig(
        name=name,
        description=f"imported from Hugging Face {arch}",
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=None if head_dim is None else int(head_dim),
        d_ff=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_theta=float(theta), rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), moe=moe,
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        param_dtype="float32",
        compute_dtype="float32" if dtype == "float32" else "bfloat16",
    )


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """The transformers config.json for a megamesh config."""
    if cfg.moe is not None and (cfg.moe.n_shared_experts or cfg.moe.n_dense_layers):
        raise ConfigError("export to Hugging Face supports Mixtral-style MoE only: "
                          "moe.n_shared_experts and moe.n_dense_layers must be 0")
    if cfg.moe is not None and cfg.moe.d_ff_expert != cfg.d_ff:
        raise ConfigError(f"export to Mixtral needs moe.d_ff_expert == d_ff ({cfg.d_ff})")
    hf: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if cfg.moe else "LlamaForCausalLM"],
        "model_type": "mixtral" if cfg.moe else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "torch_dtype": dtype,
    }
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor,
                              "low_freq_factor": rs.low_freq_factor,
                              "high_freq_factor": rs.high_freq_factor,
                              "original_max_position_embeddings": rs.original_max_position}
    if cfg.moe is not None:
        hf.update(num_local_experts=cfg.moe.n_experts, num_experts_per_tok=cfg.moe.top_k,
                  router_aux_loss_coef=cfg.moe.aux_loss_coef, sliding_window=None)
    else:
        hf["mlp_bias"] = False
    return hf


# --------------------------------------------------------------------------- weights

# (megamesh name inside a layer stack, HF name inside "model.layers.{i}.", to_hf, from_hf)
Transform = Callable[[np.ndarray], np.ndarray]


def _layer_map(cfg: ModelConfig, moe: bool) -> list[tuple[str, str, Transform, Transform]]:
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim

    def proj_in(n: int) -> tuple[Transform, Transform]:  # (D, n, Dh) <-> (n*Dh, D)
        return (lambda w: w.reshape(D, n * Dh).T), (lambda w: w.T.reshape(D, n, Dh))

    def t() -> tuple[Transform, Transform]:
        return (lambda w: w.T), (lambda w: w.T)

    same: tuple[Transform, Transform] = (lambda w: w, lambda w: w)
    rows = [
        ("attn_norm", "input_layernorm.weight", *same),
        ("mlp_norm", "post_attention_layernorm.weight", *same),
        ("attn/wq", "self_attn.q_proj.weight", *proj_in(H)),
        ("attn/wk", "self_attn.k_proj.weight", *proj_in(K)),
        ("attn/wv", "self_attn.v_proj.weight", *proj_in(K)),
        ("attn/wo", "self_attn.o_proj.weight",
         lambda w: w.reshape(H * Dh, D).T, lambda w: w.T.reshape(H, Dh, D)),
    ]
    if not moe:
        rows += [("mlp/w_gate", "mlp.gate_proj.weight", *t()),
                 ("mlp/w_up", "mlp.up_proj.weight", *t()),
                 ("mlp/w_down", "mlp.down_proj.weight", *t())]
    else:
        rows.append(("moe/router", "block_sparse_moe.gate.weight", *t()))
        for ours, theirs in (("w_gate", "w1"), ("w_up", "w3"), ("w_down", "w2")):
            rows.append((f"moe/{ours}", f"block_sparse_moe.experts.{{e}}.{theirs}.weight", *t()))
    return rows


def load_hf(path: str | Path, name: str | None = None) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read a Hugging Face directory: (config, flat params {name: array}) in megamesh layout."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: most published weights are bf16)
    from safetensors.numpy import load_file

    p = Path(path)
    if not is_hf_dir(p):
        raise ConfigError(f"{str(p)!r} is not a Hugging Face model directory: it needs config.json "
                          "and *.safetensors")
    cfg = config_from_hf(json.loads((p / "config.json").read_text()), name=name or p.name)
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(p.glob("*.safetensors")):
        tensors.update(load_file(str(f)))

    def take(key: str) -> np.ndarray:
        if key not in tensors:
            raise ConfigError(f"{str(p)!r}: tensor {key!r} is missing from the safetensors files")
        return tensors.pop(key)

    flat: dict[str, np.ndarray] = {"embed": take("model.embed_tokens.weight")}
    layer = 0
    for stack in layer_stacks(cfg):
        for ours, theirs, _, from_hf in _layer_map(cfg, stack.moe):
            per_layer = []
            for i in range(layer, layer + stack.n_layers):
                pre = f"model.layers.{i}."
                if "{e}" in theirs:
                    w = np.stack([from_hf(take(pre + theirs.format(e=e)))
                                  for e in range(cfg.moe.n_experts)])  # type: ignore[union-attr]
                else:
                    w = from_hf(take(pre + theirs))
                per_layer.append(w)
            flat[f"{stack.name}/{ours}"] = np.stack(per_layer)
        layer += stack.n_layers
    flat["final_norm"] = take("model.norm.weight")
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    else:
        flat["lm_head"] = take("lm_head.weight").T
    tensors = {k: v for k, v in tensors.items() if "rotary_emb" not in k}
    if tensors:
        raise ConfigError(f"{str(p)!r}: unexpected tensors {sorted(tensors)[:3]}: "
                          "not a plain Llama/Mixtral checkpoint")
    _check_shapes(cfg, flat)
    return cfg, flat


def _check_shapes(cfg: ModelConfig, flat: dict[str, Any]) -> None:
    specs = param_specs(cfg)
    for name, spec in specs.items():
        got = tuple(flat[name].shape)
        if got != spec.shape:
            raise ConfigError(f"parameter {name!r} has shape {got}, the config needs {spec.shape}")


def save_hf(cfg: ModelConfig, flat: dict[str, Any], path: str | Path, dtype: str = "float32") -> Path:
    """Write a Hugging Face directory (config.json + model.safetensors); refuses to overwrite.

    Written to a temporary sibling and renamed into place, so a crash never leaves a
    half-written checkpoint at `path`.
    """
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    from safetensors.numpy import save_file

    out = Path(path)
    if (out.is_dir() and any(out.iterdir())) or (out.exists() and not out.is_dir()):
        raise ConfigError(f"output {str(out)!r} already exists and is not empty: choose a new path")
    if dtype not in _DTYPE_NAMES:
        raise ConfigError(f"dtype={dtype!r} is not allowed: must be one of {', '.join(_DTYPE_NAMES)}")
    _check_shapes(cfg, flat)
    np_dtype = np.dtype("bfloat16") if dtype == "bfloat16" else np.dtype(dtype)
    hf_cfg = config_to_hf(cfg, dtype)
    tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": np.asarray(flat["embed"])}
    layer = 0
    for stack in layer_stacks(cfg):
        for ours, theirs, to_hf, _ in _layer_map(cfg, stack.moe):
            w_all = np.asarray(flat[f"{stack.name}/{ours}"])
            for j in range(stack.n_layers):
                pre = f"model.layers.{layer + j}."
                if "{e}" in theirs:
                    for e in range(w_all.shape[1]):
                        tensors[pre + theirs.format(e=e)] = to_hf(w_all[j, e])
                else:
                    tensors[pre + theirs] = to_hf(w_all[j])
        layer += stack.n_layers
    tensors["model.norm.weight"] = np.asarray(flat["final_norm"])
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = np.asarray(flat["lm_head"]).T
    tensors = {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in tensors.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
