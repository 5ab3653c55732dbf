"""AdamW with linear warmup then linear decay, after global-norm clipping (pretraining and
fine-tuning alike)."""

from __future__ import annotations

import functools

import jax
import ml_collections
import optax


def warmup_linear_decay(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """0 → ``peak`` over ``warmup_steps``, then linearly to 0 at ``total_steps``."""
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, peak, max(warmup_steps, 1)),
            optax.linear_schedule(peak, 0.0, max(total_steps - warmup_steps, 1)),
        ],
        [warmup_steps],
    )


def adamw(
    schedule: optax.Schedule,
    *,
    clip_norm: float,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> optax.GradientTransformation:
    """AdamW on ``schedule`` after clipping to ``clip_norm`` (none if 0). Biases and LayerNorm
    parameters (the 1-D ones) get no weight decay, as in HF's Trainer."""
    decay_mask = functools.partial(jax.tree.map, lambda p: p.ndim > 1)
    optimizer = optax.adamw(
        schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask
    )
    if clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)
    return optimizer


def make_optimizer(
    train: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The pretraining optimizer of a config's ``train`` section, and its learning rate."""
    schedule = warmup_linear_decay(train.learning_rate, train.warmup_steps, train.steps)
    tx = adamw(
        schedule,
        clip_norm=train.grad_clip_norm,
        b1=train.adam_b1,
        b2=train.adam_b2,
        eps=train.adam_eps,
        weight_decay=train.weight_decay,
    )
    return tx, schedule
