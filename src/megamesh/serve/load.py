"""What `megamesh serve --model X` loads: a megamesh training run (its latest good Orbax
checkpoint and the tokenizer saved next to it) or a Hugging Face directory (config.json,
*.safetensors and tokenizer.json). Weights go straight onto the serving mesh in the
serving dtype; only the parameters of a checkpoint are read, not its optimizer state.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from megamesh.config import ModelConfig, config_from_dict
from megamesh.data.tokenizer import hf_eos_ids
from megamesh.errors import ConfigError
from megamesh.model import hf
from megamesh.model.specs import param_specs
from megamesh.pytree import unflatten
from megamesh.rundir import EOS, run_dir
from megamesh.sharding.mesh import global_array
from megamesh.train.checkpoint import Checkpointer


@dataclass
class ServedModel:
    cfg: ModelConfig
    params: Any  # nested dict of arrays on the serving shardings
    tokenizer: Any  # tokenizers.Tokenizer
    eos_ids: tuple[int, ...]
    name: str  # the model id clients use
    source: str  # where it came from, for /v1/models and logs
    created: int  # unix time of the weights


def _abstract_params(cfg: ModelConfig, shardings: Any, dtype: str) -> Any:
    flat = {n: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)) for n, s in param_specs(cfg).items()}
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                        unflatten(flat), shardings)


def _tokenizer(path: Path, what: str):
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ConfigError(f"{what} has no tokenizer: {path} is missing (serving needs the "
                          "tokenizer.json the model was trained with)")
    return Tokenizer.from_file(str(path))


def load_model(spec: str, shardings_for: Any, dtype: str, name: str | None = None) -> ServedModel:
    """`shardings_for(cfg)` gives the parameter shardings on the serving mesh."""
    out = run_dir(spec)
    if out is not None:
        return _load_run(out, shardings_for, dtype, name)
    p = Path(spec)
    if p.is_dir() and hf.is_hf_dir(p):
        return _load_hf(p, shardings_for, dtype, name)
    if p.is_dir():
        raise ConfigError(f"--model {spec!r} is neither a megamesh training run (checkpoints/ and "
                          "tokenizer.json) nor a Hugging Face directory (config.json, *.safetensors)")
    raise ConfigError(f"--model {spec!r} is not a directory: serve takes a megamesh training run "
                      "(the --out of `megamesh train`) or a Hugging Face model directory")


def _load_run(out: Path, shardings_for: Any, dtype: str, name: str | None) -> ServedModel:
    ckpt = Checkpointer(out / "checkpoints", keep=1_000_000, use_async=False)

    def load(step: int) -> tuple[ModelConfig, Any]:
        cfg = config_from_dict(ckpt.read_meta(step)["model"], saved=True)
        return cfg, ckpt.restore_params(step, _abstract_params(cfg, shardings_for(cfg), dtype))

    try:
        got = ckpt.restore_newest(load)  # the newest checkpoint that verifies and reads
    finally:
        ckpt.manager.close()
    if got is None:
        raise ConfigError(f"{out / 'checkpoints'} holds no complete checkpoint yet")
    step, (cfg, params) = got
    tok = _tokenizer(out / "tokenizer.json", f"training run {out}")
    eos = tok.token_to_id(EOS)
    data_meta = out / "data" / "corpus.json"
    if data_meta.is_file():  # the id that ended the documents it trained on (a model's own EOS)
        eos = json.loads(data_meta.read_text()).get("eos_id", eos)
    created = int((out / "checkpoints" / str(step)).stat().st_mtime)
    return ServedModel(cfg, params, tok, (eos,) if eos is not None else (), name or cfg.name,
                       f"{out} (step {step})", created)


def _load_hf(path: Path, shardings_for: Any, dtype: str, name: str | None) -> ServedModel:
    tok = _tokenizer(path / "tokenizer.json", f"Hugging Face directory {path}")
    cfg, flat = hf.load_hf(path)
    shardings = shardings_for(cfg)
    # each process (of a server on several hosts) puts its own shards
    params = jax.tree.map(lambda a, sh: global_array(np.asarray(a).astype(jnp.dtype(dtype)), sh),
                          unflatten(flat), shardings)
    eos = hf_eos_ids(path)
    created = int(max((q.stat().st_mtime for q in path.glob("*.safetensors")), default=time.time()))
    return ServedModel(cfg, params, tok, tuple(eos), name or path.name, str(path), created)
