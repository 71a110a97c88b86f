"""AdamW through optax: warmup + cosine decay, decoupled weight decay, global-norm clipping."""

from __future__ import annotations

import optax

from megamesh.config import ModelConfig
from megamesh.model.specs import param_specs
from megamesh.pytree import unflatten
from megamesh.train.config import TrainConfig


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    lr, sch = tc.optimizer.lr, tc.schedule
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=sch.warmup_steps,
        decay_steps=max(tc.steps, sch.warmup_steps + 1), end_value=lr * sch.min_lr_ratio)


def weight_decay_mask(cfg: ModelConfig) -> dict:
    """Decay weight matrices and embeddings, not norm scales (read off the spec table)."""
    return unflatten({n: s.init == "normal" for n, s in param_specs(cfg).items()})


def make_optimizer(cfg: ModelConfig, tc: TrainConfig) -> optax.GradientTransformation:
    o = tc.optimizer
    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(lr_schedule(tc), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    mask=weight_decay_mask(cfg), mu_dtype=o.mu_dtype),
    )
