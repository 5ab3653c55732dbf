"""A corpus prepared offline with Apache Beam (guided_jax.train.offline, guided_jax.data.prepared,
guided_jax.data.beam_pipeline): the same blocks as the in-process token cache, whatever the
engine, in shards that each process reads its own rows from; text files streamed."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from conftest import REPO, cli_env, write_corpus
from guided_jax.config import load_config
from guided_jax.data import pipeline, prepared, sources, text, token_cache
from guided_jax.data.text import CorpusError, read_text_file
from guided_jax.data.tokenizer import load_tokenizer, train_tokenizer
from guided_jax.train.inputs import corpus_sources
from guided_jax.train.offline import prepare_offline

IN_MEMORY = ["--runner=DirectRunner"]


def _tiny(**data) -> object:
    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.data.update(data)
    return config


def _in_process(config, what: str, tokenizer, out: Path):
    """The blocks and start flags the token cache builds in a run's process (the reference)."""
    found = corpus_sources(config, f"{what}_files")
    reference = config.data.format == "reference_text"
    blocks = token_cache.build(
        sources.documents(found),
        tokenizer,
        config.data.block_size,
        out,
        {},
        separator="" if reference else "\n",
        document_starts=bool(config.data.document_masks),
        reference_text=reference,
    )
    return np.array(blocks), token_cache.load_starts(out)


def _shard_records(entry: str | Path) -> list[list[bytes]]:
    """Every shard's records, shards in the order of their file names, read with ArrayRecord's
    own reader (not the code under test)."""
    shards = []
    for name in sorted(os.listdir(entry)):
        if name.endswith(".array_record"):
            reader = ArrayRecordReader(str(Path(entry, name)))
            shards.append(list(reader.read_all()))
            reader.close()
    return shards


