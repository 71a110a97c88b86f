"""Training configuration, one section per component (as torchtitan's job config reads):

    TrainConfig            steps, batch, sequence, seed, logging, the non-finite guard
      .run       RunSpec   mesh layout, strategy, remat, microbatches, kernels (`runspec`)
      .optimizer           AdamW and gradient clipping
      .schedule            learning-rate warmup and cosine decay
      .checkpoint          how often, how many, async
      .eval                validation cadence
      .data                tokenizer and validation split
      .diloco              decoupled islands: inner steps, outer Nesterov step, quorum

Every field is a `--train.SECTION.KEY=VALUE` override (`--train.optimizer.lr=1e-3`,
`--train.checkpoint.every=100`; top-level ones `--train.steps=500`), checked by the one
config engine (`megamesh.settings`). Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from megamesh.errors import ConfigError
from megamesh.runspec import RunSpec
from megamesh.settings import require, to_dict


def _positive_ints(obj: Any, prefix: str, names: tuple[str, ...]) -> None:
    for f in names:
        v = getattr(obj, f)
        require(isinstance(v, int) and v >= 1, prefix + f, v, "a positive integer")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW (optax) with decoupled weight decay and global-norm gradient clipping."""

    lr: float = 3e-4  # peak learning rate
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    # AdamW's first moment: float32, or bfloat16 to save 2 bytes per parameter (the second
    # moment stays float32: its small values would underflow bf16's precision)
    mu_dtype: str = "float32"

    def __post_init__(self) -> None:
        require(0 < self.lr < 1, "train.optimizer.lr", self.lr, "in (0, 1)")
        require(self.weight_decay >= 0, "train.optimizer.weight_decay", self.weight_decay, ">= 0")
        for b in ("b1", "b2"):
            require(0 <= getattr(self, b) < 1, f"train.optimizer.{b}", getattr(self, b), "in [0, 1)")
        require(self.eps > 0, "train.optimizer.eps", self.eps, "> 0")
        require(self.clip_norm > 0, "train.optimizer.clip_norm", self.clip_norm, "> 0")
        require(self.mu_dtype in ("float32", "bfloat16"), "train.optimizer.mu_dtype", self.mu_dtype,
                "one of float32, bfloat16")


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Linear warmup to the peak learning rate, then cosine decay to lr * min_lr_ratio at
    the last step."""

    warmup_steps: int = 20
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        require(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
                "train.schedule.warmup_steps", self.warmup_steps, "an integer >= 0")
        require(0 <= self.min_lr_ratio <= 1, "train.schedule.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Persistent Orbax checkpoints under OUT/checkpoints/<step>, and the in-memory tier
    (`train.memory_tier`): a copy in host RAM every `ram_every` steps that a replaced
    host fetches from a data-parallel peer."""

    every: int = 50  # steps between saves (and one at the end, and on SIGTERM)
    keep: int = 3  # the newest this many are kept
    async_save: bool = True  # write in the background while training continues
    ram_every: int = 0  # steps between in-memory checkpoints (0: no in-memory tier)
    ram_dir: str = ""  # RAM directory, process-<i> inside ("": /dev/shm/megamesh-<hash of OUT>)

    def __post_init__(self) -> None:
        _positive_ints(self, "train.checkpoint.", ("every", "keep"))
        require(isinstance(self.ram_every, int) and self.ram_every >= 0,
                "train.checkpoint.ram_every", self.ram_every, "an integer >= 0 (0: off)")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    every: int = 50  # steps between validation losses (and one at the end)
    batches: int = 4  # validation batches per evaluation

    def __post_init__(self) -> None:
        _positive_ints(self, "train.eval.", ("every", "batches"))


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    val_fraction: float = 0.02  # of the documents held out for validation
    tokenizer_vocab: int = 8192  # BPE vocabulary trained on the corpus (<= the model's vocab)
    # attention stays within each document of a packed sequence (segment ids through the
    # attention kernels); None: on when seq_len >= DOCUMENT_MASK_FROM
    document_mask: bool | None = None
    document_positions: bool = False  # with document_mask: positions restart per document

    def __post_init__(self) -> None:
        require(0 <= self.val_fraction < 0.5, "train.data.val_fraction", self.val_fraction, "in [0, 0.5)")
        require(isinstance(self.tokenizer_vocab, int) and self.tokenizer_vocab >= 300,
                "train.data.tokenizer_vocab", self.tokenizer_vocab, ">= 300 (256 bytes + merges)")
        require(self.document_mask in (None, True, False), "train.data.document_mask",
                self.document_mask, "true, false or null (on from seq_len 8192)")
        require(isinstance(self.document_positions, bool), "train.data.document_positions",
                self.document_positions, "true or false")


