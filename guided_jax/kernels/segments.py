"""Document boundaries inside packed blocks: start flags → segment ids → who may attend to whom.

Packing (:mod:`guided_jax.data.packing`) runs documents together, so a block of ``<s> … </s>``
usually holds the end of one document and the start of the next, and by default every token
attends to all of them, as in the reference. With ``data.document_masks`` the packing also
records a 0/1 flag where each document starts, a batch carries those flags beside the token ids,
and attention keeps each query inside its own document.

Segment ids number the documents of a block from 1, left to right (the block's first text token
always opens segment 1, even when its document began in an earlier block). The block's ``<s>``
(column 0) and ``</s>`` (last column) get segment 0: they belong to every document, so they see
and are seen by every token of the block, which keeps the ``first`` guidance pattern (column 0)
reachable from every row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SHARED_SEGMENT = 0  # the bos and eos columns: visible to and from every document


def segment_ids(starts: jax.Array) -> jax.Array:
    """``[..., n]`` document-start flags of packed blocks → ``int32`` segment ids (see the module
    docstring); the flags in the bos and eos columns are ignored."""
    starts = jnp.asarray(starts).astype(jnp.int32)
    n = starts.shape[-1]
    col = jax.lax.broadcasted_iota(jnp.int32, starts.shape, starts.ndim - 1)
    inner = (col > 0) & (col < n - 1)
    flags = jnp.where(col == 1, 1, jnp.where(inner, starts, 0))
    return jnp.where(inner, jnp.cumsum(flags, axis=-1), SHARED_SEGMENT).astype(jnp.int32)


def visible(query_segments: jax.Array, key_segments: jax.Array) -> jax.Array:
    """``[B, q]`` and ``[B, k]`` segment ids → ``[B, q, k]`` bool: same document, or either side
    is the shared bos/eos."""
    q = query_segments[:, :, None]
    k = key_segments[:, None, :]
    return (q == k) | (q == SHARED_SEGMENT) | (k == SHARED_SEGMENT)
