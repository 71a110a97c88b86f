"""What the cost model evaluates: a workload (model, sequence, batch, precision) on a
target with a layout (mesh axis sizes, remat policy, microbatches), and where each mesh
axis lands physically (ICI within a slice, DCN across slices)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megamesh.config import ModelConfig
from megamesh.errors import ConfigError
from megamesh.plan.target import Target
from megamesh.runspec import PRECISIONS, SEARCHED_REMATS, RunSpec
from megamesh.sharding.logical import (
    MESH_AXES,
    ZERO_AXES,
    batch_axes,
    format_layout,
    split_over_slices,
)

# "megamesh": megamesh's own step on TPU and GPU (`model.backend` defaults): flash
# attention that skips the blocks above the causal diagonal (splash, cuDNN), grouped-matmul
# MoE (ragged_dot) and the chunked loss. Over a `sequence` axis, TPU splash runs context
# parallel (gathered keys and values, offset causal masks; unbalanced: the last device
# does (2s - 1) / s^2 of the attention), GPU kernels repeat the whole attention per device.
# "fused": the same kernels with context parallelism that splits attention over the
# sequence axis, as MaxText's Pallas kernels (splash attention, megablox) and Llama 3's
# runs do: the published calibration rows.
# "xla": the reference kernels (`--kernels attention=reference,moe=einsum` in train and
# compile): attention materializes the full T x T score matrix; MoE uses GShard one-hot
# dispatch einsums with capacity padding.
KERNELS = ("megamesh", "fused", "xla")
# The run spec's kernels (`model.backend` overrides) for each planner kernel set: "fused"
# runs megamesh's own kernels (its context-parallel pacing is MaxText's, see above).
RUN_KERNELS = {"megamesh": "auto", "fused": "auto", "xla": "attention=reference,moe=einsum"}
REMATS = SEARCHED_REMATS
# Host offload. Remat "offload" is the policy of MaxText's published v6e recipes
# (remat_policy=custom with decoder_layer_input, query_proj, key_proj, value_proj and
# out_proj set to offload; everything else remat), and megamesh's step runs it
# (`megamesh.model.transformer.OFFLOADED`): each layer's input and its attention
# projections go to pinned host memory, attention and the MLP are recomputed in the
# backward pass. Offloading the optimizer state is planner only.
OFFLOAD_REMATS = ("offload",)


@dataclass(frozen=True)
class Workload:
    cfg: ModelConfig
    seq: int
    batch: int  # global batch, sequences per optimizer step
    precision: str = "bf16"
    kernels: str = "megamesh"

    def __post_init__(self) -> None:
        if self.seq < 1:
            raise ConfigError(f"--seq {self.seq} is not allowed: must be a positive integer")
        if self.batch < 1:
            raise ConfigError(f"--batch {self.batch} is not allowed: must be a positive integer")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is not allowed: one of "
                              f"{', '.join(PRECISIONS)}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"--kernel-family {self.kernels!r} is not allowed: one of {', '.join(KERNELS)}")

    @property
    def flash(self) -> bool:
        """Flash attention (no T x T scores) and grouped-matmul MoE."""
        return self.kernels != "xla"

    @property
    def tokens(self) -> int:
        return self.seq * self.batch


@dataclass(frozen=True)
class Layout:
    sizes: dict[str, int]  # mesh axis -> size (missing axes: 1)
    remat: str = "full"
    microbatches: int = 1
    offload_optimizer: bool = False  # AdamW moments live in host memory (planner only)
    placement: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False)
    # Pipeline parallelism (the mesh's `stage` axis, `model.pipeline`): `stages` groups
    # of devices, outside every other mesh axis and across DCN, each holding the layers
    # of `virtual` non-adjacent chunks (1: GPipe, > 1: the circular schedule); the
    # `microbatches` then flow through the stages. `sizes` is the mesh of one stage.
    stages: int = 1
    virtual: int = 1
    # The schedule: "gpipe" is what megamesh's step runs (GPipe, circular when virtual > 1:
    # every microbatch's activations in flight, each layer's weights gathered every
    # iteration); "1f1b" models published runs (Megatron's interleaved 1F1B, Llama 3: at
    # most `stages` microbatches in flight, a stage's weights gathered once per step and
    # kept, uneven stages allowed), for comparison only: megamesh cannot run it.
    schedule: str = "gpipe"

    def size(self, axis: str) -> int:
        return self.sizes.get(axis, 1)

    @property
    def devices(self) -> int:
        return math.prod(self.sizes.values()) * self.stages

    def stage_layers(self, n_layers: int) -> int:
        """Layers on the busiest stage: each of its `virtual` chunks rounds up (all of
        them without pipeline)."""
        return -(-n_layers // (self.stages * self.virtual)) * self.virtual

    def stage_imbalance(self, n_layers: int) -> float:
        """Busiest stage's layers over an even split (1.0 without pipeline)."""
        return self.stage_layers(n_layers) * self.stages / n_layers

    @property
    def bubble(self) -> float:
        """Idle time of the pipeline's schedule over its busy time: (P - 1) / (V M) (0
        without pipeline). `model.pipeline` runs M V + P - 1 iterations of which M V are
        busy: an idle share (P - 1) / (M V + P - 1) of the whole, this over the busy part."""
        return (self.stages - 1) / (self.virtual * self.microbatches)

    @property
    def pipeline_iterations(self) -> float:
        """Microbatches' worth of work (and of weight gathers) every stage does per pass,
        idle iterations included: M + (P - 1) / V (M without pipeline; 1 for "1f1b",
        whose stage weights are gathered once)."""
        if self.stages > 1 and self.schedule == "1f1b":
            return 1
        return self.microbatches + (self.stages - 1) / self.virtual

    @property
    def zero_ways(self) -> int:
        """Ways the parameters are stored split over the ZeRO axes (fsdp, sequence) and
        gathered for compute (`sharding.logical.ZERO_AXES`)."""
        return math.prod(self.size(a) for a in ZERO_AXES)

    @property
    def batch_ways(self) -> int:
        """Ways the batch is split (over the fsdp strategy's batch axes)."""
        return math.prod(self.size(a) for a in batch_axes("fsdp"))

    def run_spec(self, w: Workload) -> RunSpec:
        """This layout as the run spec train, compile and launch consume."""
        sizes = {**self.sizes, "stage": self.stages}
        mesh = any(n > 1 for n in sizes.values())
        piped = self.stages > 1  # one pipeline pass of `microbatches`, no accumulation around it
        return RunSpec(layout=format_layout(sizes) if mesh else "", remat=self.remat,
                       microbatches=1 if piped else self.microbatches,
                       kernels=RUN_KERNELS[w.kernels], precision=w.precision,
                       offload_optimizer=self.offload_optimizer,
                       pipeline_microbatches=self.microbatches if piped else 0,
                       pipeline_virtual=self.virtual)

    def ici(self, axis: str) -> int:
        return self.placement.get(axis, (self.size(axis), 1))[0]

    def dcn(self, axis: str) -> int:
        return self.placement.get(axis, (self.size(axis), 1))[1]

    def text(self) -> str:
        """`stage=P,` (`xV` when circular) then the other mesh axes."""
        mesh = ",".join(f"{a}={self.sizes[a]}" for a in MESH_AXES if self.sizes.get(a, 1) > 1)
        if self.stages > 1:
            pipe = f"stage={self.stages}" + (f"x{self.virtual}" if self.virtual > 1 else "")
            return pipe + ("," + mesh if mesh else "")
        return mesh or "data=1"


