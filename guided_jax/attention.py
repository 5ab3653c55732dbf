"""Attention kernels that also score guided heads, so their maps never leave the layer.

Every kernel takes ``q, k, v`` of shape ``[B, n, H, d_head]`` and the ``[B, n]`` mask of keys to
attend to, and returns the attended values plus the per-group guidance losses of this layer
(``None`` when the layer is not guided). ``dense`` is the reference computation; ``flash``
(``flash_attention.py``) gives the same results with ``O(n)`` memory per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from guided_jax import documents
from guided_jax import flash_attention as flash
from guided_jax import pallas_attention as pallas
from guided_jax.dropout import dropout
from guided_jax.guidance import Guide, losses_from_head_sums


def attention_bias(
    key_mask: jax.Array, dtype: jnp.dtype = jnp.float32, segment_ids: jax.Array | None = None
) -> jax.Array:
    """Additive ``[B, 1, 1, n]`` bias that hides padded keys; with ``segment_ids`` ``[B, n]``,
    ``[B, 1, n, n]`` that also hides other documents' keys (:mod:`guided_jax.documents`)."""
    if segment_ids is None:
        return jnp.where(key_mask, 0.0, jnp.finfo(dtype).min).astype(dtype)[:, None, None, :]
    seen = key_mask[:, None, :] & documents.visible(segment_ids, segment_ids)
    return jnp.where(seen, 0.0, jnp.finfo(dtype).min).astype(dtype)[:, None]


def attention_probs(q: jax.Array, k: jax.Array, bias: jax.Array) -> jax.Array:
    """Post-softmax ``[B, H, n, n]`` maps in float32: ``softmax(q k^T / sqrt(d) + bias)``."""
    q, k = _heads_first(q), _heads_first(k)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    return jax.nn.softmax(scores + bias, axis=-1)


def _heads_first(x: jax.Array) -> jax.Array:
    """``[B, n, H, d]`` → ``[B, H, n, d]``: with the batch axes leading, the backward pass's
    products are plain batched matmuls too (a layer's attention forward and backward: ~17% less
    time on CPU than contracting the ``[B, n, H, d]`` arrays in place)."""
    return jnp.swapaxes(x, 1, 2)


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    *,
    dropout_rate: float,
    dropout_key: jax.Array | None,
    guide: Guide | None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Softmax attention with the full ``[B, H, n, n]`` probabilities (the reference path)."""
    probs = attention_probs(q, k, attention_bias(key_mask, segment_ids=segment_ids))
    dropped = dropout(probs, dropout_rate, dropout_key)
    losses = None
    if guide is not None:
        losses = guide.layer_losses(dropped if guide.after_dropout else probs)
    out = jnp.einsum("bhqk,bhkd->bqhd", dropped.astype(v.dtype), _heads_first(v))
    return out, losses


def _scored(guide: Guide | None, out: jax.Array, head_sums: jax.Array | None):
    """The blockwise kernels' per-head sums as the per-group losses a layer returns."""
    if guide is None:
        return out, None
    return out, losses_from_head_sums(head_sums, guide.spec, out.shape[0], out.shape[1])


def _patterns(guide: Guide | None, num_heads: int) -> flash.HeadPatterns | None:
    return None if guide is None else flash.HeadPatterns.from_spec(guide.spec, num_heads)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    *,
    dropout_rate: float,
    dropout_key: jax.Array | None,
    guide: Guide | None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Blockwise attention; guided heads are scored inside the kernel. Dropout masks are drawn
    per key block (not the same draws as ``dense``, the same distribution)."""
    out, head_sums = flash.flash_attention(
        q,
        k,
        v,
        key_mask,
        patterns=_patterns(guide, q.shape[2]),
        token_masks=None if guide is None else guide.masks,
        dropout_rate=dropout_rate if dropout_key is not None else 0.0,
        dropout_key=dropout_key,
        after_dropout=True if guide is None else guide.after_dropout,
        segment_ids=segment_ids,
    )
    return _scored(guide, out, head_sums)


def pallas_flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    *,
    dropout_rate: float,
    dropout_key: jax.Array | None,
    guide: Guide | None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """The Pallas kernels (Triton on GPU, Mosaic on TPU, interpreted on CPU); no dropout and
    no per-document masks."""
    if segment_ids is not None:
        raise ValueError(
            "model.attention='pallas' applies no per-document attention masks; set "
            "data.document_masks=false or use model.attention='flash'"
        )
    if dropout_key is not None and dropout_rate > 0.0:
        raise ValueError(
            "model.attention='pallas' applies no attention dropout; set "
            "model.attention_dropout=0 or use model.attention='flash'"
        )
    out, head_sums = pallas.pallas_attention(
        q,
        k,
        v,
        key_mask,
        patterns=_patterns(guide, q.shape[2]),
        token_masks=None if guide is None else guide.masks,
        interpret=jax.default_backend() == "cpu",
    )
    return _scored(guide, out, head_sums)


ATTENTION = {"dense": dense_attention, "flash": flash_attention, "pallas": pallas_flash_attention}
