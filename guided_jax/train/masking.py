"""Dynamic RoBERTa MLM masking, drawn inside the jitted step so every step sees fresh masks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax


def mask_tokens(
    key: jax.Array,
    input_ids: jax.Array,
    *,
    vocab_size: int,
    mask_id: int,
    special_ids: Sequence[int],
    mlm_probability: float = 0.15,
) -> tuple[jax.Array, jax.Array]:
    """Returns ``(masked_ids, selected)``.

    Each non-special token is selected with ``mlm_probability``; a selected token becomes
    ``mask_id`` with probability 0.8, a uniformly random vocabulary id with 0.1, and stays as it
    is with 0.1 (HuggingFace's ``DataCollatorForLanguageModeling``). ``selected`` marks the
    positions that carry the MLM loss; the labels are the original ``input_ids``.
    """
    select_key, mask_key, random_key, word_key = jax.random.split(key, 4)
    special = jnp.isin(input_ids, jnp.asarray(tuple(special_ids), dtype=input_ids.dtype))
    selected = jax.random.bernoulli(select_key, mlm_probability, input_ids.shape) & ~special
    to_mask = selected & jax.random.bernoulli(mask_key, 0.8, input_ids.shape)
    to_random = selected & ~to_mask & jax.random.bernoulli(random_key, 0.5, input_ids.shape)
    random_words = jax.random.randint(word_key, input_ids.shape, 0, vocab_size, input_ids.dtype)
    masked = jnp.where(to_mask, jnp.asarray(mask_id, input_ids.dtype), input_ids)
    masked = jnp.where(to_random, random_words, masked)
    return masked, selected


def mlm_loss(logits: jax.Array, labels: jax.Array, selected: jax.Array) -> jax.Array:
    """Mean cross-entropy over the selected positions (0 when none is selected)."""
    token_nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    weights = selected.astype(jnp.float32)
    return jnp.sum(token_nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def max_predictions(length: int, probability: float) -> int:
    """How many of ``length`` positions (a row, or a shard's rows laid end to end) the MLM head is
    sized for: the mean plus five standard deviations of the binomial count, rounded up to a
    multiple of 4 (at most ``length``). A count exceeds it about once in 3 million;
    :func:`prediction_positions` says when, and the loss then takes the head on every position."""
    mean = length * probability
    bound = mean + 5.0 * math.sqrt(mean * (1.0 - probability)) + 1.0
    return min(length, 4 * math.ceil(bound / 4))


def prediction_positions(
    selected: jax.Array, max_per_row: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(positions [B, K], valid [B, K], fits)``: each row's selected positions first (in order),
    padded with unselected ones that ``valid`` marks off; ``fits`` is False when some row has more
    than ``K = max_per_row`` selected positions."""
    order = jnp.argsort(~selected, axis=1, stable=True)[:, :max_per_row].astype(jnp.int32)
    valid = jnp.take_along_axis(selected, order, axis=1)
    fits = jnp.all(jnp.sum(selected, axis=1) <= max_per_row)
    return order, valid, fits
