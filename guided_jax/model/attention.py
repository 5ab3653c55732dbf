"""The model's side of the attention kernels: a layer's :class:`~guided_jax.guidance.Guide` in,
its per-group guidance losses out, whichever kernel ``model.attention`` names."""

from __future__ import annotations

import jax

from guided_jax.guidance import Guide, losses_from_head_sums
from guided_jax.kernels import KERNELS


def layer_attention(
    kind: str,
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
    """Attention of one layer with kernel ``kind`` (see :mod:`guided_jax.kernels`): the values
    ``[B, n, H, d]`` and, when the layer is guided, its per-group losses laid out as the run's
    groups (``[G]``), or None."""
    out, head_sums = KERNELS[kind](
        q,
        k,
        v,
        key_mask,
        spec=None if guide is None else guide.spec,
        token_masks=None if guide is None else guide.masks,
        dropout_rate=dropout_rate,
        dropout_key=dropout_key,
        after_dropout=True if guide is None else guide.after_dropout,
        segment_ids=segment_ids,
    )
    if guide is None:
        return out, None
    return out, losses_from_head_sums(head_sums, guide.spec, out.shape[0], out.shape[1])