@dataclass(frozen=True, kw_only=True)
class DilocoConfig:
    """Decoupled training across islands (DiLoCo: Douillard et al., arXiv 2311.08105): each
    island (a separate job: one slice or pod) takes `inner_steps` AdamW steps on its share
    of the global batch, then the islands that reported average their parameters and take
    an outer Nesterov step (`train.diloco`). `islands` 0: off."""

    islands: int = 0
    inner_steps: int = 50  # AdamW steps between outer steps (H)
    outer_lr: float = 0.7  # the outer Nesterov SGD, as the DiLoCo paper's
    outer_momentum: float = 0.9
    quorum: int = 0  # islands an outer step needs (0: a majority)
    wait_s: float = 600.0  # how long a sync waits for every island before going on with a quorum

    def __post_init__(self) -> None:
        require(isinstance(self.islands, int) and self.islands >= 0, "train.diloco.islands",
                self.islands, "an integer >= 0 (0: off)")
        require(isinstance(self.inner_steps, int) and self.inner_steps >= 1,
                "train.diloco.inner_steps", self.inner_steps, "a positive integer")
        require(0 < self.outer_lr <= 2, "train.diloco.outer_lr", self.outer_lr, "in (0, 2]")
        require(0 <= self.outer_momentum < 1, "train.diloco.outer_momentum", self.outer_momentum,
                "in [0, 1)")
        require(isinstance(self.quorum, int) and 0 <= self.quorum <= max(self.islands, 0),
                "train.diloco.quorum", self.quorum, f"in [0, islands={self.islands}] (0: a majority)")
        require(self.wait_s > 0, "train.diloco.wait_s", self.wait_s, "> 0 seconds")

    @property
    def needed(self) -> int:
        """Reports an outer step needs."""
        return self.quorum or self.islands // 2 + 1


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 200
    global_batch: int = 8  # sequences per optimizer step, over all devices
    seq_len: int = 256
    seed: int = 0
    log_every: int = 10
    max_bad_steps: int = 5  # consecutive non-finite steps before training stops
    run: RunSpec = field(default_factory=RunSpec)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diloco: DilocoConfig = field(default_factory=DilocoConfig)

    def __post_init__(self) -> None:
        _positive_ints(self, "train.", ("steps", "global_batch", "seq_len", "log_every", "max_bad_steps"))
        if self.global_batch % self.run.microbatches:
            raise ConfigError(f"train.global_batch={self.global_batch} is not allowed: must be "
                              f"divisible by the microbatches ({self.run.microbatches})")
        if self.schedule.warmup_steps > self.steps:
            raise ConfigError(f"train.schedule.warmup_steps={self.schedule.warmup_steps} is not "
                              f"allowed: must be in [0, steps={self.steps}]")

    @property
    def microbatches(self) -> int:
        return self.run.microbatches

    def replace(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def default_warmup(steps: int) -> int:
    """Warmup when only the step count is given: 10% of it, at most the default 20."""
    return min(ScheduleConfig.warmup_steps, max(0, steps // 10))


DOCUMENT_MASK_FROM = 8192  # sequence length from which document masking is on by default


def document_mask(tc: TrainConfig) -> bool:
    """Whether attention stays within each packed document (train.data.document_mask;
    default: from DOCUMENT_MASK_FROM tokens, where documents are shorter than rows and
    long-context training masks them, as Llama 3 did)."""
    on = tc.data.document_mask
    return tc.seq_len >= DOCUMENT_MASK_FROM if on is None else bool(on)