def run_layout(spec: RunSpec, target: Target | None = None) -> Layout:
    """The planner's Layout of a run spec: the `stage` axis taken out of the mesh as
    pipeline stages (then `microbatches` are one pass's: with gradient accumulation
    around the pipeline, estimate a workload of global batch / spec.microbatches),
    placed on `target` when given."""
    sizes = {a: n for a, n in (spec.sizes or {}).items() if n > 1}
    placement = place(sizes, target) if target is not None and sizes else {}
    stages = sizes.pop("stage", 1)
    if stages > 1:
        return Layout(sizes, remat=spec.remat, microbatches=spec.pipeline_passes,
                      placement=placement, stages=stages, virtual=spec.pipeline_virtual)
    return Layout(sizes, remat=spec.remat, microbatches=spec.microbatches, placement=placement)


def place(sizes: dict[str, int], target: Target) -> dict[str, tuple[int, int]]:
    """Split each axis into (ICI part, DCN part), exactly as `make_mesh` lays devices out
    (`sharding.logical.split_over_slices`): inner axes fill a slice first and the outer
    ones spill across slices. On TPUs only dcn, data and fsdp may span slices (FSDP over
    DCN is MaxText's dcn_fsdp_parallelism); on GPUs any data-like axis may span NVLink
    domains over the scale-out network.
    """
    if math.prod(sizes.values()) != target.devices:
        raise ConfigError(f"layout uses {math.prod(sizes.values()):,} devices; the target has "
                          f"{target.devices:,}")
    ici, dcn = split_over_slices([sizes.get(a, 1) for a in MESH_AXES], target.slice_devices)
    out = {a: (i, d) for a, i, d in zip(MESH_AXES, ici, dcn)}
    if target.is_tpu and any(out[a][1] > 1 for a in MESH_AXES if a not in ("dcn", "stage", "data", "fsdp")):
        raise ConfigError("on TPUs only the dcn, data and fsdp axes may span slices")
    return out