def _decode(records: list[bytes], dtype: str, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.stack([np.frombuffer(r, dtype, count=block_size) for r in records])
    tail = [
        np.frombuffer(r, np.uint8, offset=block_size * np.dtype(dtype).itemsize) for r in records
    ]
    return ids.astype(np.int32), np.stack(tail)


def _assert_same_blocks(entry: str, want: np.ndarray, want_starts, dtype: str) -> None:
    """The same multiset of blocks, and the same order when read shard by shard, record by
    record; uint16 or int32 as expected, start flags after the ids where there are any."""
    shards = _shard_records(entry)
    records = list(itertools.chain.from_iterable(shards))
    block_size = want.shape[1]
    flag_bytes = 0 if want_starts is None else block_size
    assert {len(r) for r in records} == {block_size * np.dtype(dtype).itemsize + flag_bytes}
    ids, flags = _decode(records, dtype, block_size)
    assert Counter(map(bytes, ids)) == Counter(map(bytes, want))
    np.testing.assert_array_equal(ids, want)
    if want_starts is not None:
        np.testing.assert_array_equal(flags, want_starts)
    meta = json.loads(Path(entry, "meta.json").read_text())
    assert [s["blocks"] for s in meta["shards"]] == [len(s) for s in shards]
    assert meta["num_blocks"] == len(want) and meta["dtype"] == dtype


# ----------------------------------------------------------------------------------- same data


@pytest.mark.slow
def _prepare_command(*flags: str) -> subprocess.CompletedProcess:
    """python -m guided_jax.prepare on configs/tiny.py with the DirectRunner's two worker
    processes."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "guided_jax.prepare", "--config=configs/tiny.py", *flags),
            *("--runner=DirectRunner", "--direct_num_workers=2"),
            "--direct_running_mode=multi_processing",
        ],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_prepare_command_on_several_workers_gives_the_in_process_blocks(tmp_path):
    """python -m guided_jax.prepare with the DirectRunner's two worker processes: every
    entry (train, eval) holds the blocks and document starts the in-process cache builds, with
    the key a run computes and the tokenizer a run trains."""
    files = [write_corpus(tmp_path / f"part{i}.txt", lines=150, seed=i) for i in range(3)]
    valid = write_corpus(tmp_path / "valid.txt", lines=60, seed=9)
    config = _tiny(train_files=",".join(map(str, files)), eval_files=str(valid))
    config.data.document_masks = True
    out = tmp_path / "prepared"
    flags = [
        f"--config.data.train_files={config.data.train_files}",
        f"--config.data.eval_files={valid}",
        "--config.data.document_masks=true",
    ]
    result = _prepare_command(f"--out={out}", *flags, "--num_shards=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not result.stderr, result.stderr  # nor the worker processes' start-up logs
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout  # quiet: the tokenizer and one line per entry
    (tokenizer_dir,) = (out / "tokenizers").iterdir()
    assert lines[0] == f"tokenizer: {tokenizer_dir}"
    # the tokenizer a run of this config trains
    train_tokenizer(
        list(sources.documents(corpus_sources(config, "train_files"))), 400, tmp_path / "tok"
    )
    for name in ("vocab.json", "merges.txt"):
        assert (tokenizer_dir / name).read_bytes() == (tmp_path / "tok" / name).read_bytes()
    tokenizer = load_tokenizer(tokenizer_dir)
    for what in ("train", "eval"):
        blocks, starts = _in_process(config, what, tokenizer, tmp_path / f"cache_{what}")
        tokens = token_cache.read_meta(tmp_path / f"cache_{what}")["tokens"]
        key, _ = token_cache.cache_key(
            tokenizer,
            sources.fingerprint(corpus_sources(config, f"{what}_files")),
            32,
            "\n",
            document_starts=True,
        )
        _assert_same_blocks(str(out / key), blocks, starts, "<u2")
        shards = len(_shard_records(out / key))
        assert shards == 3 or what == "eval"
        assert (
            f"{what}: prepared {shards} shards, {len(blocks)} blocks, {tokens} tokens "
            f"(uint16) in {out / key}" in lines
        )


def test_reference_text_files_pack_as_the_in_process_cache(tmp_path):
    """data.format=reference_text: whole files, the reference's rule for special tokens, one
    stream over the files."""
    first = tmp_path / "a.txt"
    first.write_text(write_corpus(tmp_path / "x.txt", lines=90).read_text() + "\n\n <unk> end\n")
    second = write_corpus(tmp_path / "b.txt", lines=70, seed=3)
    config = _tiny(train_files=f"{first},{second}", format="reference_text")
    _, (entry,) = prepare_offline(config, tmp_path / "out", IN_MEMORY, num_shards=4)
    tokenizer = load_tokenizer(next((tmp_path / "out" / "tokenizers").iterdir()))
    blocks, _ = _in_process(config, "train", tokenizer, tmp_path / "cache")
    assert entry.shards == 4 and entry.blocks == len(blocks)
    _assert_same_blocks(entry.path, blocks, None, "<u2")


def test_tfds_records_and_text_files_pack_as_the_in_process_cache(tmp_path, monkeypatch):
    """A TFDS split read in ranges of records (here 64 to a worker), then a text file."""
    import tiny_tfds

    from guided_jax.data import beam_pipeline

    monkeypatch.setattr(beam_pipeline, "TFDS_RECORDS", 64)
    data_dir = tiny_tfds.prepare(tmp_path / "tfds")
    text_file = write_corpus(tmp_path / "c.txt", lines=40)
    config = _tiny(
        train_files=f"tfds:{tiny_tfds.NAME}:train,{text_file}",
        tfds_data_dir=str(data_dir),
        text_field="body",
    )
    _, (entry,) = prepare_offline(config, tmp_path / "out", IN_MEMORY, num_shards=2)
    tokenizer = load_tokenizer(next((tmp_path / "out" / "tokenizers").iterdir()))
    blocks, _ = _in_process(config, "train", tokenizer, tmp_path / "cache")
    _assert_same_blocks(entry.path, blocks, None, "<u2")


def test_a_vocabulary_of_65536_rows_or_more_is_stored_as_int32(tmp_path):
    words = [f"w{i}" for i in range(70_000)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tok / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    rng = np.random.default_rng(0)
    corpus = tmp_path / "high.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 9)) for _ in range(200)) + "\n")
    config = _tiny(train_files=str(corpus), tokenizer_dir=str(tok))
    _, (entry,) = prepare_offline(config, tmp_path / "out", IN_MEMORY, num_shards=2)
    tokenizer = load_tokenizer(tok)
    blocks, _ = _in_process(config, "train", tokenizer, tmp_path / "cache")
    assert blocks.max() >= 65_536  # ids that uint16 would wrap
    assert entry.dtype == "int32"
    _assert_same_blocks(entry.path, blocks, None, "<i4")


def test_token_dtype_follows_the_vocabulary_rows():
    assert prepared.token_dtype(65_535) == np.dtype("<u2")
    assert prepared.token_dtype(65_536) == np.dtype("<i4")
    with pytest.raises(ValueError, match="does not fit uint16"):
        list(prepared.encode_records(np.array([[0, 65_536]]), None, np.dtype("<u2")))


def test_a_worker_s_corpus_error_comes_back_and_nothing_is_complete(tmp_path):
    good = write_corpus(tmp_path / "good.txt", lines=50)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nna\xefve\n")
    tok = tmp_path / "tok"
    train_tokenizer(read_text_file(good), 300, tok)
    config = _tiny(train_files=f"{good},{bad}", tokenizer_dir=str(tok))
    threads = [*IN_MEMORY, "--direct_num_workers=2", "--direct_running_mode=multi_threading"]
    # from worker threads (or processes) the runner raises its own error with the traceback
    with pytest.raises(CorpusError, match=r"bad.txt' is not valid UTF-8: byte 0xef .* \(line 2\)"):
        prepare_offline(config, tmp_path / "out", threads)
    assert not list((tmp_path / "out").rglob("meta.json"))
    config = _tiny(train_files=str(bad), tokenizer_dir=str(tok))
    bad.write_text("only a few words\n")
    with pytest.raises(CorpusError, match="fewer than one block of block_size 32"):
        prepare_offline(config, tmp_path / "short", IN_MEMORY)
    assert not list((tmp_path / "short").rglob("meta.json"))


def test_a_worker_process_s_corpus_error_is_one_line_on_the_screen(tmp_path):
    """The DirectRunner's worker processes print every traceback on the stderr they inherit;
    the command shows only its own line, which names the file and the byte."""
    good = write_corpus(tmp_path / "good.txt", lines=50)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nna\xefve\n")
    tok = tmp_path / "tok"
    train_tokenizer(read_text_file(good), 300, tok)
    result = _prepare_command(
        f"--out={tmp_path / 'out'}",
        f"--config.data.train_files={good},{bad}",
        f"--config.data.tokenizer_dir={tok}",
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"guided_jax.prepare: error: corpus file '{bad}' is not valid UTF-8")
    assert not list((tmp_path / "out").rglob("meta.json"))


def test_bad_flags_are_refused_before_any_work(tmp_path):
    config = _tiny(train_files=str(write_corpus(tmp_path / "c.txt", lines=20)))
    with pytest.raises(ValueError, match="unknown flag --direct_num_wrokers"):
        prepare_offline(config, tmp_path / "out", ["--direct_num_wrokers=2"])
    with pytest.raises(ValueError, match="--out 's3://b/x'"):
        prepare_offline(config, "s3://b/x", IN_MEMORY)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- reading shards


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    """A prepared corpus of 3 shards with document starts, and the in-process blocks."""
    root = tmp_path_factory.mktemp("entry")
    config = _tiny(train_files=str(write_corpus(root / "c.txt", lines=120)), document_masks=True)
    _, (found,) = prepare_offline(config, root / "out", IN_MEMORY, num_shards=3)
    tokenizer = load_tokenizer(next((root / "out" / "tokenizers").iterdir()))
    blocks, starts = _in_process(config, "train", tokenizer, root / "cache")
    return found.path, blocks, np.array(starts)


class _Counting:
    """A data source that records which records were read."""

    def __init__(self, source):
        self.source, self.read = source, []

    def __getitem__(self, key):
        self.read.append(int(key))
        return self.source[key]

    def __getitems__(self, keys):
        self.read.extend(int(k) for k in keys)
        return self.source.__getitems__(keys)


def test_prepared_blocks_read_records_by_random_access(entry):
    path, blocks, starts = entry
    loaded = token_cache.load(path)
    assert isinstance(loaded, prepared.PreparedBlocks) and loaded.shape == blocks.shape
    np.testing.assert_array_equal(loaded[len(blocks) - 1], blocks[-1])
    tail = loaded[5:9]  # a view: reads nothing until indexed
    assert len(tail) == 4 and tail.shape == (4, 32)
    np.testing.assert_array_equal(tail.copy(), blocks[5:9])
    np.testing.assert_array_equal(np.asarray(token_cache.load_starts(path)[2:4]), starts[2:4])
    both = pipeline.examples(loaded, token_cache.load_starts(path))
    np.testing.assert_array_equal(both[3], np.stack([blocks[3], starts[3]]))


def test_each_process_reads_only_the_records_of_its_rows(entry, monkeypatch):
    path, blocks, _ = entry
    reads = {}

    def dataset(rows):
        loaded = token_cache.load(path)
        counting = _Counting(loaded._shards.source())
        monkeypatch.setattr(loaded._shards, "source", lambda: counting)
        reads[rows.start] = counting.read
        return pipeline.batch_dataset(loaded, 4, seed=3, rows=rows)

    first, second = dataset(slice(0, 2)), dataset(slice(2, 4))
    whole = pipeline.batch_dataset(blocks, 4, seed=3)
    for step in range(5):
        np.testing.assert_array_equal(np.concatenate([first[step], second[step]]), whole[step])
    assert len(reads[0]) == len(reads[2]) == 10  # two records a step each, nothing else
    assert not set(reads[0]) & set(reads[2])


def test_the_iterator_over_shards_resumes_exactly(entry):
    path, blocks, starts = entry
    loaded, flags = token_cache.load(path), token_cache.load_starts(path)
    iterator = pipeline.train_iterator(loaded, flags, 4, seed=1)
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(4)]
    resumed = pipeline.train_iterator(token_cache.load(path), flags, 4, seed=1)
    resumed.set_state(state)
    in_memory = pipeline.train_iterator(blocks, starts, 4, seed=1, start_step=3)
    got = [next(resumed) for _ in range(4)]
    for want, got_one, same in zip(expected, got, itertools.islice(in_memory, 4), strict=True):
        np.testing.assert_array_equal(got_one, want)
        np.testing.assert_array_equal(got_one, same)


def test_prepared_corpus_on_cloud_storage_is_read_in_place(tmp_path, gcs_dir, monkeypatch):
    """--out gs://...: shards uploaded whole, meta.json last; read straight from the bucket
    (ArrayRecord's own Cloud Storage client), with no local copy."""
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", os.environ["STORAGE_EMULATOR_HOST"])
    local_copy = token_cache.storage.local_copy

    def no_copy_from_the_bucket(location):
        assert not str(location).startswith("gs://"), f"copied {location}"
        return local_copy(location)

    monkeypatch.setattr(token_cache.storage, "local_copy", no_copy_from_the_bucket)
    corpus = write_corpus(tmp_path / "c.txt", lines=80)
    tok = tmp_path / "tok"
    train_tokenizer(read_text_file(corpus), 300, tok)
    config = _tiny(train_files=str(corpus), tokenizer_dir=str(tok))
    _, (found,) = prepare_offline(config, gcs_dir, IN_MEMORY, num_shards=2)
    assert found.path.startswith(gcs_dir) and found.shards == 2
    blocks, _ = _in_process(config, "train", load_tokenizer(tok), tmp_path / "cache")
    loaded = token_cache.load(found.path)
    assert isinstance(loaded, prepared.PreparedBlocks) and loaded.shape == blocks.shape
    for index in (0, len(blocks) // 2 + 1, len(blocks) - 1):  # both shards (a read is a GET)
        np.testing.assert_array_equal(loaded[index], blocks[index])
    _, (again,) = prepare_offline(config, gcs_dir, IN_MEMORY)
    assert again.reused and again.path == found.path


# ------------------------------------------------------------------------------ streamed text


def _whole_file_documents(raw: bytes, documents: str) -> list[str]:
    """How a file splits into documents when read whole (independent of the streaming code)."""
    lines = [line.removesuffix("\r") for line in raw.decode().removeprefix("\ufeff").split("\n")]
    if documents == "line":
        return [line for line in lines if line.strip()]
    groups = itertools.groupby(lines, key=lambda line: bool(line.strip()))
    return ["\n".join(group) for nonblank, group in groups if nonblank]


@pytest.mark.parametrize("documents", ["line", "paragraph"])
def test_streamed_reading_equals_reading_the_whole_file(tmp_path, monkeypatch, documents):
    monkeypatch.setattr(text, "_READ_BYTES", 7)  # reads end inside lines and characters
    raw = "\ufeffcafé ✓ one\r\nsame paragraph\n\n \nnext ünïcode line\n\n\nlast".encode()
    path = tmp_path / "c.txt"
    path.write_bytes(raw)
    assert read_text_file(path, documents) == _whole_file_documents(raw, documents)
    long = write_corpus(tmp_path / "long.txt", lines=40).read_bytes()
    assert read_text_file(tmp_path / "long.txt", documents) == _whole_file_documents(
        long, documents
    )
    whole = read_text_file(path, "file")
    assert whole == [raw.decode().removeprefix("\ufeff").replace("\r\n", "\n")]


def test_streamed_errors_name_the_whole_file_s_offset_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "_READ_BYTES", 5)
    path = tmp_path / "bad.txt"
    path.write_bytes(b"first\nsecond\nthird na\xefve\nfourth\n")
    with pytest.raises(CorpusError, match=r"byte 0xef at byte offset 21 \(line 3\)"):
        read_text_file(path)
    # a NUL byte anywhere is reported first, as when the file is read whole
    path.write_bytes(b"first\nna\xefve\nmore text\x00\n")
    with pytest.raises(CorpusError, match=r"looks binary .*byte offset 21"):
        read_text_file(path)


def test_command_refuses_a_misspelt_config_key_and_stray_words(tmp_path):
    base = [sys.executable, "-m", "guided_jax.prepare", "--config=configs/tiny.py"]
    for extra, error in [
        (["--config.data.trian_files=x.txt"], "unknown config key data.trian_files; did you mean"),
        (["stray"], "unexpected argument 'stray'"),
    ]:
        result = subprocess.run(
            [*base, f"--out={tmp_path / 'out'}", *extra],
            cwd=REPO,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode != 0 and error in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_without_apache_beam_the_command_says_what_to_install(tmp_path, monkeypatch):
    import guided_jax.data

    monkeypatch.delattr(guided_jax.data, "beam_pipeline")  # imported again, without Beam
    monkeypatch.delitem(sys.modules, "guided_jax.data.beam_pipeline")
    monkeypatch.setitem(sys.modules, "apache_beam", None)
    config = _tiny(train_files=str(write_corpus(tmp_path / "c.txt", lines=20)))
    with pytest.raises(
        ValueError, match=r"apache-beam is not installed: pip install -e '.\[prepare\]'"
    ):
        prepare_offline(config, tmp_path / "out", IN_MEMORY)
    assert not (tmp_path / "out").exists()
