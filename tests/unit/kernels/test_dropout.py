"""Tests for guided_jax.kernels.dropout: 16-bit draws keep the rate and the expectation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guided_jax.kernels.dropout import dropout, keep_mask, keep_scale


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.5])
def test_rate_and_expectation(rate: float) -> None:
    x = jnp.ones((64, 1001))  # odd size: the last 32-bit draw is half used
    dropped = dropout(x, rate, jax.random.key(0))
    kept = np.asarray(dropped) != 0
    assert abs(1.0 - kept.mean() - rate) < 0.005
    np.testing.assert_allclose(np.asarray(dropped)[kept], keep_scale(rate))
    assert abs(float(jnp.mean(dropped)) - 1.0) < 0.01


def test_rate_is_rounded_to_sixteen_bits_and_scaled_exactly() -> None:
    assert keep_scale(0.25) == 4 / 3
    assert keep_scale(0.1) == pytest.approx(1 / (1 - 6554 / 65536), rel=1e-12)


def test_no_key_or_no_rate_is_the_identity_and_keys_differ() -> None:
    x = jax.random.normal(jax.random.key(1), (8, 16))
    assert dropout(x, 0.1, None) is x
    assert dropout(x, 0.0, jax.random.key(2)) is x
    first, second = (keep_mask(jax.random.key(k), 0.5, (8, 16)) for k in (3, 4))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, keep_mask(jax.random.key(3), 0.5, (8, 16)))


def test_bad_rate_is_refused() -> None:
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\), got 1\.0"):
        dropout(jnp.ones(3), 1.0, jax.random.key(0))


def test_sharded_mask_is_the_global_mask_and_both_halves_draw() -> None:
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    key = jax.random.key(5)
    draw = jax.jit(lambda k: keep_mask(k, 0.5, (16, 8, 9)))
    whole = np.asarray(draw(key))
    parts = jax.jit(lambda k: keep_mask(k, 0.5, (16, 8, 9)), out_shardings=sharded)(key)
    np.testing.assert_array_equal(np.asarray(parts), whole)
    # The low and high 16 bits of a word decide different columns, independently.
    low, high = whole[..., :4], whole[..., 4:8]
    assert abs(float(np.mean(low != high)) - 0.5) < 0.1
