"""Every kernel scores each guided head against its own target: specs with two token-set groups
on different tokens (and, for dense and flash, registered patterns), checked head by head
against a float64 numpy implementation of the targets, the softmax and the gradient, and
against the dense composition (values, losses and gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import (
    BATCH,
    HEADS,
    assert_kernels_agree,
    dense_reference,
    kernel_arrays,
    kernel_losses,
    numpy_head_sums,
)

from guided_jax.guidance import HeadSpec, token_masks
from guided_jax.kernels import KERNELS
from guided_jax.kernels.dropout import attention_keep_mask, hash_keep_scale, keep_mask, keep_scale
from guided_jax.kernels.flash import dropout_keep_mask
from guided_jax.kernels.pallas import Tiling

N, BLOCK = 24, 16  # a ragged last block; the second example's last 5 keys are padding
# Pallas, interpreted, with Triton's layouts (tiles of 16 here) and with the TPU's (rows of 128
# lanes, tiles of 128, one ragged block).
GPU_TILING, TPU_TILING = Tiling(BLOCK, BLOCK, 1), Tiling(128, 128, 128)
TOKENS = (5, 7)
TOKEN_SPEC = HeadSpec.parse("next:1,token[5]:2,token[7]:1,first:1")
# Each head's target by hand: pattern name, token id, registered target, or None (unguided).
TOKEN_HEADS = ["next", 5, 5, 7, "first", None, None, None]
USER_SPEC = HeadSpec.parse("next:1,token[5]:2,window1:1,token[7]:1,prev2:1,first:1")


def _window1(n: int) -> np.ndarray:
    """``|i - j| <= 1``, each row divided by its number of keys (2 at the ends, else 3)."""
    band = (np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) <= 1).astype(np.float64)
    return band / band.sum(axis=1, keepdims=True)


USER_HEADS = ["next", 5, 5, _window1(N), 7, np.eye(N, k=-2), "first", None]


def _ids() -> np.ndarray:
    """``[B, N]`` ids with tokens 5 and 7 at different places and counts in each example."""
    ids = np.random.default_rng(0).integers(8, 12, size=(BATCH, N))
    ids[0, [2, 9, 15]] = 5
    ids[0, [4, 20]] = 7
    ids[1, [6, 21]] = 5  # 21 is a padded key: still a target (the reference masks no padding)
    ids[1, [1, 11, 13]] = 7
    return ids


@pytest.mark.parametrize(
    ("kind", "spec", "heads", "rate", "options"),
    [
        ("dense", TOKEN_SPEC, TOKEN_HEADS, 0.0, {}),
        ("flash", TOKEN_SPEC, TOKEN_HEADS, 0.0, {"block": BLOCK}),
        ("pallas", TOKEN_SPEC, TOKEN_HEADS, 0.0, {"tiling": GPU_TILING}),
        ("pallas", TOKEN_SPEC, TOKEN_HEADS, 0.25, {"tiling": TPU_TILING}),
        ("dense", USER_SPEC, USER_HEADS, 0.25, {}),  # the loss sees the dropped maps
        ("flash", USER_SPEC, USER_HEADS, 0.25, {"block": BLOCK}),
    ],
    ids=[
        "dense-tokens",
        "flash-tokens",
        "pallas-tokens",
        "pallas-tokens-dropout",
        "dense-registered",
        "flash-registered",
    ],
)
def test_each_head_is_scored_against_its_own_target(kind, spec, heads, rate, options) -> None:
    q, k, v, key_mask, _ = kernel_arrays(N, padded=True, seed=2)
    ids = _ids()
    masks = token_masks(jnp.asarray(ids), list(TOKENS))
    assert not np.asarray(key_mask)[1, -5:].any()
    key = jax.random.key(9) if rate else None
    guided = np.array([head is not None for head in heads])
    weights = np.where(guided, np.arange(1.0, HEADS + 1), 0.0)  # a different pull per head
    options = {**options, "dropout_rate": rate, "dropout_key": key}

    def weighted(q, k):
        _, sums = KERNELS[kind](q, k, v, key_mask, spec=spec, token_masks=masks, **options)
        return jnp.sum(sums * weights), sums

    grad = jax.jit(jax.value_and_grad(weighted, argnums=(0, 1), has_aux=True))
    (_, sums), (dq, dk) = grad(q, k)
    # The keep mask the kernel draws: dense one for the whole map, flash per block, Pallas from
    # a hash of each element's place.
    drawn, kept_scale = None, keep_scale(rate) if rate else 1.0
    if rate:
        shape = (BATCH, HEADS, N, N)
        drawn = keep_mask(key, rate, shape)
        if kind == "flash":
            drawn = dropout_keep_mask(key, shape, rate, BLOCK)
        if kind == "pallas":
            drawn, kept_scale = attention_keep_mask(key, rate, shape), hash_keep_scale(rate)
    keep = None if drawn is None else np.asarray(drawn, np.float64) * kept_scale
    want, want_dq, want_dk = numpy_head_sums(q, k, key_mask, heads, ids, weights, keep)
    assert guided.sum() == spec.num_guided_heads and np.all(want[guided] > 1.0)
    assert not want[~guided].any()
    np.testing.assert_allclose(sums, want, rtol=1e-5, atol=0)
    for name, got, expected in (("dq", dq, want_dq), ("dk", dk, want_dk)):
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale, err_msg=name)

    if kind != "dense":  # values, per-group losses and every gradient path, against dense

        def dense(q, k, v):
            return dense_reference(
                q, k, v, key_mask, masks, keep=drawn, rate=rate, after_dropout=True, spec=spec,
                scale=kept_scale,
            )  # fmt: skip

        def kernel(q, k, v):
            return kernel_losses(kind, q, k, v, key_mask, masks, spec=spec, **options)

        assert_kernels_agree(kernel, dense, q, k, v)


@pytest.mark.parametrize(
    ("kind", "options"),
    [("dense", {}), ("flash", {"block": BLOCK}), ("pallas", {"tiling": GPU_TILING})],
    ids=["dense", "flash", "pallas"],
)
def test_unguided_heads_sum_to_zero_and_get_no_gradient(kind, options) -> None:
    """The sums of the heads past the spec's are 0, so their gradient is 0 too (a kernel that
    zeroes the sums but still pulls those heads' maps towards 0 fails here)."""
    q, k, v, key_mask, _ = kernel_arrays(N, padded=True, seed=3)
    masks = token_masks(jnp.asarray(_ids()), list(TOKENS))
    unguided = np.arange(HEADS) >= TOKEN_SPEC.num_guided_heads

    def unguided_sum(q, k):
        _, sums = KERNELS[kind](q, k, v, key_mask, spec=TOKEN_SPEC, token_masks=masks, **options)
        return jnp.sum(jnp.where(unguided, sums, 0.0)), sums

    grad = jax.jit(jax.value_and_grad(unguided_sum, argnums=(0, 1), has_aux=True))
    (total, sums), (dq, dk) = grad(q, k)
    assert float(total) == 0.0 and np.all(np.asarray(sums)[~unguided] > 0)
    np.testing.assert_array_equal(dq, 0.0, err_msg="dq")
    np.testing.assert_array_equal(dk, 0.0, err_msg="dk")
