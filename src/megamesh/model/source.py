"""Where a model comes from: a preset name, a config file, or a Hugging Face directory.

`--model` everywhere takes any of these. Pure Python (numpy only for weights): plan and
fleet resolve configs through here without jax.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megamesh.config import PRESETS, ModelConfig, apply_overrides, load_config_file, preset
from megamesh.errors import ConfigError
from megamesh.model import hf


def model_config(spec: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """The ModelConfig named by `spec`, with checked overrides applied."""
    cfg = _base_config(spec)
    return apply_overrides(cfg, overrides) if overrides else cfg


def _base_config(spec: str) -> ModelConfig:
    if spec in PRESETS:
        return preset(spec)
    p = Path(spec)
    if p.is_dir():
        if hf.is_hf_dir(p):
            return hf.config_from_hf(json.loads((p / "config.json").read_text()), name=p.name)
        raise ConfigError(f"--model {spec!r} is a directory but not a model: a Hugging Face "
                          "directory needs config.json and *.safetensors")
    if p.suffix in (".json", ".yaml", ".yml"):
        return load_config_file(p)
    raise ConfigError(f"--model {spec!r} is not a preset, config file or model directory: "
                      f"presets are {', '.join(PRESETS)}")


def load_weights(spec: str) -> dict[str, Any] | None:
    """Flat numpy parameters for a model directory; None for presets and config files."""
    if Path(spec).is_dir() and hf.is_hf_dir(spec):
        return hf.load_hf(spec)[1]
    return None
