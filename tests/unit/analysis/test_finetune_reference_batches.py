"""Fine-tuning's ``reference`` protocol on a train split that is not a multiple of the batch: the
short last batch of an epoch is padded to the batch's shape, and the padding must not count in
the loss or the update (HF's DataLoader simply hands over a smaller batch)."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO
from guided_jax import weights
from guided_jax.analysis import finetune
from guided_jax.config import load_config
from guided_jax.data.tables import Split, Task, encode
from guided_jax.model import model_params

ROWS, BATCH, SEED = 20, 8, 3  # batches of 8, 8 and 4 rows (and 4 of padding)


@pytest.fixture(scope="module")
def encoder(tiny_run):
    return weights.load(tiny_run)


def _inputs(encoder, **overrides):
    """A reference-protocol config and a regression task of ROWS rows whose labels (0 to about
    4) are far from the untrained head's outputs (about 0), so each row's squared error differs."""
    config = load_config(f"{REPO / 'configs' / 'finetune.py'}:reference")
    config.update(batch_size=BATCH, epochs=1, max_length=16, learning_rate=3e-3)
    config.update(overrides)
    words = np.array(["the", "a", "cat", "dog", "sees", "likes", "river", "garden"])
    rng = np.random.default_rng(0)
    texts = [(" ".join(rng.choice(words, size=5)),) for _ in range(ROWS)]
    labels = np.linspace(0.0, 4.0, ROWS).astype(np.float32)  # row 0, the padding, has label 0
    empty = Split([], np.zeros(0, np.float32))
    task = Task("numbers", Split(texts, labels), empty, Split(texts[:BATCH], labels[:BATCH]), [])
    encoded = {
        name: encode(encoder.tokenizer, getattr(task, name), config.max_length)
        for name in ("train", "eval")
    }
    return config, task, encoded


def test_the_last_batch_loss_is_the_mean_over_its_real_rows(encoder):
    """At a learning rate of 1e-30 (no float32 weight moves by a visible amount) and without
    dropout the model stays as it starts, so the loss of the epoch's last batch (recorded in the
    history) is the model's mean squared error over the rows that batch holds: the last
    ROWS % BATCH of the epoch's permutation (numpy's, from the seed)."""
    config, task, encoded = _inputs(encoder, learning_rate=1e-30, classifier_dropout=0.0)
    still = dataclasses.replace(encoder.config, dropout=0.0, attention_dropout=0.0)
    params = model_params(encoder.model)
    got = finetune.train_one_seed(config, task, still, params, SEED, encoded, return_model=True)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-20),
        model_params(got["final_model"].encoder),
        params,
    )
    ids, mask = encoded["train"]
    outputs = np.asarray(got["final_model"](ids, mask)[:, 0], np.float64)
    errors = (outputs - task.train.labels.astype(np.float64)) ** 2
    last = np.random.default_rng(SEED).permutation(ROWS)[2 * BATCH :]
    assert len(last) == ROWS - 2 * BATCH == 4
    want = errors[last].mean()
    # Counting the padding (4 more copies of row 0, label 0) would move the mean well away.
    counted = (errors[last].sum() + (BATCH - len(last)) * errors[0]) / BATCH
    assert abs(counted - want) > 0.2 * want
    assert got["steps"] == 3
    (record,) = got["history"]
    assert record["step"] == 3
    assert record["loss"] == pytest.approx(want, rel=1e-5)


def test_what_pads_the_last_batch_does_not_change_the_training(encoder, monkeypatch):
    """Two runs that differ only in the rows that pad the short last batch (row 0, as the code
    pads, or the row of the largest label) end with the same parameters and losses."""
    config, task, encoded = _inputs(encoder, epochs=2)
    params = model_params(encoder.model)
    first = finetune.train_one_seed(
        config, task, encoder.config, params, SEED, encoded, return_model=True
    )
    padded = []

    def pad_with_the_largest_label(rows, batch_size):
        padded.append(batch_size - len(rows))
        return np.concatenate([rows, np.full(batch_size - len(rows), ROWS - 1, rows.dtype)])

    monkeypatch.setattr(finetune, "_pad_rows", pad_with_the_largest_label)
    second = finetune.train_one_seed(
        config, task, encoder.config, params, SEED, encoded, return_model=True
    )
    assert padded.count(BATCH - ROWS % BATCH) >= 2  # each epoch's last batch was padded here
    assert [h["loss"] for h in second["history"]] == pytest.approx(
        [h["loss"] for h in first["history"]], rel=1e-6
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        nnx.state(first["final_model"], nnx.Param),
        nnx.state(second["final_model"], nnx.Param),
    )
