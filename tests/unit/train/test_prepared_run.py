"""Training from a corpus prepared offline (python -m guided_jax.prepare, then data.cache_dir):
nothing is tokenized, the losses are those of the in-process run, resume stays exact; and raw
text above data.max_inline_bytes is refused before anything is written."""

from __future__ import annotations

import os
import shutil

import jax
import pytest

from conftest import REPO
from guided_jax.config import ConfigError, load_config
from guided_jax.data import token_cache
from guided_jax.data.prepared import PreparedBlocks
from guided_jax.train import inputs
from guided_jax.train.loop import train_and_evaluate
from guided_jax.train.metrics import read_metrics
from guided_jax.train.offline import prepare_offline
from guided_jax.weights.workdir import read_run_config

ONE_DEVICE = jax.devices()[:1]


def _without_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in records]


def _tiny_run_config(tiny_run):
    """conftest's tiny_run config: the same corpus file, head diagnostics on."""
    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.data.train_files = read_run_config(tiny_run).data.train_files
    config.train.diagnostics = True
    return config


def _no_tokenizing(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("tokenized or trained a tokenizer in the run")

    monkeypatch.setattr(token_cache, "build", refuse)
    monkeypatch.setattr(inputs, "train_tokenizer", refuse)


@pytest.mark.slow
def test_a_run_on_the_prepared_shards_trains_and_resumes_as_the_in_process_run(
    tiny_run, tmp_path, monkeypatch
):
    config = _tiny_run_config(tiny_run)
    prepare_offline(config, tmp_path / "prepared", ["--runner=DirectRunner"], num_shards=2)
    _no_tokenizing(monkeypatch)
    config.data.cache_dir = str(tmp_path / "prepared")
    config.data.max_inline_bytes = 1  # the prepared corpus is not raw text to tokenize
    run = tmp_path / "run"
    seen = []
    prepare = inputs.prepare
    monkeypatch.setattr(
        "guided_jax.train.loop.prepare", lambda *a, **k: seen.append(prepare(*a, **k)) or seen[-1]
    )
    train_and_evaluate(config, run, devices=ONE_DEVICE)
    assert isinstance(seen[0].train_blocks, PreparedBlocks)  # read from the shards
    assert _without_timing(read_metrics(run)) == _without_timing(read_metrics(tiny_run))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (run / "tokenizer" / name).read_bytes() == (
            tiny_run / "tokenizer" / name
        ).read_bytes()
    # Lose the final checkpoint, as if the run had died after step 3's save: the rerun
    # restores the data position and the iterator, and ends as the uninterrupted run.
    shutil.rmtree(run / "checkpoints" / "6")
    train_and_evaluate(config, run, devices=ONE_DEVICE)
    assert [r["step"] for r in read_metrics(run)] == [2, 3, 4, 6]
    assert _without_timing(read_metrics(run)) == _without_timing(read_metrics(tiny_run))


def test_raw_text_above_max_inline_bytes_is_refused_before_anything_is_written(
    tiny_config, tmp_path, monkeypatch
):
    _no_tokenizing(monkeypatch)  # refused before the tokenizer is trained
    size = sum(os.path.getsize(f) for f in tiny_config.data.train_files.split(","))
    tiny_config.data.max_inline_bytes = size - 1
    with pytest.raises(ConfigError) as refused:
        inputs.prepare(tiny_config, tmp_path / "run")
    message = str(refused.value)
    assert f"data.train_files holds {size:,} bytes of text" in message
    assert f"data.max_inline_bytes={size - 1:,}" in message
    assert "python -m guided_jax.prepare --config CONFIG --out DIR" in message
    assert "--config.data.cache_dir=DIR" in message
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    tiny_config.data.max_inline_bytes = size  # at the limit: tokenized in the run
    assert len(inputs.prepare(tiny_config, tmp_path / "run").train_blocks) > 0
