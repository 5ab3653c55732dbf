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


def _threshold(rate: float, levels: int = _LEVELS) -> int:
    """Random integers in ``[0, levels)`` at or above this are kept."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    return round(rate * levels)


def keep_scale(rate: float, levels: int = _LEVELS) -> float:
    """What kept values are multiplied by: exact for the rate rounded to ``levels``."""
    return levels / (levels - _threshold(rate, levels))


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


# ----------------------------------------------------------------------------- hashed masks
# The Pallas kernels cannot share XLA's random stream, and must regenerate each tile's mask in
# the backward without storing it: their keep bits are a counter-based hash of (seed, batch,
# head, row, column), in 32-bit integer operations that Mosaic, Triton and XLA compute alike.
# murmur3's finaliser mixes; every element is kept independently with probability 1 - rate.

_MIX_1, _MIX_2 = 0x85EBCA6B - 2**32, 0xC2B2AE35 - 2**32  # murmur3 fmix32, as int32
_GOLDEN = 0x9E3779B9 - 2**32  # an odd constant that spreads consecutive counters
_HASH_LEVELS = 1 << 31  # keep bits: the hash's top 31 bits, compared as non-negative int32


def _fmix32(x: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser on int32 (wrapping products, logical shifts)."""
    x = x ^ jax.lax.shift_right_logical(x, 16)
    x = x * jnp.int32(_MIX_1)
    x = x ^ jax.lax.shift_right_logical(x, 13)
    x = x * jnp.int32(_MIX_2)
    return x ^ jax.lax.shift_right_logical(x, 16)


def hash_threshold(rate: float) -> int:
    """Keep bits at or above this are kept (rate rounded to a multiple of ``2**-31``)."""
    return _threshold(rate, _HASH_LEVELS)


def hash_keep_scale(rate: float) -> float:
    """What the kept values of a hashed mask are multiplied by."""
    return keep_scale(rate, _HASH_LEVELS)


def row_hashes(key: jax.Array, batch: int, heads: int, rows: int) -> jax.Array:
    """``[batch, heads, rows]`` int32: the per-row part of the hash, from the JAX ``key``."""
    seed = jax.lax.bitcast_convert_type(jax.random.key_data(key).reshape(-1)[:2], jnp.int32)
    head = jax.lax.broadcasted_iota(jnp.int32, (batch, heads), 0) * heads
    head = head + jax.lax.broadcasted_iota(jnp.int32, (batch, heads), 1)
    base = _fmix32(seed[0] ^ _fmix32(seed[1] + head * jnp.int32(_GOLDEN)))
    row = jax.lax.broadcasted_iota(jnp.int32, (batch, heads, rows), 2)
    return _fmix32(base[..., None] + row * jnp.int32(_MIX_2))


def hashed_keep(row_hash: jax.Array, cols: jax.Array, threshold: int) -> jax.Array:
    """Keep flags of the elements at key columns ``cols`` of rows with hashes ``row_hash``
    (broadcast against each other): what a kernel computes for one tile."""
    bits = _fmix32(row_hash ^ (cols * jnp.int32(_GOLDEN)))
    return jax.lax.shift_right_logical(bits, 1) >= threshold


def attention_keep_mask(key: jax.Array, rate: float, shape: tuple[int, int, int, int]) -> jax.Array:
    """The ``[B, H, n, n_keys]`` keep mask the Pallas kernels draw for ``key`` and ``rate``, as
    one array (e.g. to give dense attention the same dropout)."""
    batch, heads, n, n_keys = shape
    hashes = row_hashes(key, batch, heads, n)[..., None]
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, 1, 1, n_keys), 3)
    return hashed_keep(hashes, cols, hash_threshold(rate))
