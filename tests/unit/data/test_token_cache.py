"""Tokenize once: the token cache packs like the reference and reruns skip tokenization."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_corpus
from guided_jax import data, experiment, token_cache
from guided_jax.data import CorpusError
from guided_jax.tokenizer import train_tokenizer


def test_streamed_packing_equals_packing_the_whole_stream(tmp_path, monkeypatch):
    docs = data.read_text_files([write_corpus(tmp_path / "c.txt", lines=80)])
    tokenizer = train_tokenizer(docs, 300, tmp_path / "tok")
    monkeypatch.setattr(token_cache, "_CHUNK_DOCUMENTS", 7)  # many chunk boundaries
    blocks = token_cache.build(docs, tokenizer, 16, tmp_path / "entry", {"k": 1}, total=len(docs))
    assert isinstance(blocks, np.memmap) and blocks.dtype == np.int32
    np.testing.assert_array_equal(blocks, data.tokenize_and_pack(docs, tokenizer, 16))
    meta = token_cache.read_meta(tmp_path / "entry")
    assert meta["k"] == 1 and meta["num_blocks"] == len(blocks) and meta["block_size"] == 16
    with pytest.raises(CorpusError, match="fewer than one block of block_size 512"):
        token_cache.build(docs[:1], tokenizer, 512, tmp_path / "short", {})
    assert not (tmp_path / "short").exists()


def test_second_prepare_reads_the_cache_instead_of_tokenizing(tiny_config, tmp_path, monkeypatch):
    first = experiment.prepare(tiny_config, tmp_path / "run")
    (entry,) = (tmp_path / "run" / "token_cache").iterdir()

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(token_cache, "build", no_tokenizing)
    again = experiment.prepare(tiny_config, tmp_path / "run")
    np.testing.assert_array_equal(again.train_blocks, first.train_blocks)
    np.testing.assert_array_equal(again.eval_blocks, first.eval_blocks)
    # A changed corpus is tokenized anew, into its own entry.
    monkeypatch.undo()
    write_corpus(tmp_path / "corpus.txt", lines=400, seed=5)
    experiment.prepare(tiny_config, tmp_path / "other")
    grown = experiment.prepare(tiny_config, tmp_path / "other")
    assert len(grown.train_blocks) > len(first.train_blocks)
    assert entry.name not in {p.name for p in (tmp_path / "other" / "token_cache").iterdir()}


def test_a_cache_directory_is_a_source(tiny_config, tmp_path):
    first = experiment.prepare(tiny_config, tmp_path / "run")
    (entry,) = (tmp_path / "run" / "token_cache").iterdir()
    tiny_config.data.train_files = f"cache:{entry}"
    tiny_config.data.tokenizer_dir = str(tmp_path / "run" / "tokenizer")
    reused = experiment.prepare(tiny_config, tmp_path / "reuse")
    np.testing.assert_array_equal(reused.train_blocks, first.train_blocks)
    assert not (tmp_path / "reuse" / "token_cache").exists()

    tiny_config.data.block_size = 16
    with pytest.raises(
        experiment.ConfigError, match=r"holds blocks of 32, but data\.block_size=16"
    ):
        experiment.prepare(tiny_config, tmp_path / "bad")
    tiny_config.data.block_size = 32
    other_tok = train_tokenizer(["other words here"] * 5, 300, tmp_path / "tok2")
    tiny_config.data.tokenizer_dir = str(other_tok.directory)
    with pytest.raises(experiment.ConfigError, match="made with another tokenizer"):
        experiment.prepare(tiny_config, tmp_path / "bad")
    tiny_config.data.train_files = f"cache:{tmp_path}"
    with pytest.raises(CorpusError, match="is not a token cache"):
        experiment.prepare(tiny_config, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_refused_corpus_leaves_nothing_in_the_cache(tiny_config, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    tiny_config.data.cache_dir = str(cache)
    tiny_config.train.batch_size = 4096
    with pytest.raises(CorpusError, match="fewer than one batch of 4096"):
        experiment.prepare(tiny_config, tmp_path / "run")
    assert list(cache.iterdir()) == [] and not (tmp_path / "run").exists()


def test_damaged_entry_is_reported(tiny_config, tmp_path):
    experiment.prepare(tiny_config, tmp_path / "run")
    (entry,) = (tmp_path / "run" / "token_cache").iterdir()
    with open(entry / token_cache.BLOCKS_FILE, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CorpusError, match=r"damaged.*delete that directory"):
        experiment.prepare(tiny_config, tmp_path / "run")
