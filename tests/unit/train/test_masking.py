"""Tests for guided_jax.train.masking: RoBERTa's 15% / 80-10-10 dynamic masking and the MLM loss."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from guided_jax.train.masking import mask_tokens, max_predictions, mlm_loss, prediction_positions

VOCAB = 1000
BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, 4
SPECIALS = (BOS, PAD, EOS, UNK, MASK)
KWARGS = dict(vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS)


def _batch(rows: int = 64, length: int = 512, seed: int = 0) -> np.ndarray:
    """``<s> words </s> <pad>...`` with varying lengths, some specials inside the text too."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, size=(rows, length)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, size=rows)
    for row, used in enumerate(lengths):
        ids[row, 0] = BOS
        ids[row, used - 1] = EOS
        ids[row, used:] = PAD
    ids[::3, 7] = UNK
    ids[::5, 9] = EOS  # a second sentence boundary
    return ids


@pytest.fixture(scope="module")
def masked_batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = _batch()
    masked, selected = mask_tokens(jax.random.key(0), jnp.asarray(ids), **KWARGS)
    assert masked.dtype == jnp.int32 and masked.shape == ids.shape
    assert selected.dtype == jnp.bool_ and selected.shape == ids.shape
    return ids, np.asarray(masked), np.asarray(selected)


def _within(count: int, total: int, p: float, sigmas: float = 5.0) -> bool:
    """Is ``count`` out of ``total`` Binomial(total, p) draws within ``sigmas`` stds?"""
    return abs(count - total * p) <= sigmas * np.sqrt(total * p * (1 - p))


def test_selection_rate_is_15_percent_of_non_special_tokens(masked_batch) -> None:
    ids, _, selected = masked_batch
    candidates = ~np.isin(ids, SPECIALS)
    assert candidates.sum() > 20_000
    count = int(selected[candidates].sum())
    assert _within(count, int(candidates.sum()), 0.15), count / candidates.sum()
    # every row gets some selections, spread over the sequence (not only a prefix)
    assert selected.any(axis=1).all()
    half = ids.shape[1] // 2
    assert selected[:, :half].sum() > 0 and selected[:, half:].sum() > 0


def test_special_and_pad_tokens_are_never_selected_or_changed(masked_batch) -> None:
    ids, masked, selected = masked_batch
    special = np.isin(ids, SPECIALS)
    assert (ids == PAD).sum() > 1000 and (ids == UNK).sum() > 0
    assert not selected[special].any()
    np.testing.assert_array_equal(masked[special], ids[special])


def test_unselected_tokens_are_never_changed(masked_batch) -> None:
    ids, masked, selected = masked_batch
    np.testing.assert_array_equal(masked[~selected], ids[~selected])
    assert (masked[selected] != ids[selected]).mean() > 0.85  # and most selected ones are


def test_selected_split_80_mask_10_random_10_unchanged(masked_batch) -> None:
    ids, masked, selected = masked_batch
    total = int(selected.sum())
    original, new = ids[selected], masked[selected]
    to_mask = int((new == MASK).sum())
    unchanged = int((new == original).sum())
    random = total - to_mask - unchanged
    # A random replacement equals <mask> or the original with probability 1/V each.
    p_mask = 0.8 + 0.1 / VOCAB
    p_unchanged = 0.1 + 0.1 / VOCAB
    p_random = 0.1 * (1 - 2 / VOCAB)
    assert _within(to_mask, total, p_mask), to_mask / total
    assert _within(unchanged, total, p_unchanged), unchanged / total
    assert _within(random, total, p_random), random / total


