"""Tests for guided_jax.kernels.pallas, run in Pallas interpret mode on CPU with the layouts of
both backends (Triton's small tiles and one-lane row statistics; the TPU's tiles of 128 and
128-lane rows): the kernels against the dense reference for every built-in pattern, with
padding, ragged blocks and the reference's attention dropout (the same hashed mask given to
dense), and what they refuse."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from kernel_checks import (
    SPEC,
    assert_kernels_agree,
    dense_reference,
    kernel_inputs,
    kernel_losses,
    objective,
)

from guided_jax.guidance import Guide, HeadSpec
from guided_jax.kernels.dropout import attention_keep_mask, hash_keep_scale, hash_threshold
from guided_jax.kernels.pallas import Tiling, default_tiling, pallas_attention
from guided_jax.model import EncoderForMLM, ModelConfig

# Positional heads only (at most one target per row) leave the token statistics out.
POSITIONAL = HeadSpec.parse("next:1,prev:1,first:2")
TILINGS = {"gpu": Tiling(16, 16, 1), "tpu": Tiling(128, 128, 128)}


def _pallas(q, k, v, key_mask, masks, *, tiling, spec=SPEC, **options):
    return kernel_losses("pallas", q, k, v, key_mask, masks, spec=spec, tiling=tiling, **options)


@pytest.mark.parametrize(
    "layout, n, padded, spec",
    [
        ("gpu", 32, True, SPEC),  # tiles of 16: two blocks, padded keys
        ("gpu", 40, True, POSITIONAL),  # a ragged last block; no token statistics
        ("tpu", 40, False, SPEC),  # one tile of 128, mostly padding
        ("tpu", 136, True, SPEC),  # two tiles of 128
    ],
    ids=["gpu-32", "gpu-40-positional", "tpu-40", "tpu-136"],
)
def test_pallas_matches_dense_values_losses_and_gradients(layout, n, padded, spec):
    q, k, v, key_mask, masks = kernel_inputs(n, padded, seed=1)

    def dense(q, k, v):
        return dense_reference(
            q, k, v, key_mask, masks, keep=None, rate=0.0, after_dropout=True, spec=spec
        )

    def kernels(q, k, v):
        return _pallas(q, k, v, key_mask, masks, tiling=TILINGS[layout], spec=spec)

    assert_kernels_agree(kernels, dense, q, k, v)


@pytest.mark.parametrize(
    "layout, n, after_dropout",
    [("gpu", 40, True), ("tpu", 136, False)],
)
def test_pallas_dropout_equals_dense_given_the_same_mask(layout, n, after_dropout):
    """Every element of each head's map dropped on its own, kept ones scaled by 1/(1-p); the
    guidance loss on the dropped maps (reference) or on the clean ones."""
    rate, key = 0.25, jax.random.key(5)
    q, k, v, key_mask, masks = kernel_inputs(n, padded=True, seed=1)
    keep = attention_keep_mask(key, rate, (q.shape[0], q.shape[2], n, n))
    scale = hash_keep_scale(rate)

    def dense(q, k, v):
        return dense_reference(
            q, k, v, key_mask, masks, keep=keep, rate=rate, after_dropout=after_dropout,
            scale=scale,
        )  # fmt: skip

    def kernels(q, k, v):
        return _pallas(
            q, k, v, key_mask, masks, tiling=TILINGS[layout], dropout_rate=rate,
            dropout_key=key, after_dropout=after_dropout,
        )  # fmt: skip

    assert_kernels_agree(kernels, dense, q, k, v)
    without, _ = jax.jit(lambda q, k, v: _pallas(q, k, v, key_mask, masks, tiling=TILINGS[layout]))(
        q, k, v
    )
    assert not np.allclose(kernels(q, k, v)[0], without, atol=1e-3)


def test_hashed_dropout_keeps_each_element_with_probability_one_minus_p():
    rate = 0.1
    keep = attention_keep_mask(jax.random.key(0), rate, (8, 12, 256, 256))
    kept = float(jnp.mean(keep))
    assert abs(kept / (1 - rate) - 1) < 0.005
    assert abs(hash_threshold(rate) / 2**31 - rate) < 1e-9
    assert hash_keep_scale(rate) == pytest.approx(1 / (1 - rate), rel=1e-9)
    # Independent draws: neighbours agree as two independent coins do, other keys differ.
    pairs = jnp.mean(keep[..., 1:] == keep[..., :-1])
    assert abs(float(pairs) - ((1 - rate) ** 2 + rate**2)) < 0.005
    other = attention_keep_mask(jax.random.key(1), rate, (8, 12, 256, 256))
    assert abs(float(jnp.mean(keep == other)) - ((1 - rate) ** 2 + rate**2)) < 0.005


def test_unguided_pallas_returns_values_only() -> None:
    q, k, v, key_mask, masks = kernel_inputs(16, padded=True)
    out, sums = pallas_attention(q, k, v, key_mask, tiling=TILINGS["gpu"])
    assert sums is None
    want, _ = dense_reference(q, k, v, key_mask, masks, keep=None, rate=0.0, after_dropout=True)
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_default_tilings_follow_the_backend_and_dtype() -> None:
    tpu = default_tiling("tpu", jnp.float32)
    assert (tpu.block_q, tpu.block_k, tpu.lanes) == (128, 128, 128)
    assert default_tiling("cuda", jnp.bfloat16).block_q == 128
    assert default_tiling("cuda", jnp.float32).block_q == 64
    assert default_tiling("cuda", jnp.float32).lanes == 1
    assert default_tiling("cpu", jnp.float32).compiler is None  # interpreted


def test_the_model_trains_pallas_with_attention_dropout() -> None:
    """model.attention=pallas no longer needs attention_dropout=0: a guided forward pass with a
    dropout key draws the same masks for the same key and other masks for another."""
    config = ModelConfig(
        vocab_size=40, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=32,
        max_position_embeddings=20, attention="pallas", attention_dropout=0.2, dropout=0.0,
    )  # fmt: skip
    model = EncoderForMLM(config, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 16), 5, 40)
    guide = Guide(HeadSpec.parse("next:1,first:1"))

    def losses(key):
        return model.encode(ids, dropout_key=key, guide=guide)[1]["guidance"]

    first, again, other = losses(jax.random.key(2)), losses(jax.random.key(2)), losses(None)
    np.testing.assert_array_equal(first, again)
    assert np.all(np.abs(np.asarray(first) - np.asarray(other)) > 1e-4)


def test_token_heads_need_token_masks() -> None:
    q, k, v, key_mask, _ = kernel_inputs(8, padded=False)
    with pytest.raises(ValueError, match="token_masks"):
        pallas_attention(q, k, v, key_mask, spec=SPEC)


def test_bfloat16_inputs_stay_close_to_float32() -> None:
    q, k, v, key_mask, masks = kernel_inputs(32, padded=True)
    want_out, want_losses = _pallas(q, k, v, key_mask, masks, tiling=TILINGS["gpu"])
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got_out, got_losses = _pallas(*low, key_mask, masks, tiling=TILINGS["gpu"])
    assert got_out.dtype == jnp.bfloat16
    np.testing.assert_allclose(got_out.astype(jnp.float32), want_out, atol=5e-2)
    np.testing.assert_allclose(got_losses, want_losses, rtol=5e-2)


def test_registered_patterns_and_document_masks_are_refused() -> None:
    q, k, v, key_mask, masks = kernel_inputs(8, padded=False)
    spec = HeadSpec.parse("window1:1")
    with pytest.raises(ValueError, match=r"built-in patterns only.*'window1'"):
        pallas_attention(q[:, :, :2], k[:, :, :2], v[:, :, :2], key_mask, spec=spec)
    segments = jnp.ones(key_mask.shape, jnp.int32)
    with pytest.raises(ValueError, match=r"no per-document attention masks.*'flash'"):
        pallas_attention(q, k, v, key_mask, spec=SPEC, token_masks=masks, segment_ids=segments)


@pytest.mark.parametrize(
    "mesh_shape, layout",
    [((2, 2, 2), "gpu"), ((1, 2, 4), "tpu"), ((8, 1, 1), "gpu")],
    ids=["data2-fsdp2-tensor2", "fsdp2-tensor4-tpu-layout", "data8"],
)
def test_pallas_on_a_mesh_equals_one_device(mesh_shape, layout):
    """XLA cannot partition a Pallas call, so the kernels run under shard_map: examples split
    over data x fsdp, heads over tensor, each device guiding its own heads with its own dropout
    hashes. Values, per-group losses and gradients equal the one-device run's, for a spec whose
    groups span the tensor shards (the first tensor shard holds self, next, prev and first; the
    next one first, the token head and an unguided head) and the reference's dropout."""
    q, k, v, key_mask, masks = kernel_inputs(40, padded=True, seed=3)
    # Eight examples, so that every batch shard holds its own.
    q, k, v = (jnp.concatenate([x, 0.5 * x, -x, 2.0 * x] * 2) for x in (q, k, v))
    key_mask = jnp.concatenate([key_mask] * 8)
    masks = jnp.concatenate([masks] * 8, axis=1)
    options = dict(tiling=TILINGS[layout], dropout_rate=0.2, dropout_key=jax.random.key(4))

    def kernels(q, k, v):
        return _pallas(q, k, v, key_mask, masks, **options)

    run = jax.jit(
        lambda q, k, v: (kernels(q, k, v), jax.grad(objective(kernels), argnums=(0, 1, 2))(q, k, v))
    )
    (want_out, want_losses), want_grads = run(q, k, v)
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        (got_out, got_losses), got_grads = run(q, k, v)
        text = run.lower(q, k, v).as_text()
    assert "shard_map" in text or "sdy.manual_computation" in text
    np.testing.assert_allclose(got_out, want_out, atol=1e-6)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-6)
    for name, got, want in zip("qkv", got_grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"d{name}")
    # dropout is on and differs between examples and heads, so no shard could pass by luck
    undropped = jax.jit(lambda q, k, v: _pallas(q, k, v, key_mask, masks, tiling=TILINGS[layout]))
    assert not np.allclose(undropped(q, k, v)[0], want_out, atol=1e-3)
