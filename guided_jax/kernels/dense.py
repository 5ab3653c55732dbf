"""Dense attention, the reference computation: the full ``[B, H, n, n]`` probabilities, with
the guided heads scored on them (after or before dropout) while they exist."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from guided_jax.guidance import HeadSpec, head_square_sums
from guided_jax.kernels.dropout import dropout
from guided_jax.kernels.segments import visible


def attention_bias(
    key_mask: jax.Array, dtype: jnp.dtype = jnp.float32, segment_ids: jax.Array | None = None
) -> jax.Array:
    """Additive ``[B, 1, 1, n]`` bias that hides padded keys; with ``segment_ids`` ``[B, n]``,
    ``[B, 1, n, n]`` that also hides other documents' keys (:mod:`guided_jax.kernels.segments`)."""
    if segment_ids is None:
        return jnp.where(key_mask, 0.0, jnp.finfo(dtype).min).astype(dtype)[:, None, None, :]
    seen = key_mask[:, None, :] & visible(segment_ids, segment_ids)
    return jnp.where(seen, 0.0, jnp.finfo(dtype).min).astype(dtype)[:, None]


def attention_probs(q: jax.Array, k: jax.Array, bias: jax.Array) -> jax.Array:
    """Post-softmax ``[B, H, n, n]`` maps in float32: ``softmax(q k^T / sqrt(d) + bias)``."""
    q, k = _heads_first(q), _heads_first(k)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    return jax.nn.softmax(scores + bias, axis=-1)


def _heads_first(x: jax.Array) -> jax.Array:
    """``[B, n, H, d]`` → ``[B, H, n, d]``: with the batch axes leading, the backward pass's
    products are plain batched matmuls too (cheaper on CPU than contracting the ``[B, n, H, d]``
    arrays in place; benchmarks/RESULTS.md)."""
    return jnp.swapaxes(x, 1, 2)


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    *,
    spec: HeadSpec | None = None,
    token_masks: jax.Array | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    after_dropout: bool = True,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Softmax attention over ``[B, n, H, d]`` inputs; returns the values ``[B, n, H, d]`` and,
    with a layer's ``spec``, each head's ``Σ (a - P)²`` ``[H]`` over the dropped-out maps
    (``after_dropout``, the reference) or the clean ones (same contract as the blockwise
    kernels)."""
    probs = attention_probs(q, k, attention_bias(key_mask, segment_ids=segment_ids))
    dropped = dropout(probs, dropout_rate, dropout_key)
    head_sums = None
    if spec is not None:
        head_sums = head_square_sums(dropped if after_dropout else probs, spec, token_masks)
    out = jnp.einsum("bhqk,bhkd->bqhd", dropped.astype(v.dtype), _heads_first(v))
    return out, head_sums
