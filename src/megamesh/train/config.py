"""Training configuration: one frozen dataclass, overridable as --train.KEY=VALUE."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from megamesh.errors import ConfigError

# Per-device f32 logits per slice of the train step's fused cross-entropy
# (`train.step.loss_chunks`; here so the planner, which never imports jax, reads it too).
# CPU: slices this size stay in the caches between the head's matmul, the softmax and the
# gradient's two matmuls (bench model, 8 devices: 8 and 16 MiB slices measured alike,
# 32 MiB slower). Accelerators: large enough that the per-slice re-read of the head and
# of its f32 gradient accumulator (~0.1 ms each on HBM for a 2048 x 32000 head) stays a
# few percent of the step, small enough that no (tokens, vocab) array is held whole.
LOSS_CHUNK_BYTES = {"cpu": 16 * 2**20, "gpu": 256 * 2**20, "tpu": 256 * 2**20}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 200
    global_batch: int = 8  # sequences per optimizer step, over all devices
    seq_len: int = 256
    microbatches: int = 1  # gradient accumulation: global_batch is split into this many
    lr: float = 3e-4
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at `steps`
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    # AdamW's first moment: float32, or bfloat16 to save 2 bytes per parameter (the second
    # moment stays float32: its small values would underflow bf16's precision)
    adam_mu_dtype: str = "float32"
    seed: int = 0
    strategy: str = "fsdp"
    # attention / MoE / matmul implementations: "auto" (the platform's, `model.backend`)
    # or overrides such as "attention=blockwise,moe=einsum"
    kernels: str = "auto"
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    eval_every: int = 50
    eval_batches: int = 4
    max_bad_steps: int = 5  # consecutive non-finite steps before training stops
    log_every: int = 10
    val_fraction: float = 0.02
    tokenizer_vocab: int = 8192  # BPE vocabulary trained on the corpus (<= the model's vocab)
    # Fault injection for testing the non-finite guard: comma-separated steps (0-based)
    # whose gradients are replaced by NaN.
    fault_nan_steps: str = ""

    def __post_init__(self) -> None:
        for f in ("steps", "global_batch", "seq_len", "microbatches", "checkpoint_every",
                  "keep_checkpoints", "eval_every", "max_bad_steps", "log_every", "tokenizer_vocab"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"train.{f}={v!r} is not allowed: must be a positive integer")
        if self.adam_mu_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"train.adam_mu_dtype={self.adam_mu_dtype!r} is not allowed: one of "
                              "float32, bfloat16")
        if self.global_batch % self.microbatches:
            raise ConfigError(f"train.global_batch={self.global_batch} is not allowed: must be "
                              f"divisible by train.microbatches={self.microbatches}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"train.lr={self.lr} is not allowed: must be in (0, 1)")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} is not allowed: must be "
                              f"in [0, steps={self.steps}]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} is not allowed: must be in [0, 1]")
        if not 0 <= self.val_fraction < 0.5:
            raise ConfigError(f"train.val_fraction={self.val_fraction} is not allowed: must be in [0, 0.5)")
        _ = self.nan_steps
        if self.tokenizer_vocab < 300:
            raise ConfigError(f"train.tokenizer_vocab={self.tokenizer_vocab} is not allowed: must "
                              "be >= 300 (256 bytes + merges)")

    @property
    def nan_steps(self) -> tuple[int, ...]:
        try:
            return tuple(int(s) for s in self.fault_nan_steps.split(",") if s.strip())
        except ValueError:
            raise ConfigError(f"train.fault_nan_steps={self.fault_nan_steps!r} is not allowed: "
                              "must be comma-separated integers") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_warmup(steps: int) -> int:
    """Warmup when only the step count is given: 10% of it, at most the default 20."""
    return min(TrainConfig.warmup_steps, max(0, steps // 10))
