"""Tests for guided_jax.kernels.pallas, run in Pallas interpret mode on CPU: the kernels against
the dense reference for every pattern type, with padding and ragged blocks, and the model and
config wiring of ``model.attention="pallas"``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_checks import SPEC, assert_kernels_agree, dense_reference, kernel_inputs, kernel_losses

from guided_jax.guidance import HeadSpec
from guided_jax.kernels.pallas import pallas_attention
from guided_jax.model import ModelConfig

# Positional heads only (at most one target per row) leave the token statistics out.
POSITIONAL = HeadSpec.parse("next:1,prev:1,first:2")


def _pallas(q, k, v, key_mask, masks, *, block, spec=SPEC):
    return kernel_losses("pallas", q, k, v, key_mask, masks, spec=spec, block=block, interpret=True)


@pytest.mark.parametrize(
    "n, block, padded, spec",
    [(32, 16, True, SPEC), (40, 16, False, SPEC), (40, 16, True, POSITIONAL)],
)
def test_pallas_matches_dense_values_losses_and_gradients(n, block, padded, spec):
    q, k, v, key_mask, masks = kernel_inputs(n, padded, seed=1)

    def dense(q, k, v):
        return dense_reference(
            q, k, v, key_mask, masks, keep=None, rate=0.0, after_dropout=True, spec=spec
        )

    def kernels(q, k, v):
        return _pallas(q, k, v, key_mask, masks, block=block, spec=spec)

    assert_kernels_agree(kernels, dense, q, k, v)


def test_unguided_pallas_returns_values_only() -> None:
    q, k, v, key_mask, masks = kernel_inputs(16, padded=True)
    out, sums = pallas_attention(q, k, v, key_mask, block=8, interpret=True)
    assert sums is None
    want, _ = dense_reference(q, k, v, key_mask, masks, keep=None, rate=0.0, after_dropout=True)
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_pallas_needs_attention_dropout_off() -> None:
    with pytest.raises(ValueError, match=r"attention_dropout=0\.1; set it to 0"):
        ModelConfig(attention="pallas").validate()
    ModelConfig(attention="pallas", attention_dropout=0.0).validate()


def test_token_heads_need_token_masks() -> None:
    q, k, v, key_mask, _ = kernel_inputs(8, padded=False)
    with pytest.raises(ValueError, match="token_masks"):
        pallas_attention(q, k, v, key_mask, spec=SPEC, interpret=True)


def test_bfloat16_inputs_stay_close_to_float32() -> None:
    q, k, v, key_mask, masks = kernel_inputs(32, padded=True)
    want_out, want_losses = _pallas(q, k, v, key_mask, masks, block=16)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got_out, got_losses = _pallas(*low, key_mask, masks, block=16)
    assert got_out.dtype == jnp.bfloat16
    np.testing.assert_allclose(got_out.astype(jnp.float32), want_out, atol=5e-2)
    np.testing.assert_allclose(got_losses, want_losses, rtol=5e-2)


def test_registered_patterns_are_refused() -> None:
    q, k, v, key_mask, _ = kernel_inputs(8, padded=False)
    spec = HeadSpec.parse("window1:1")
    with pytest.raises(ValueError, match=r"built-in patterns only.*'window1'"):
        pallas_attention(q[:, :, :2], k[:, :, :2], v[:, :, :2], key_mask, spec=spec)


def test_dropout_and_document_masks_are_refused() -> None:
    q, k, v, key_mask, masks = kernel_inputs(8, padded=False)
    with pytest.raises(ValueError, match=r"no attention dropout; set model.attention_dropout=0"):
        pallas_attention(q, k, v, key_mask, dropout_rate=0.1, dropout_key=jax.random.key(0))
    segments = jnp.ones(key_mask.shape, jnp.int32)
    with pytest.raises(ValueError, match=r"no per-document attention masks.*'flash'"):
        pallas_attention(q, k, v, key_mask, spec=SPEC, token_masks=masks, segment_ids=segments)