def test_random_replacements_are_uniform_over_the_vocabulary() -> None:
    ids = _batch(rows=64, length=512, seed=1)
    # With mlm_probability=1 every non-special token is selected: ~10% become random words.
    masked, selected = mask_tokens(
        jax.random.key(1), jnp.asarray(ids), mlm_probability=1.0, **KWARGS
    )
    masked, selected = np.asarray(masked), np.asarray(selected)
    np.testing.assert_array_equal(selected, ~np.isin(ids, SPECIALS))
    words = masked[selected & (masked != ids) & (masked != MASK)]
    assert words.size > 2000
    assert words.min() >= 0 and words.max() < VOCAB
    # Uniform over [0, V): each quarter of the vocabulary gets about a quarter.
    quarters = np.bincount(words * 4 // VOCAB, minlength=4)
    for count in quarters:
        assert _within(int(count), int(words.size), 0.25), quarters
    # and the replacement is independent of the original word
    assert abs(np.corrcoef(words, ids[selected & (masked != ids) & (masked != MASK)])[0, 1]) < 0.1


@pytest.mark.parametrize("probability", [0.0, 0.5])
def test_mlm_probability_is_respected(probability: float) -> None:
    ids = _batch(rows=8, length=128, seed=2)
    masked, selected = mask_tokens(
        jax.random.key(2), jnp.asarray(ids), mlm_probability=probability, **KWARGS
    )
    candidates = ~np.isin(ids, SPECIALS)
    count = int(np.asarray(selected)[candidates].sum())
    if probability == 0.0:
        assert count == 0
        np.testing.assert_array_equal(np.asarray(masked), ids)
    else:
        assert _within(count, int(candidates.sum()), probability)


def test_same_key_same_masks_different_key_different_masks() -> None:
    ids = jnp.asarray(_batch(rows=8, length=128, seed=3))
    a = mask_tokens(jax.random.key(5), ids, **KWARGS)
    b = mask_tokens(jax.random.key(5), ids, **KWARGS)
    c = mask_tokens(jax.random.key(6), ids, **KWARGS)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    assert (np.asarray(a[1]) != np.asarray(c[1])).sum() > 50
    assert (np.asarray(a[0]) != np.asarray(c[0])).sum() > 50
    # folding the step into the key (as the train loop does) also gives fresh masks
    d = mask_tokens(jax.random.fold_in(jax.random.key(5), 1), ids, **KWARGS)
    assert (np.asarray(a[1]) != np.asarray(d[1])).sum() > 50


def test_mask_tokens_under_jit_matches_eager() -> None:
    ids = jnp.asarray(_batch(rows=8, length=128, seed=4))
    key = jax.random.key(7)
    jitted = jax.jit(functools.partial(mask_tokens, **KWARGS))
    eager_masked, eager_selected = mask_tokens(key, ids, **KWARGS)
    jit_masked, jit_selected = jitted(key, ids)
    np.testing.assert_array_equal(np.asarray(jit_masked), np.asarray(eager_masked))
    np.testing.assert_array_equal(np.asarray(jit_selected), np.asarray(eager_selected))
    assert np.asarray(jit_selected).sum() > 0
    other_masked, _ = jitted(jax.random.key(8), ids)  # a traced key: no retrace needed
    assert (np.asarray(other_masked) != np.asarray(jit_masked)).any()


# ----------------------------------------------------------------------------- MLM loss


def _numpy_mlm_loss(logits: np.ndarray, labels: np.ndarray, selected: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    return float(nll[selected].mean())


# One shape and one compilation each for all MLM-loss checks (eager op-by-op is slower on CPU).
_loss_and_grad = jax.jit(jax.value_and_grad(mlm_loss))


def _mlm_inputs(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(3, 11, 37)) * 3).astype(np.float32)
    labels = rng.integers(0, 37, size=(3, 11)).astype(np.int32)
    selected = rng.random((3, 11)) < 0.3
    selected[0, 0] = True
    return logits, labels, selected


def test_mlm_loss_matches_numpy_cross_entropy_over_selected() -> None:
    logits, labels, selected = _mlm_inputs(0)
    want = _numpy_mlm_loss(logits, labels, selected)
    got, _ = _loss_and_grad(logits, labels, selected)
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # unselected positions do not matter, whatever their logits
    logits[~selected] = np.random.default_rng(1).normal(size=(int((~selected).sum()), 37)) * 50
    again, _ = _loss_and_grad(logits, labels, selected)
    np.testing.assert_allclose(float(again), want, rtol=1e-5)


def test_mlm_loss_scores_bfloat16_logits_in_float32() -> None:
    logits, labels, selected = _mlm_inputs(2)
    low = mlm_loss(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels), jnp.asarray(selected))
    assert low.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(float(low), _numpy_mlm_loss(rounded, labels, selected), rtol=1e-5)


def test_mlm_loss_is_zero_not_nan_when_nothing_is_selected() -> None:
    logits, labels, _ = _mlm_inputs(3)
    loss, grad = _loss_and_grad(logits, labels, np.zeros(labels.shape, bool))
    assert float(loss) == 0.0
    assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad).any()


def test_mlm_loss_gradient_only_reaches_selected_positions() -> None:
    logits, labels, _ = _mlm_inputs(4)
    selected = np.zeros(labels.shape, bool)
    selected[0, 1] = selected[2, 4] = True
    _, grad = _loss_and_grad(logits, labels, selected)
    grad = np.asarray(grad)
    assert not grad[~selected].any()
    # d(mean CE)/d logits = (softmax - onehot) / count at the selected positions
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    probs = shifted / shifted.sum(-1, keepdims=True)
    onehot = np.eye(37)[labels]
    np.testing.assert_allclose(grad[selected], (probs - onehot)[selected] / 2, atol=1e-6)


def test_max_predictions_bounds_the_binomial_count() -> None:
    assert max_predictions(512, 0.15) == 120  # mean 77, sd 8: less than a quarter
    assert max_predictions(128, 0.15) == 44
    assert max_predictions(8, 0.15) == 8  # never more than the row
    assert all(
        max_predictions(n, p) % 4 == 0 or max_predictions(n, p) == n
        for n in (7, 64, 100, 1000)
        for p in (0.05, 0.15, 0.5)
    )


def test_prediction_positions_list_selected_first_and_flag_overflow() -> None:
    selected = jnp.asarray([[0, 1, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0]], bool)
    positions, valid, fits = prediction_positions(selected, 3)
    np.testing.assert_array_equal(positions, [[1, 3, 4], [0, 1, 2]])
    np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 0, 0]])
    assert bool(fits)
    _, _, fits = prediction_positions(selected, 2)
    assert not bool(fits)
