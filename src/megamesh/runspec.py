"""The run spec: how one run of a model is laid out and executed on its devices.

One typed structure, the contract between the layers: `megamesh plan` chooses it (and
writes it as `run_spec` in `--json`, with the model, target, sequence length and batch:
a `PlanFile`), `megamesh compile` proves it, `megamesh train` runs it (`--plan FILE`, or
its flags `--mesh`, `--remat`, `--accum`, `--kernels`), `megamesh launch` writes the
manifests that run it. The model (`config.ModelConfig`) says what the network is; the run
spec says how it runs. Pure Python: plan and fleet import it.

Pipeline stages are the layout's `stage` axis (`stage=4,fsdp=64`), with
`pipeline_microbatches` and `pipeline_virtual` saying how the step runs them
(`model.pipeline`). Some of what the planner can choose megamesh's train step does not
run yet (optimizer state in host memory): `planner_only()` names it and
`check_runnable()` refuses such a spec with a clear error before anything starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from megamesh.errors import ConfigError
from megamesh.settings import build, require, to_dict
from megamesh.sharding.logical import STRATEGIES, format_layout, parse_layout

# Remat (activation checkpointing) policies, the one list (`model.transformer.REMAT`
# implements each; the planner searches SEARCHED_REMATS).
# "auto": the train step picks the fastest of none, dots_no_batch, dots, full that the
# planner's memory model says fits the device (`train.step.resolve_remat`).
# "offload": MaxText's v6e recipe: each layer's input and attention projections go to
# host memory, the rest is recomputed.
REMAT_POLICIES = ("auto", "none", "dots", "dots_no_batch", "full", "offload")
SEARCHED_REMATS = ("none", "dots_no_batch", "dots", "full")  # fastest first
PRECISIONS = ("bf16", "fp8")  # the layers' matmul precision (fp8: `model.quant`)


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Mesh layout, sharding strategy, remat, microbatches, kernels and precision."""

    layout: str = ""  # mesh axes, e.g. "data=2,fsdp=4"; "" = every device on fsdp
    strategy: str = "fsdp"  # sharding rules (`sharding.logical.STRATEGIES`)
    remat: str = "auto"
    microbatches: int = 1  # gradient accumulation: the global batch in this many slices
    # attention / MoE / matmul implementations: "auto" (the platform's, `model.backend`)
    # or overrides such as "attention=blockwise,moe=einsum"
    kernels: str = "auto"
    precision: str = "bf16"
    # With a `stage` axis in the layout: microbatches per pipeline pass (0: as many as
    # stages; each gradient-accumulation slice is one pass) and chunks per stage (1: GPipe,
    # > 1: the circular schedule)
    pipeline_microbatches: int = 0
    pipeline_virtual: int = 1
    # Planner only (the train step refuses it, `check_runnable`):
    offload_optimizer: bool = False  # AdamW moments in host memory

    def __post_init__(self) -> None:
        if self.layout:
            parse_layout(self.layout)
        require(self.strategy in STRATEGIES, "strategy", self.strategy, f"one of {', '.join(STRATEGIES)}")
        require(self.remat in REMAT_POLICIES, "remat", self.remat, f"one of {', '.join(REMAT_POLICIES)}")
        require(isinstance(self.microbatches, int) and self.microbatches >= 1, "microbatches",
                self.microbatches, "a positive integer")
        require(self.precision in PRECISIONS, "precision", self.precision, f"one of {', '.join(PRECISIONS)}")
        require(isinstance(self.pipeline_virtual, int) and self.pipeline_virtual >= 1,
                "pipeline_virtual", self.pipeline_virtual, "a positive integer")
        require(isinstance(self.pipeline_microbatches, int) and self.pipeline_microbatches >= 0,
                "pipeline_microbatches", self.pipeline_microbatches,
                "a non-negative integer (0: as many as stages)")

    @property
    def sizes(self) -> dict[str, int] | None:
        """Mesh axis sizes, or None for the default (every device on fsdp)."""
        return parse_layout(self.layout) if self.layout else None

    @property
    def stages(self) -> int:
        """Pipeline stages: the layout's `stage` axis (1: no pipeline)."""
        return (self.sizes or {}).get("stage", 1)

    @property
    def pipeline_passes(self) -> int:
        """Microbatches per pipeline pass (`pipeline_microbatches`, 0: the stage count)."""
        return self.pipeline_microbatches or self.stages

    def replace(self, **changes: Any) -> RunSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def planner_only(self) -> list[str]:
        """What in this spec megamesh's train step does not run (empty: runnable)."""
        out = []
        if self.offload_optimizer:
            out.append("optimizer state in host memory (plan without --offload)")
        return out

    def check_runnable(self, what: str, doing: str) -> None:
        """Raise a ConfigError naming what `doing` (compile, launch, train) cannot run."""
        missing = self.planner_only()
        if missing:
            raise ConfigError(f"{what} uses {' and '.join(missing)}, which megamesh's train step "
                              f"does not run yet; {doing} needs a runnable plan")

    def train_args(self) -> list[str]:
        """The `megamesh train` flags that run this spec."""
        args = ["--mesh", self.layout] if self.layout else []
        args += ["--remat", self.remat, "--accum", str(self.microbatches)]
        if self.kernels != "auto":
            args += ["--kernels", self.kernels]
        if self.strategy != "fsdp":
            args += [f"--train.run.strategy={self.strategy}"]
        if self.precision != "bf16":
            args += ["--precision", self.precision]
        if self.stages > 1:
            args += [f"--train.run.pipeline_microbatches={self.pipeline_passes}",
                     f"--train.run.pipeline_virtual={self.pipeline_virtual}"]
        return args


@dataclass(frozen=True, kw_only=True)
class PlanFile:
    """What `megamesh plan --json` decided, as compile, train and launch read it."""

    model: str  # the preset or path the plan was made for
    target: str  # the target spec (`tpu7x:16x16x36`, `tpu7x:1000000`)
    seq_len: int
    global_batch: int
    spec: RunSpec
    mfu: float = 0.0  # the plan's prediction (for labels)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def plan_json(model: str, target: str, seq_len: int, global_batch: int, spec: RunSpec,
              mfu: float) -> dict[str, Any]:
    """The `run` entry of `megamesh plan --json`: a PlanFile as a mapping."""
    return PlanFile(model=model, target=target, seq_len=seq_len, global_batch=global_batch,
                    spec=spec, mfu=mfu).to_dict()


def read_plan(path: str | Path, flag: str = "--plan") -> PlanFile:
    """The run a `megamesh plan --json` file holds; a clear error for anything else."""
    if not Path(path).is_file():
        raise ConfigError(f"{flag} {str(path)!r} does not exist (write one with `megamesh plan ... "
                          "--json > plan.json`)")
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise ConfigError(f"{flag} {path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("run"), dict):
        raise ConfigError(f"{flag} {path}: not a `megamesh plan --json` file of a training plan "
                          "(it has no 'run' entry; write it with `megamesh plan --json`, not --serve)")
    spec = data["run"].get("spec")
    if isinstance(spec, dict) and "pipeline_stages" in spec:
        # plans written before pipelines ran: their stage count becomes the stage axis
        spec = dict(spec)
        stages = spec.pop("pipeline_stages")
        if isinstance(stages, int) and stages > 1:
            sizes = {"stage": stages, **parse_layout(spec.get("layout") or "")}
            spec["layout"] = format_layout(sizes)
        data["run"] = {**data["run"], "spec": spec}
    try:
        return build(PlanFile, data["run"], "run.")
    except ConfigError as e:
        raise ConfigError(f"{flag} {path}: {e}") from None
