"""The pretraining objective inside the compiled step: dynamic MLM noise, the forward pass with
the guidance statistics, and the MLM loss with the head run only where the loss is.

:class:`Objective` holds the few values the step reads of a run (the MLM noise's ids and
probability, the head spec and the AG weight schedule), built once when the run is prepared:
jitted code never sees the config, the tokenizer or the corpus.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from guided_jax import sharding
from guided_jax.data.tokenizer import MLM_TARGETS, SPECIAL_ROLES
from guided_jax.guidance import Guide, Spec, guidance_weight, token_masks
from guided_jax.kernels.segments import segment_ids
from guided_jax.model import EncoderForMLM
from guided_jax.train.masking import mask_tokens, max_predictions, mlm_loss, prediction_positions


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the compiled steps need to know of a run (static, hashable)."""

    vocab_size: int  # random replacements are drawn from [0, vocab_size)
    mask_id: int
    special_ids: tuple[int, ...]  # never selected for MLM
    pad_id: int  # keys to ignore (from the unmasked batch)
    mlm_probability: float
    spec: Spec | None  # the head spec; measured at eval even for the baseline
    token_ids: tuple[int, ...]  # ids of the spec's token-set tokens, in spec.tokens order
    guided: bool  # guidance.enabled: the AG loss is part of the training loss
    after_dropout: bool  # the AG loss sees the attention maps after dropout (reference)
    scale: float  # AG weight: scale * w(step), see guidance_weight
    stagnant_steps: int
    total_steps: int

    @classmethod
    def from_config(
        cls,
        config: ml_collections.ConfigDict,
        *,
        vocab_size: int,
        mask_id: int,
        special_ids: tuple[int, ...],
        pad_id: int,
        spec: Spec | None,
        token_ids: tuple[int, ...],
    ) -> Objective:
        """The objective of a resolved ``config``, given the ids its tokenizer assigns
        (``special_ids`` in :data:`SPECIAL_ROLES` order; ``data.mlm_targets`` picks those
        MLM never selects)."""
        skipped = MLM_TARGETS[config.data.mlm_targets]
        never_masked = tuple(
            i for r, i in zip(SPECIAL_ROLES, special_ids, strict=True) if r in skipped
        )
        return cls(
            vocab_size=vocab_size,
            mask_id=mask_id,
            special_ids=never_masked,
            pad_id=pad_id,
            mlm_probability=float(config.data.mlm_probability),
            spec=spec,
            token_ids=tuple(token_ids),
            guided=bool(config.guidance.enabled),
            after_dropout=bool(config.guidance.after_dropout),
            scale=float(config.guidance.scale),
            stagnant_steps=int(config.guidance.stagnant_steps),
            total_steps=int(config.train.steps),
        )

    def mask(self, key: jax.Array, batch: jax.Array) -> tuple[jax.Array, jax.Array]:
        """This run's dynamic MLM noise on ``[B, n]`` ids: ``(masked ids, selected)``."""
        return mask_tokens(
            key,
            batch,
            vocab_size=self.vocab_size,
            mask_id=self.mask_id,
            special_ids=self.special_ids,
            mlm_probability=self.mlm_probability,
        )

    def ag_weight(self, step: jax.Array) -> jax.Array:
        """The AG loss's weight at ``step`` (0 for the baseline)."""
        if not self.guided:
            return jnp.zeros((), jnp.float32)
        return guidance_weight(
            step,
            scale=self.scale,
            stagnant_steps=self.stagnant_steps,
            total_steps=self.total_steps,
        )


def split_batch(batch: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """A training or eval batch → ``(token ids [B, n], segment ids [B, n] or None)``.

    Batches are ``[B, n]`` token ids, or ``[B, 2, n]`` (token ids and document-start flags)
    when ``data.document_masks`` is on."""
    if batch.ndim == 2:
        return batch, None
    if batch.ndim != 3 or batch.shape[1] != 2:
        raise ValueError(
            f"a batch is [B, n] token ids or [B, 2, n] token ids and document-start flags, got "
            f"shape {batch.shape}"
        )
    return batch[:, 0], segment_ids(batch[:, 1])


def mlm_forward(
    objective: Objective,
    model: EncoderForMLM,
    batch: jax.Array,
    mask_key: jax.Array,
    *,
    guided: bool,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masks ``batch`` and runs the model: ``(mlm_loss, per-group AG losses [G], #selected)``.

    Token-set targets are read from the model's (masked) input, as the reference does; the
    attention mask comes from the unmasked batch, as the reference's tokenizer gives it. A
    ``[B, 2, n]`` batch also carries document starts (``data.document_masks``).
    """
    batch, segments = split_batch(batch)
    inputs, selected = objective.mask(mask_key, batch)
    guide = None
    if guided:
        masks = token_masks(inputs, objective.token_ids) if objective.token_ids else None
        guide = Guide(objective.spec, masks, after_dropout=objective.after_dropout)
    attend = batch != objective.pad_id
    hidden, aux = model.encode(
        inputs,
        attention_mask=attend,
        dropout_key=dropout_key,
        guide=guide,
        segment_ids=segments,
    )
    groups = aux["guidance"].sum(axis=0) if guided else jnp.zeros((0,), jnp.float32)
    mlm = selected_mlm_loss(model, hidden, batch, selected, objective.mlm_probability)
    return mlm, groups, jnp.sum(selected)


def selected_mlm_loss(
    model: EncoderForMLM,
    hidden: jax.Array,
    labels: jax.Array,
    selected: jax.Array,
    probability: float,
) -> jax.Array:
    """The MLM loss with the head run only on the selected positions.

    Positions are gathered per batch shard (all rows of one device together, so no example
    moves): as many as :func:`max_predictions` allows for a shard's tokens, about 19% of them for
    16 rows of 128 at ``probability`` 0.15, where a per-row bound would need 34%. A shard with
    more selected positions takes the head on every position instead, so the loss is exact.
    """
    rows, n = labels.shape
    groups = sharding.batch_shards(rows)
    length = rows // groups * n
    bound = max_predictions(length, probability)
    if bound >= length:
        return mlm_loss(model.logits(hidden), labels, selected)
    positions, valid, fits = prediction_positions(selected.reshape(groups, length), bound)

    def gathered() -> jax.Array:
        logits = model.logits(hidden.reshape(groups, length, -1), positions)
        return mlm_loss(
            logits, jnp.take_along_axis(labels.reshape(groups, length), positions, 1), valid
        )

    def every_position() -> jax.Array:
        # One row of each shard at a time, rematerialised: the compiled step reserves this
        # branch's memory too, and the [B, n, V] logits of all rows at once would dominate it.
        def row_sums(xs: tuple[jax.Array, ...]) -> jax.Array:
            h, row_labels, row_selected = xs
            loss = mlm_loss(model.logits(h), row_labels, row_selected)
            return loss * jnp.sum(row_selected)

        def by_row(x: jax.Array) -> jax.Array:  # [B, ...] → [rows per shard, shards, ...]
            return jnp.swapaxes(x.reshape(groups, rows // groups, *x.shape[1:]), 0, 1)

        sums = jax.lax.map(
            jax.checkpoint(row_sums), (by_row(hidden), by_row(labels), by_row(selected))
        )
        return jnp.sum(sums) / jnp.maximum(jnp.sum(selected), 1)

    return jax.lax.cond(fits, gathered, every_position)
