"""Tests for guided_jax.kernels.flash: the blockwise kernel against the dense reference (values,
guidance losses and gradients for every pattern type, padding, dropout, ragged blocks) and its
memory, which must grow linearly in the sequence length where dense grows quadratically."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import (
    BATCH,
    HEADS,
    SPEC,
    assert_kernels_agree,
    dense_reference,
    kernel_inputs,
    kernel_losses,
)

from guided_jax.guidance import HeadSpec, group_losses, register_pattern
from guided_jax.kernels.dense import attention_bias, attention_probs
from guided_jax.kernels.flash import dropout_keep_mask, flash_attention


@pytest.mark.parametrize(
    "n, block, padded, rate, after_dropout",
    [
        (32, 32, False, 0.0, True),  # one block
        (40, 16, True, 0.0, True),  # ragged last block, padded keys
        (48, 16, True, 0.25, True),  # dropout, the loss sees the dropped maps (reference)
        (37, 8, False, 0.25, False),  # dropout, the loss sees the clean softmax
    ],
)
def test_flash_matches_dense_values_losses_and_gradients(n, block, padded, rate, after_dropout):
    _assert_flash_matches_dense(n, block, padded, rate, after_dropout, SPEC, seed=0)


def _assert_flash_matches_dense(n, block, padded, rate, after_dropout, spec, seed) -> None:
    q, k, v, key_mask, masks = kernel_inputs(n, padded, seed=seed)
    key = jax.random.key(3 + seed) if rate else None
    keep = None if key is None else dropout_keep_mask(key, (BATCH, HEADS, n, n), rate, block)
    options = dict(dropout_rate=rate, dropout_key=key, after_dropout=after_dropout, block=block)

    def dense(q, k, v):
        return dense_reference(
            q, k, v, key_mask, masks, keep=keep, rate=rate, after_dropout=after_dropout, spec=spec
        )

    def flash(q, k, v):
        return kernel_losses("flash", q, k, v, key_mask, masks, spec=spec, **options)

    assert_kernels_agree(flash, dense, q, k, v)


def test_unguided_flash_matches_dense_and_returns_no_losses() -> None:
    q, k, v, key_mask, _ = kernel_inputs(24, padded=True)

    def dense(q, k, v):
        probs = attention_probs(q, k, attention_bias(key_mask))
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)

    def flash(q, k, v):
        out, losses = flash_attention(q, k, v, key_mask, block=8)
        assert losses is None
        return out

    np.testing.assert_allclose(jax.jit(flash)(q, k, v), jax.jit(dense)(q, k, v), atol=1e-5)
    want = jax.grad(lambda *a: jnp.sum(jnp.sin(dense(*a))), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(lambda *a: jnp.sum(jnp.sin(flash(*a))), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_heads_that_follow_their_pattern_keep_small_losses_exact() -> None:
    """Near-perfect heads: the loss is ~1e-9, where ``Σa² - 2Σa·P + ΣP`` would be all rounding."""
    n = 32
    _, _, v, key_mask, masks = kernel_inputs(n, padded=False)
    # Keys one-hot by position and queries equal to them: every row attends to itself.
    k = jnp.broadcast_to(jnp.eye(n)[None, :, None, :], (BATCH, n, HEADS, n))
    q = 60.0 * k
    want = dense_reference(q, k, v, key_mask, masks, keep=None, rate=0.0, after_dropout=True)[1]
    got = kernel_losses("flash", q, k, v, key_mask, masks, block=8)[1]
    assert float(want[0]) < 1e-6  # the self head is nearly perfect
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-10)


def test_token_heads_need_token_masks() -> None:
    q, k, v, key_mask, _ = kernel_inputs(8, padded=False)
    with pytest.raises(ValueError, match="token_masks"):
        flash_attention(q, k, v, key_mask, spec=SPEC)


def _temp_bytes(kind: str, n: int) -> int:
    """Compiled temporary memory of one guided layer's attention, forward and backward."""
    shape = jax.ShapeDtypeStruct((1, n, 2, 16), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, n), jnp.bool_)
    spec = HeadSpec.parse("next:1,first:1")

    def loss(q, k, v, key_mask):
        if kind == "dense":
            probs = attention_probs(q, k, attention_bias(key_mask))
            out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
            guidance = jnp.sum(group_losses(probs, spec))
        else:
            out, sums = flash_attention(q, k, v, key_mask, spec=spec, block=256)
            guidance = jnp.sum(sums)
        return jnp.sum(out) + guidance

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    analysis = grad.lower(shape, shape, shape, mask).compile().memory_analysis()
    if analysis is None:
        pytest.skip("this backend gives no memory analysis")
    return analysis.temp_size_in_bytes


def test_guided_flash_memory_grows_linearly_and_dense_quadratically() -> None:
    flash = {n: _temp_bytes("flash", n) for n in (512, 2048, 8192)}
    dense = {n: _temp_bytes("dense", n) for n in (512, 2048, 8192)}
    # 4x the length: about 4x the memory for flash, about 16x for dense.
    assert flash[2048] / flash[512] < 6 and flash[8192] / flash[2048] < 6, flash
    assert dense[2048] / dense[512] > 10 and dense[8192] / dense[2048] > 10, dense
    assert flash[8192] * 20 < dense[8192]


# Registered dense patterns beside built-in ones: a row-normalised window (several targets per
# row, fractional values), a k-th previous token (rows without a target), a custom pattern with
# one non-unit value per row, and a token set.
register_pattern("test_flash_half_last", lambda n: 0.5 * np.eye(n)[::-1], replace=True)
USER_SPEC = HeadSpec.parse("window2:2,prev2:1,test_flash_half_last:1,token[7]:1,next:1")


@pytest.mark.parametrize(
    "n, block, padded, rate, after_dropout",
    [
        (40, 16, True, 0.0, True),  # ragged last block, padded keys
        (37, 8, False, 0.25, False),  # dropout, the loss sees the clean softmax
        (48, 16, True, 0.25, True),  # dropout, the loss sees the dropped maps
    ],
)
def test_flash_matches_dense_with_registered_patterns(n, block, padded, rate, after_dropout):
    _assert_flash_matches_dense(n, block, padded, rate, after_dropout, USER_SPEC, seed=1)
