"""The grain input pipeline (guided_jax.data.pipeline): epochs, per-process shards, iterator
state in orbax checkpoints."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tiny_tfds

from guided_jax.data import pipeline
from guided_jax.data.text import CorpusError
from guided_jax.train import checkpoints
from guided_jax.train.inputs import prepare
from guided_jax.train.loop import train_and_evaluate
from guided_jax.train.metrics import read_metrics


def _numbered(n: int, length: int = 4) -> np.ndarray:
    """Block i holds i in every position, so a batch says which blocks it took."""
    return np.repeat(np.arange(n, dtype=np.int32)[:, None], length, axis=1)


def _stream(dataset, steps: int) -> list[int]:
    return [int(row[0]) for s in range(steps) for row in dataset[s]]


def test_each_epoch_is_a_fresh_permutation_and_batches_straddle_epochs():
    n, b = 10, 4
    dataset = pipeline.batch_dataset(_numbered(n), batch_size=b, seed=7)
    assert dataset[0].shape == (4, 4) and dataset[0].dtype == np.int32
    stream = _stream(dataset, 15)  # 60 examples = 6 epochs
    epochs = [stream[e * n : (e + 1) * n] for e in range(6)]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled every epoch
    other_seed = _stream(pipeline.batch_dataset(_numbered(n), batch_size=b, seed=8), 15)
    assert other_seed != stream and sorted(other_seed) == sorted(stream)


def test_two_shards_read_disjoint_rows_that_make_up_the_global_batches():
    n, b = 24, 8
    blocks = _numbered(n)
    whole = pipeline.batch_dataset(blocks, b, seed=1)
    shards = [
        pipeline.batch_dataset(blocks, b, seed=1, rows=slice(i * 4, i * 4 + 4)) for i in (0, 1)
    ]
    seen = []
    for step in range(n // b):  # one epoch
        parts = [shard[step] for shard in shards]
        np.testing.assert_array_equal(np.concatenate(parts), whole[step])
        assert not set(parts[0][:, 0]) & set(parts[1][:, 0])
        seen += [int(x) for part in parts for x in part[:, 0]]
    assert sorted(seen) == list(range(n))  # together they cover the epoch exactly once
    assert pipeline.shard_of_rows(slice(4, 8), 8) == (1, 2)
    with pytest.raises(ValueError, match="not one of equal shards"):
        pipeline.shard_of_rows(slice(2, 5), 8)


def test_too_few_blocks_for_one_batch_is_refused():
    with pytest.raises(CorpusError, match="3 blocks of 4 tokens, fewer than one batch of 8"):
        pipeline.batch_dataset(_numbered(3), 8, seed=0)
    with pytest.raises(ValueError, match="seed"):
        pipeline.batch_dataset(_numbered(10), 2, seed=-1)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tiny_tfds.prepare(tmp_path_factory.mktemp("tfds"))


def _tfds_config(tiny_config, tfds_dir):
    tiny_config.data.train_files = f"tfds:{tiny_tfds.NAME}:train"
    tiny_config.data.eval_files = f"tfds:{tiny_tfds.NAME}:validation"
    tiny_config.data.tfds_data_dir = str(tfds_dir)
    tiny_config.data.text_field = "body"
    return tiny_config


def test_restored_iterator_continues_like_an_uninterrupted_one(tiny_config, tfds_dir, tmp_path):
    """Stop after k batches, save the iterator in an orbax checkpoint, restore it into a fresh
    iterator: the next batches are those of the uninterrupted iterator."""
    inputs = prepare(_tfds_config(tiny_config, tfds_dir), tmp_path / "run")
    rows = slice(2, 4)  # the second of two shards of a batch of 4
    assert inputs.config.train.batch_size == 4

    def iterator(start_step: int = 0):
        return pipeline.train_iterator(
            inputs.train_blocks, None, 4, inputs.config.train.seed, rows=rows, start_step=start_step
        )

    uninterrupted = iterator()
    expected = [next(uninterrupted) for _ in range(12)]

    k = 5
    stopped = iterator()
    for batch in expected[:k]:
        np.testing.assert_array_equal(next(stopped), batch)
    manager = checkpoints.checkpoint_manager(tmp_path / "ckpt", keep=2)
    state = {"step": np.int32(k)}
    checkpoints.save(manager, k, state, {"next_batch": k}, stopped)
    next(stopped)  # consumed after the save: not part of the checkpoint
    manager.wait_until_finished()

    resumed = iterator()
    abstract = {"step": jax.ShapeDtypeStruct((), np.int32)}
    step, _, position, iterator_restored = checkpoints.restore_latest(manager, abstract, resumed)
    manager.close()
    assert (step, position, iterator_restored) == (k, {"next_batch": k}, True)
    for batch in expected[k:]:
        np.testing.assert_array_equal(next(resumed), batch)
    # Without a saved state (another process count), starting at the step gives the same.
    started = iterator(start_step=k)
    np.testing.assert_array_equal(next(started), expected[k])


@pytest.mark.slow
def test_training_from_a_tfds_source_end_to_end(tiny_config, tfds_dir, tmp_path):
    config = _tfds_config(tiny_config, tfds_dir)
    workdir = tmp_path / "run"
    train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    records = read_metrics(workdir)
    assert records[-1]["step"] == config.train.steps
    assert np.isfinite(records[-1]["eval_mlm_loss"])
    assert (workdir / "checkpoints" / "6" / "iterator" / "process_0-of-1.json").is_file()
    assert len(list((workdir / "token_cache").iterdir())) == 2  # train and eval blocks
