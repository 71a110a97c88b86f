"""A training run on disk, as `megamesh train` writes it and `megamesh serve` reads it.

    OUT/tokenizer.json          the BPE tokenizer (EOS separates documents)
    OUT/data/                   the packed corpus (train.data)
    OUT/checkpoints/<step>/     Orbax checkpoints: {state, meta}
    OUT/metrics.jsonl, OUT/tensorboard/

Checkpoints with Orbax: async saves, keep-last-K, atomic commits, restore onto any mesh.
Layout of one: OUT/checkpoints/<step>/{state, meta}. `state` is the train state (params,
optimizer state, counters) as sharded arrays; `meta` is JSON: the model and train
configs, the data position (batches consumed) and the corpus fingerprint.

Orbax writes each step into a temporary directory and renames it into place only when
every array is on disk, so a save interrupted at any moment (SIGKILL included) leaves
no directory that `latest_step` would pick: restore falls back to the previous good
checkpoint. Restoring takes target shardings, so a checkpoint written on one mesh or
device count restores onto another (Orbax reshards).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from tokenizers import Tokenizer

from megamesh.config import LEGACY_KEYS
from megamesh.errors import MegameshError

EOS = "<|endoftext|>"  # the end-of-text token: separates documents, ends generation
TOKENIZER = "tokenizer.json"
CHECKPOINTS = "checkpoints"


def load_tokenizer(path: str | Path):
    """A run's tokenizer (`tokenizers.Tokenizer`)."""
    return Tokenizer.from_file(str(path))


def run_dir(spec: str | Path) -> Path | None:
    """The training run directory `spec` names (OUT or OUT/checkpoints), if it is one."""
    p = Path(spec)
    for cand in (p, p.parent):
        if (cand / CHECKPOINTS).is_dir() and (cand / TOKENIZER).is_file():
            return cand
    return None


class CheckpointMismatch(MegameshError):
    """The checkpoint is of a different model than the one asked for."""


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int, use_async: bool = True):
        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                 enable_async_checkpointing=use_async,
                                                 create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any], *, wait: bool = False) -> float:
        """Start saving (async unless `wait`); returns the seconds the caller was blocked."""
        t0 = time.perf_counter()
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)
        if wait:
            self.manager.wait_until_finished()
        return time.perf_counter() - t0

    def read_meta(self, step: int) -> dict[str, Any]:
        ocp = self._ocp
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore onto the shardings in `abstract_state` (ShapeDtypeStructs with .sharding)."""
        ocp = self._ocp
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the model parameters of a checkpoint (no optimizer state), cast to the
        dtypes and placed on the shardings of `abstract_params` (serving)."""
        ocp = self._ocp
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype, global_shape=a.shape),
            abstract_params)
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args},
            partial_restore=True)))
        return out["state"]["params"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_same_model(saved: dict[str, Any], wanted: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose model differs in any shape-defining field."""
    # names and the compute dtype do not shape the weights; LEGACY_KEYS were run settings
    ignore = {"name", "description", "compute_dtype", "published_params", "published_source",
              *LEGACY_KEYS}
    diff = sorted(k for k in set(saved) | set(wanted)
                  if k not in ignore and saved.get(k) != wanted.get(k))
    if diff:
        k = diff[0]
        raise CheckpointMismatch(
            f"checkpoint in {where} is of a different model: {k}={saved.get(k)!r} there, "
            f"{wanted.get(k)!r} asked for (use the same --model, or a new --out)")
