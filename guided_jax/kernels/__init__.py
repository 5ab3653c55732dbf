"""Attention kernels that also score guided heads, from arrays to arrays (no nnx, no config).

Every kernel takes ``q, k, v`` of shape ``[B, n, H, d_head]``, the ``[B, n]`` mask of keys to
attend to and, for a guided layer, its :class:`~guided_jax.guidance.HeadSpec` with the token
masks of its token-set groups; it returns the attended values and each head's
``Σ (a - P)²`` over batch, queries and keys (``[H]``, 0 for unguided heads; None for an unguided
layer):

* ``dense``: the reference computation with the full maps (:mod:`.dense`);
* ``flash``: blockwise with the online softmax, ``O(n)`` memory, portable JAX (:mod:`.flash`);
* ``pallas``: the blockwise algorithm as Pallas kernels for GPU and TPU (:mod:`.pallas`).

What the blockwise kernels compare tiles against is shared in :mod:`.targets`.
"""

from guided_jax.kernels.dense import dense_attention
from guided_jax.kernels.flash import flash_attention
from guided_jax.kernels.pallas import pallas_attention

KERNELS = {"dense": dense_attention, "flash": flash_attention, "pallas": pallas_attention}

__all__ = ["KERNELS", "dense_attention", "flash_attention", "pallas_attention"]
