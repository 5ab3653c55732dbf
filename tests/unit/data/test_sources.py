"""Sources of text: TFDS splits (a tiny dataset prepared locally), globs, sampling, errors."""

from __future__ import annotations

import ml_collections
import pytest
import tiny_tfds

from conftest import write_corpus
from guided_jax.data import sources
from guided_jax.data.text import CorpusError


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    return tiny_tfds.prepare(tmp_path_factory.mktemp("tfds"))


def _data_config(data_dir="", field="body", documents="line") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(tfds_data_dir=str(data_dir), text_field=field, documents=documents)
    )


def _parse(value, **kwargs):
    return sources.parse_sources(value, "data.train_files", _data_config(**kwargs))


def test_tfds_split_reads_every_document_as_text(tfds_dir, monkeypatch):
    monkeypatch.setattr(sources, "_READ_CHUNK", 7)  # batched reads that do not divide 60
    (split,) = _parse(f"tfds:{tiny_tfds.NAME}:validation", data_dir=tfds_dir)
    assert split.num_documents() == tiny_tfds.SPLITS["validation"]
    docs = list(split.documents())
    assert all(isinstance(d, str) for d in docs)  # array_record stores bytes
    # TFDS shuffles records on write: compare as sets.
    expected = {tiny_tfds.document("validation", i) for i in range(60)}
    assert len(docs) == 60 and set(docs) == expected
    assert "tiny_corpus/1.0.0" in sources.fingerprint([split])


def test_tfds_slice_split(tfds_dir):
    (split,) = _parse(f"tfds:{tiny_tfds.NAME}:train[:10%]", data_dir=tfds_dir)
    assert split.num_documents() == 30


@pytest.mark.parametrize(
    ("spec", "field", "match"),
    [
        ("tfds:no_such_corpus:train", "body", r"unknown TFDS dataset 'no_such_corpus'.*tfds build"),
        (f"tfds:{tiny_tfds.NAME}:test", "body", r"unknown split 'test'.*\['train', 'validation'\]"),
        (
            f"tfds:{tiny_tfds.NAME}:train",
            "text",
            r"no field 'text'; its fields are \['body', 'id'\]",
        ),
        (f"tfds:{tiny_tfds.NAME}:train", "id", "holds int"),
        ("tfds:train", "body", "should be tfds:NAME"),
    ],
)
def test_tfds_errors_name_the_culprit(tfds_dir, spec, field, match):
    with pytest.raises(CorpusError, match=match):
        for split in _parse(spec, data_dir=tfds_dir, field=field):
            next(split.documents())


def test_tfds_dataset_not_prepared_says_how_to_prepare(tmp_path, tfds_dir):
    # The builder is registered (its module is imported) but this data_dir holds nothing.
    (split,) = _parse(f"tfds:{tiny_tfds.NAME}:train", data_dir=tmp_path / "empty")
    with pytest.raises(CorpusError, match=r"not prepared in .*empty.*tfds build tiny_corpus"):
        split.num_documents()


def test_globs_expand_sorted_and_empty_glob_is_refused(tmp_path, monkeypatch):
    for name in ("b.txt", "a.txt", "skip.md"):
        write_corpus(tmp_path / name, lines=3)
    (files,) = _parse(str(tmp_path / "*.txt"))
    assert files.files == (str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))
    monkeypatch.chdir(tmp_path)
    assert _parse("*.txt")[0].files == ("a.txt", "b.txt")
    with pytest.raises(CorpusError, match=r"data.train_files: the pattern '\*.json' matches no"):
        _parse("*.json")


def test_mixed_sources_keep_their_order(tmp_path, tfds_dir):
    write_corpus(tmp_path / "a.txt", lines=5)
    found = _parse(f"{tmp_path / 'a.txt'}, tfds:{tiny_tfds.NAME}:validation", data_dir=tfds_dir)
    assert [type(s).__name__ for s in found] == ["TextFiles", "TfdsSplit"]
    assert sources.count_documents(found) is None  # text files are not counted up front
    assert len(list(sources.documents(found))) == 65
    with pytest.raises(CorpusError, match="cache: source must be the only source"):
        _parse(f"cache:{tmp_path}, {tmp_path / 'a.txt'}")
    (cached,) = _parse(f"cache:{tmp_path}")
    with pytest.raises(CorpusError, match="holds tokens, not text"):
        next(cached.documents())


def test_paragraph_documents(tmp_path):
    (tmp_path / "p.txt").write_text("one\ntwo\n\nthree\n")
    (files,) = _parse(str(tmp_path / "p.txt"), documents="paragraph")
    assert list(files.documents()) == ["one\ntwo", "three"]


def test_sampling_for_tokenizer_training(tmp_path, tfds_dir):
    write_corpus(tmp_path / "a.txt", lines=50)
    text = _parse(str(tmp_path / "a.txt"))
    everything = list(sources.documents(text))
    # A corpus within the limit is used whole and in order.
    assert sources.sample_documents(text, 50, seed=0) == everything
    assert sources.sample_documents(text, 0, seed=0) == everything
    # Larger: a uniform sample in corpus order, the same for the same seed.
    sample = sources.sample_documents(text, 10, seed=0)
    assert len(sample) == 10 and sample == sources.sample_documents(text, 10, seed=0)
    assert sample != sources.sample_documents(text, 10, seed=1)
    positions = [everything.index(doc) for doc in sample]
    assert positions == sorted(positions)
    # Random access (TFDS): drawn without reading the rest.
    tfds_split = _parse(f"tfds:{tiny_tfds.NAME}:train", data_dir=tfds_dir)
    drawn = sources.sample_documents(tfds_split, 25, seed=0)
    assert len(set(drawn)) == 25 and set(drawn) <= set(sources.documents(tfds_split))
