"""Dropout from 16-bit random draws.

``jax.random.bernoulli`` turns one 32-bit draw into a float per element; on CPU that costs as
much as a layer's matmuls for the ``[B, H, n, n]`` attention mask. Here every 32-bit draw gives
two 16-bit ones, compared with an integer threshold: the rate is rounded to a multiple of
``2**-16`` (0.1 becomes 0.100006), and kept values are scaled by the exact
``1 / (1 - rounded rate)``, so the expectation is unchanged. The words come from XLA's
``RngBitGenerator`` with its Threefry algorithm, keyed by the JAX key: cheaper than
``jax.random.bits`` (both measured in benchmarks/RESULTS.md), and like it a counter-based
stream that sharded outputs split exactly (each device computes its own slice of the same
global mask)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_LEVELS = 1 << 16


def _threshold(rate: float) -> int:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    return round(rate * _LEVELS)


def keep_scale(rate: float) -> float:
    """What kept values are multiplied by."""
    return _LEVELS / (_LEVELS - _threshold(rate))


def keep_mask(key: jax.Array, rate: float, shape: tuple[int, ...]) -> jax.Array:
    """Boolean mask of the elements that survive dropout at ``rate``: the low and high halves of
    each 32-bit word decide an element of the first and of the second half of the last axis."""
    *lead, last = shape
    state = jnp.concatenate([jax.random.key_data(key).reshape(-1)[:2], jnp.zeros(2, jnp.uint32)])
    _, words = jax.lax.rng_bit_generator(
        state, (*lead, (last + 1) // 2), jnp.uint32, algorithm=jax.lax.RandomAlgorithm.RNG_THREE_FRY
    )
    threshold = _threshold(rate)
    low = (words & 0xFFFF) >= threshold
    high = words >= jnp.uint32(threshold << 16)
    return jnp.concatenate([low, high], axis=-1)[..., :last]


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """``x`` with elements zeroed at ``rate`` and the rest rescaled; unchanged without a key."""
    if key is None or _threshold(rate) == 0:
        return x
    scale = jnp.asarray(keep_scale(rate), x.dtype)
    return jnp.where(keep_mask(key, rate, x.shape), x * scale, jnp.zeros((), x.dtype))
