"""What each attention head does, computed inside jit from full attention maps: per guided
head, the attention mass on its target; per unguided head, the built-in pattern it is closest
to; per head, its entropy.

* ``mass``: mean over real query rows that have a target of the attention on the head's target
  keys (guided heads), or on the closest built-in pattern's (unguided heads);
* ``closest``: that pattern's index in :data:`BUILTIN` (unguided heads only);
* ``entropy``: mean attention entropy of a real query row, in nats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from guided_jax.guidance.loss import Guide, target_predicate
from guided_jax.guidance.spec import PatternGroup, Spec

# Built-in patterns an unguided head is compared with, in code order.
BUILTIN = ("self", "next", "prev", "first")


def _pattern_mask(group: Any, n: int, masks: jax.Array | None) -> jax.Array:
    """``[B or 1, n, n]`` bool: where the target of ``group`` is nonzero."""
    target = target_predicate(group, n, masks)
    if target.ndim == 4:  # a token set: [B, 1, 1, n], the same keys for every row
        return jnp.broadcast_to(target[:, 0], (target.shape[0], n, n))
    return target[None]


def _row_mass(probs: jax.Array, on: jax.Array, query_mask: jax.Array) -> jax.Array:
    """Mean over batch and real rows that have a target of ``Σ_{on} A``: ``probs``
    ``[B, k, n, n]``, ``on`` ``[B or 1, n, n]`` → ``[k]``."""
    mass = jnp.sum(jnp.where(on[:, None], probs, 0.0), axis=-1)  # [B, k, n]
    rows = (jnp.any(on, axis=-1) & query_mask).astype(jnp.float32)[:, None]  # [B, 1, n]
    rows = jnp.broadcast_to(rows, mass.shape)
    return jnp.sum(mass * rows, axis=(0, 2)) / jnp.maximum(jnp.sum(rows, axis=(0, 2)), 1.0)


def head_diagnostics(
    attentions: Sequence[jax.Array],
    spec: Spec | None,
    query_mask: jax.Array,
    masks: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """``mass``, ``entropy`` (float ``[L, H]``) and ``closest`` (int ``[L, H]``, -1 for guided
    heads) of every layer's post-softmax maps ``[B, H, n, n]``. ``query_mask`` ``[B, n]`` marks
    the real tokens; ``masks`` are the spec's token masks
    (:func:`~guided_jax.guidance.loss.token_masks`) when it has token-set groups."""
    guide = None if spec is None else Guide(spec, masks)
    query = query_mask.astype(bool)
    real_rows = jnp.maximum(jnp.sum(query.astype(jnp.float32)), 1.0)
    mass, entropy, closest = [], [], []
    for layer, probs in enumerate(attentions):
        probs = probs.astype(jnp.float32)
        n, heads = probs.shape[-1], probs.shape[1]
        plogp = jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0)
        row_entropy = -jnp.sum(plogp, axis=-1)  # [B, H, n]
        entropy.append(jnp.sum(row_entropy * query[:, None], axis=(0, 2)) / real_rows)
        builtin = jnp.stack(
            [_row_mass(probs, _pattern_mask(PatternGroup(p, 1), n, None), query) for p in BUILTIN]
        )  # [4, H]
        best = jnp.argmax(builtin, axis=0).astype(jnp.int32)
        layer_mass = jnp.max(builtin, axis=0)
        layer_closest = best
        layer_guide = None if guide is None else guide.for_layer(layer)
        if layer_guide is not None:
            token_index = 0
            guided = np.zeros(heads, bool)
            for group, (lo, hi) in zip(
                layer_guide.spec.groups, layer_guide.spec.head_ranges, strict=True
            ):
                group_masks = None
                if group.pattern == "token":
                    group_masks = layer_guide.masks[token_index]
                    token_index += 1
                on = _pattern_mask(group, n, group_masks)
                layer_mass = layer_mass.at[lo:hi].set(_row_mass(probs[:, lo:hi], on, query))
                guided[lo:hi] = True
            layer_closest = jnp.where(guided, -1, best)
        mass.append(layer_mass)
        closest.append(layer_closest)
    return {
        "mass": jnp.stack(mass),
        "entropy": jnp.stack(entropy),
        "closest": jnp.stack(closest),
    }


def flat_metrics(values: dict[str, jax.Array], spec: Spec | None = None) -> dict[str, jax.Array]:
    """``diag/<quantity>/L{l}H{h}`` scalars; ``closest`` only for unguided heads."""
    layers, heads = values["mass"].shape
    out = {}
    for layer in range(layers):
        layer_spec = None if spec is None else spec.for_layer(layer)
        guided = 0 if layer_spec is None else layer_spec.num_guided_heads
        for head in range(heads):
            where = f"L{layer}H{head}"
            out[f"diag/mass/{where}"] = values["mass"][layer, head]
            out[f"diag/entropy/{where}"] = values["entropy"][layer, head]
            if head >= guided:
                out[f"diag/closest/{where}"] = values["closest"][layer, head]
    return out
