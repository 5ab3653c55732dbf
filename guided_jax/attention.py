"""Attention kernels that also score guided heads, so their maps never leave the layer.

Every kernel takes ``q, k, v`` of shape ``[B, n, H, d_head]`` and returns the attended values
plus the per-group guidance losses of this layer (``None`` when the layer is not guided).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from guided_jax.guidance import Guide


def attention_bias(key_mask: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Additive ``[B, 1, 1, n]`` bias that hides padded keys."""
    return jnp.where(key_mask, 0.0, jnp.finfo(dtype).min).astype(dtype)[:, None, None, :]


def attention_probs(q: jax.Array, k: jax.Array, bias: jax.Array) -> jax.Array:
    """Post-softmax ``[B, H, n, n]`` maps in float32: ``softmax(q k^T / sqrt(d) + bias)``."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    return jax.nn.softmax(scores + bias, axis=-1)


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array,
    *,
    dropout: nnx.Dropout,
    dropout_key: jax.Array | None,
    guide: Guide | None,
) -> tuple[jax.Array, jax.Array | None]:
    """Softmax attention with the full ``[B, H, n, n]`` probabilities (the reference path)."""
    probs = attention_probs(q, k, bias)
    dropped = dropout(probs, deterministic=dropout_key is None, rngs=dropout_key)
    losses = None
    if guide is not None:
        losses = guide.layer_losses(dropped if guide.after_dropout else probs)
    out = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(v.dtype), v)
    return out, losses
