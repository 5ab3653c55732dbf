"""Tokenize once (guided_jax.data.token_cache): the cache packs like the reference, and a run's
inputs (guided_jax.train.inputs.prepare) read it instead of tokenizing again."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import write_corpus
from guided_jax.config import ConfigError
from guided_jax.data import token_cache
from guided_jax.data.text import CorpusError, read_text_files
from guided_jax.data.tokenizer import train_tokenizer
from guided_jax.train.inputs import prepare


def test_streamed_packing_equals_packing_the_whole_stream(tmp_path, monkeypatch):
    docs = read_text_files([write_corpus(tmp_path / "c.txt", lines=80)])
    tokenizer = train_tokenizer(docs, 300, tmp_path / "tok")
    monkeypatch.setattr(token_cache, "_CHUNK_DOCUMENTS", 7)  # many chunk boundaries
    blocks = token_cache.build(docs, tokenizer, 16, tmp_path / "entry", {"k": 1}, total=len(docs))
    assert isinstance(blocks, np.memmap) and blocks.dtype == np.int32
    # The whole stream at once: every document and its newline, cut into 14 text tokens per
    # block between bos and eos, the remainder dropped.
    stream = np.concatenate(tokenizer.encode_batch([doc + "\n" for doc in docs]))
    chunks = stream[: len(stream) // 14 * 14].reshape(-1, 14)
    column = np.ones((len(chunks), 1), np.int32)
    want = np.concatenate([column * tokenizer.bos_id, chunks, column * tokenizer.eos_id], axis=1)
    np.testing.assert_array_equal(blocks, want)
    meta = token_cache.read_meta(tmp_path / "entry")
    assert meta["k"] == 1 and meta["num_blocks"] == len(blocks) and meta["block_size"] == 16
    with pytest.raises(CorpusError, match="fewer than one block of block_size 512"):
        token_cache.build(docs[:1], tokenizer, 512, tmp_path / "short", {})
    assert not (tmp_path / "short").exists()


def test_second_prepare_reads_the_cache_instead_of_tokenizing(tiny_config, tmp_path, monkeypatch):
    first = prepare(tiny_config, tmp_path / "run")
    (entry,) = (tmp_path / "run" / "token_cache").iterdir()

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(token_cache, "build", no_tokenizing)
    again = prepare(tiny_config, tmp_path / "run")
    np.testing.assert_array_equal(again.train_blocks, first.train_blocks)
    np.testing.assert_array_equal(again.eval_blocks, first.eval_blocks)
    # A changed corpus is tokenized anew, into its own entry.
    monkeypatch.undo()
    write_corpus(tmp_path / "corpus.txt", lines=400, seed=5)
    prepare(tiny_config, tmp_path / "other")
    grown = prepare(tiny_config, tmp_path / "other")
    assert len(grown.train_blocks) > len(first.train_blocks)
    assert entry.name not in {p.name for p in (tmp_path / "other" / "token_cache").iterdir()}


def test_a_cache_directory_is_a_source(tiny_config, tmp_path):
    first = prepare(tiny_config, tmp_path / "run")
    (entry,) = (tmp_path / "run" / "token_cache").iterdir()
    tiny_config.data.train_files = f"cache:{entry}"
    tiny_config.data.tokenizer_dir = str(tmp_path / "run" / "tokenizer")
    reused = prepare(tiny_config, tmp_path / "reuse")
    np.testing.assert_array_equal(reused.train_blocks, first.train_blocks)
    assert not (tmp_path / "reuse" / "token_cache").exists()

    tiny_config.data.block_size = 16
    with pytest.raises(ConfigError, match=r"holds blocks of 32, but data\.block_size=16"):
        prepare(tiny_config, tmp_path / "bad")
    tiny_config.data.block_size = 32
    other_tok = train_tokenizer(["other words here"] * 5, 300, tmp_path / "tok2")
    tiny_config.data.tokenizer_dir = str(other_tok.directory)
    with pytest.raises(ConfigError, match="made with another tokenizer"):
        prepare(tiny_config, tmp_path / "bad")
    tiny_config.data.train_files = f"cache:{tmp_path}"
    with pytest.raises(CorpusError, match="is not a token cache"):
        prepare(tiny_config, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_refused_corpus_leaves_nothing_in_the_cache(tiny_config, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    tiny_config.data.cache_dir = str(cache)
    tiny_config.train.batch_size = 4096
    with pytest.raises(CorpusError, match="fewer than one batch of 4096"):
        prepare(tiny_config, tmp_path / "run")
    assert list(cache.iterdir()) == [] and not (tmp_path / "run").exists()


def test_damaged_entry_is_reported(tiny_config, tmp_path):
    prepare(tiny_config, tmp_path / "run")
    (entry,) = (tmp_path / "run" / "token_cache").iterdir()
    with open(entry / token_cache.BLOCKS_FILE, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CorpusError, match=r"damaged.*delete that directory"):
        prepare(tiny_config, tmp_path / "run")
