"""The AG loss without dense targets, and the AG weight schedule.

The reference loss is, for every guided layer and every pattern group g of k_g heads,
``mean((A[:, heads_g] - P_g) ** 2)`` over all ``B * k_g * n * n`` entries, summed over groups
and layers. We never build the dense targets P. Every built-in pattern is a 0/1 predicate on
(query, key) that is cheap to evaluate where it is needed (an iota comparison for the
positional patterns, a per-example key mask for token sets), so each entry contributes
``(A - 1)^2`` where the predicate holds and ``A^2`` elsewhere: one pass over the guided heads'
probabilities and no extra ``n x n`` memory. Registered patterns' targets are constants, and
each entry contributes ``(A - P)^2`` against them.

We do not use the expansion ``sum A^2 - 2 sum A*P + sum P^2`` here: in float32 it cancels
catastrophically once heads follow their pattern closely (relative error above 1 for losses
near 1e-4), which is exactly where training drives them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from guided_jax.guidance.patterns import pattern_target
from guided_jax.guidance.spec import HeadSpec, PatternGroup, Spec


def token_masks(input_ids: jax.Array, token_ids: Sequence[int]) -> jax.Array:
    """``[T, B, n]`` float mask of where each token-set group's token occurs."""
    ids = jnp.asarray(token_ids, dtype=input_ids.dtype).reshape(-1, 1, 1)
    return (input_ids[None] == ids).astype(jnp.float32)


def target_predicate(group: PatternGroup, n: int, mask: jax.Array | None = None) -> jax.Array:
    """Where ``group``'s target is 1: ``[n, n]`` for positional patterns (``next`` has no 1 in
    its last row, ``prev`` none in its first) and registered ones (where the target is not 0),
    ``[B, 1, 1, n]`` for a token set given its ``[B, n]`` token mask."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
    if group.pattern == "self":
        return cols == rows
    if group.pattern == "next":
        return cols == rows + 1
    if group.pattern == "prev":
        return cols == rows - 1
    if group.pattern == "first":
        return cols == 0
    if group.is_user:
        return jnp.asarray(pattern_target(group.pattern, n) != 0)
    if mask is None:
        raise ValueError(f"guidance group {group.name} needs token masks (input ids)")
    return (mask > 0)[:, None, None, :]


def head_square_sums(probs: jax.Array, spec: HeadSpec, masks: jax.Array | None = None) -> jax.Array:
    """Each head's ``Σ (A - P)²`` over batch, queries and keys, shape ``[H]`` (0 for unguided
    heads), without building the dense targets of built-in patterns.

    ``probs`` is ``[B, H, n, n]`` with the guided heads first, in spec order; heads past
    ``spec.num_guided_heads`` are weighted out rather than sliced off, so an array sharded over
    heads is reduced where each head lives. ``masks`` is ``token_masks(...)`` when the spec has
    token-set groups.
    """
    probs = probs.astype(jnp.float32)
    batch, heads, n, n_keys = probs.shape
    if n != n_keys:
        raise ValueError(f"attention must be square over (query, key), got shape {probs.shape}")
    if heads < spec.num_guided_heads:
        raise ValueError(
            f"guidance spec '{spec}' needs {spec.num_guided_heads} heads, the maps have {heads}"
        )
    rows = batch if spec.tokens else 1
    per_head = [jnp.zeros((rows, n, n), bool)] * heads  # unguided: weight 0 below
    # Registered patterns' targets (constants); 0 for every other head.
    values = np.zeros((heads, n, n), np.float32) if spec.user_patterns else None
    token_index = 0
    for group, (lo, hi) in zip(spec.groups, spec.head_ranges, strict=True):
        mask = None
        if group.pattern == "token":
            mask = None if masks is None else masks[token_index]
            token_index += 1
        if group.is_user:
            assert values is not None
            values[lo:hi] = pattern_target(group.pattern, n)
            continue
        target = target_predicate(group, n, mask)
        target = jnp.broadcast_to(target.reshape(-1, target.shape[-2], n), (rows, n, n))
        per_head[lo:hi] = [target] * (hi - lo)
    on_target = jnp.stack(per_head, axis=1)  # [rows, H, n, n], fused away by XLA
    off = jnp.square(probs) if values is None else jnp.square(probs - values)
    squared = jnp.where(on_target, jnp.square(probs - 1.0), off)
    # Rows first, then the rest: keeps float32 rounding of the long sums near 1e-7.
    sums = jnp.sum(jnp.sum(squared, axis=-1), axis=(0, 2))
    return jnp.where(np.arange(heads) < spec.num_guided_heads, sums, 0.0)


def group_losses(probs: jax.Array, spec: HeadSpec, masks: jax.Array | None = None) -> jax.Array:
    """Mean squared error of each group against its pattern, shape ``[num_groups]``, from full
    ``[B, H, n, n]`` maps (arguments as for :func:`head_square_sums`)."""
    batch, _, n, _ = probs.shape
    return losses_from_head_sums(head_square_sums(probs, spec, masks), spec, batch, n)


def losses_from_head_sums(head_sums: jax.Array, spec: HeadSpec, batch: int, n: int) -> jax.Array:
    """Per-group means ``[G]`` from each head's ``Σ (A - P)²`` over batch, queries and keys
    (``[H]``; unguided heads get weight 0, so no head is sliced off a head-sharded array)."""
    slots, size = spec.output_slots()
    weights = np.zeros((size, head_sums.shape[0]), np.float32)
    for slot, (lo, hi) in zip(slots, spec.head_ranges, strict=True):
        weights[slot, lo:hi] = 1.0 / (batch * (hi - lo) * n * n)
    return jnp.dot(weights, head_sums, precision=jax.lax.Precision.HIGHEST)


def guidance_loss(
    attentions: Sequence[jax.Array],
    spec: Spec,
    input_ids: jax.Array | None = None,
    token_ids: Mapping[str, int] | Sequence[int] | None = None,
) -> jax.Array:
    """The reference's ``compute_ag_loss`` on full post-softmax maps, one ``[B, H, n, n]`` per
    layer: the sum over guided layers and groups of each group's mean squared error.

    ``token_ids`` maps each token-set token string to its id (or lists the ids in group order);
    ``input_ids`` ``[B, n]`` says where those tokens are. Only needed for token-set groups.
    """
    if not attentions:
        raise ValueError("guidance_loss needs the attention maps of at least one layer")
    spec.validate(num_heads=attentions[0].shape[1], num_layers=len(attentions))
    masks = None
    if spec.tokens:
        if input_ids is None or token_ids is None:
            raise ValueError(
                f"guidance spec '{spec}' has token-set groups; pass input_ids and token_ids"
            )
        if isinstance(token_ids, Mapping):
            missing = [t for t in spec.tokens if t not in token_ids]
            if missing:
                raise ValueError(f"token_ids lacks ids for tokens {missing}")
            token_ids = [token_ids[t] for t in spec.tokens]
        if len(token_ids) != len(spec.tokens):
            raise ValueError(f"got {len(token_ids)} token ids for {len(spec.tokens)} token groups")
        masks = token_masks(jnp.asarray(input_ids), token_ids)
    guide = Guide(spec, masks)  # the same per-layer scoring the model runs inside its layers
    total = jnp.zeros((), jnp.float32)
    for layer, attention in enumerate(attentions):
        layer_guide = guide.for_layer(layer)
        if layer_guide is not None:
            total += jnp.sum(layer_guide.layer_losses(attention))
    return total


def guidance_weight(
    step: jax.Array | int, *, scale: float, stagnant_steps: int, total_steps: int
) -> jax.Array:
    """``scale * w(step)``: constant until ``stagnant_steps``, then linear decay to 0 at
    ``total_steps``, as in the reference trainer."""
    step = jnp.asarray(step, jnp.float32)
    decay = jnp.maximum(0.0, (total_steps - step) / max(1, total_steps - stagnant_steps))
    return scale * jnp.where(step < stagnant_steps, 1.0, decay)


@dataclasses.dataclass(frozen=True)
class Guide:
    """What an attention layer needs to score its guided heads inside the forward pass.

    ``after_dropout=True`` reproduces the reference, whose loss saw the attention probabilities
    after dropout (``A * mask / (1 - p)``); False guides the clean softmax output.
    """

    spec: Spec  # a layer's HeadSpec inside the model; the run's spec before for_layer
    masks: jax.Array | None = None  # [T, B, n] for the spec's tokens, in spec.tokens order
    after_dropout: bool = True

    def for_layer(self, layer: int) -> Guide | None:
        """The guide of one layer (its spec, and the token masks it uses), or None when the
        layer is unguided. Its losses are laid out as the run's groups (``spec.groups``)."""
        spec = self.spec.for_layer(layer)
        if spec is None:
            return None
        if spec is self.spec:
            return self
        masks = self.masks
        if masks is not None:
            if spec.tokens:
                masks = masks[np.asarray([self.spec.tokens.index(t) for t in spec.tokens])]
            else:
                masks = None
        return Guide(spec, masks, self.after_dropout)

    def layer_losses(self, probs: jax.Array) -> jax.Array:
        """Per-group losses ``[G]`` from one layer's ``[B, H, n, n]`` (or guided-only) maps."""
        if not isinstance(self.spec, HeadSpec):
            raise TypeError("layer_losses needs a layer's guide; call for_layer(index) first")
        return group_losses(probs, self.spec, self.masks)
