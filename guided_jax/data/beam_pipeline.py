"""The Apache Beam pipeline that tokenizes and packs a corpus into sharded ArrayRecord files
(:mod:`guided_jax.data.prepared`), with any Beam runner: the DirectRunner on one host,
Dataflow, Flink.

The blocks must be exactly those of the in-process token cache, which runs every document into
one token stream and cuts it every ``block_size - 2`` tokens. The pipeline gets there in four
steps, none of which holds the corpus in one place:

1. **read and tokenize**: each read unit (a text file, streamed; a range of TFDS records; the
   embedded corpus) becomes pieces of a few thousand documents, each tokenized as the
   in-process path tokenizes it and keyed by its place in the corpus
   ``(source, unit, piece)``;
2. **lay out**: the pieces' token counts, in key order, give each piece its first position
   in the stream, the number of blocks, and the shards (consecutive runs of blocks);
3. **cut**: each piece is cut by the shards its positions fall in;
4. **write**: each shard gathers its pieces, assembles its blocks and writes one ArrayRecord
   file; once every shard is written, ``meta.json`` is (the entry's completion mark).

Documents are streamed per unit, so a file is read by one worker: a corpus spread over many
files spreads over many workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions

from guided_jax import storage
from guided_jax.data import prepared, sources
from guided_jax.data.packing import start_flags
from guided_jax.data.text import CorpusError
from guided_jax.data.tokenizer import CONFIG_FILE, FILES_OF_KIND, Tokenizer, load_tokenizer

PIECE_DOCUMENTS = 4096  # documents per piece (one encode_batch call), as the token cache
PIECE_CHARACTERS = 1 << 23  # and at most about this much text
TFDS_RECORDS = 1 << 16  # TFDS records per read unit
SHARD_BYTES = 1 << 27  # the default shard size: about 128 MiB of records


@dataclasses.dataclass(frozen=True)
class ReadUnit:
    """What one worker reads: one text file, a range of TFDS records, or the embedded corpus."""

    source: sources.Source
    first: int = 0  # TFDS records [first, stop)
    stop: int = 0

    def documents(self) -> Iterator[str]:
        if isinstance(self.source, sources.TfdsSplit):
            return self.source.documents_between(self.first, self.stop)
        return self.source.documents()


def read_units(found: Sequence[sources.Source]) -> list[tuple[tuple[int, int], ReadUnit]]:
    """The read units of some sources with their place in the corpus, ``(source, unit)``."""
    units: list[tuple[tuple[int, int], ReadUnit]] = []
    for index, source in enumerate(found):
        if isinstance(source, sources.TextFiles):
            files = [sources.TextFiles((name,), source.mode) for name in source.files]
            units += [((index, i), ReadUnit(one)) for i, one in enumerate(files)]
        elif isinstance(source, sources.TfdsSplit):
            count = source.num_documents() or 0
            ranges = range(0, count, TFDS_RECORDS)
            units += [
                ((index, i), ReadUnit(source, a, min(a + TFDS_RECORDS, count)))
                for i, a in enumerate(ranges)
            ]
        elif isinstance(source, sources.DefaultCorpus):
            units.append(((index, 0), ReadUnit(source)))
        else:
            raise CorpusError(
                f"{source.describe()} is tokenized already; prepare text sources (files, "
                "tfds:..., or the embedded corpus)"
            )
    return units


@dataclasses.dataclass(frozen=True)
class Job:
    """One entry to prepare: where its text is, how to tokenize and pack it, where it goes."""

    label: str  # "train" or "eval": names the pipeline's steps
    units: list[tuple[tuple[int, int], ReadUnit]]
    tokenizer_files: dict[str, bytes]  # the tokenizer, shipped to the workers with the job
    block_size: int
    bos_id: int
    eos_id: int
    separator: str  # after each document ("" for whole files, which keep their newlines)
    reference_text: bool
    document_starts: bool
    dtype: str  # how records store token ids (prepared.token_dtype)
    num_shards: int  # 0: one shard per SHARD_BYTES of records
    out: str  # the entry's directory (local or gs://)
    meta: dict[str, Any]  # what meta.json records besides the counts


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, bytes]:
    """The files that load ``tokenizer`` again (its vocabulary and settings, nothing else of
    its directory)."""
    assert tokenizer.directory is not None
    names = [*FILES_OF_KIND[tokenizer.kind], CONFIG_FILE]
    return {
        name: (tokenizer.directory / name).read_bytes()
        for name in names
        if (tokenizer.directory / name).is_file()
    }


class _ReadAndTokenize(beam.DoFn):
    """A read unit → its pieces ``(key, ids, starts)``: int32 token ids of a few thousand
    documents run together (each followed by the separator), and their start flags."""

    def __init__(self, job: Job) -> None:
        self.files = job.tokenizer_files
        self.separator, self.reference_text = job.separator, job.reference_text
        self.document_starts = job.document_starts
        self.directory: str | None = None
        self.tokenizer: Tokenizer | None = None

    def setup(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="guided_jax_tokenizer_")
        for name, content in self.files.items():
            Path(self.directory, name).write_bytes(content)
        self.tokenizer = load_tokenizer(self.directory)

    def teardown(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    def process(self, element: tuple[tuple[int, int], ReadUnit]) -> Iterator[Any]:
        key, unit = element
        assert self.tokenizer is not None
        encode = (
            self.tokenizer.encode_reference_batch
            if self.reference_text
            else self.tokenizer.encode_batch
        )
        for index, texts in enumerate(_pieces(unit.documents(), self.separator)):
            encoded = encode(texts)
            lengths = [len(ids) for ids in encoded]
            ids = np.fromiter(itertools.chain.from_iterable(encoded), np.int32, sum(lengths))
            starts = start_flags(lengths) if self.document_starts else None
            yield (*key, index), ids, starts


def _pieces(documents: Iterable[str], separator: str) -> Iterator[list[str]]:
    """Documents (each with its separator) in lists of at most PIECE_DOCUMENTS documents and
    about PIECE_CHARACTERS characters."""
    batch: list[str] = []
    size = 0
    for document in documents:
        batch.append(document + separator)
        size += len(document)
        if len(batch) == PIECE_DOCUMENTS or size >= PIECE_CHARACTERS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each piece starts in the token stream, and how the blocks fall into shards."""

    starts: dict[tuple[int, ...], int]
    tokens: int
    num_blocks: int
    shards: list[tuple[int, int]]


def lay_out(lengths: Iterable[tuple[tuple[int, ...], int]], job: Job) -> Layout:
    """The layout of pieces of these ``(key, token count)``: in key order, each piece starts
    where the one before it ends."""
    starts, position = {}, 0
    for key, length in sorted(lengths):
        starts[key] = position
        position += length
    chunk = job.block_size - 2
    num_blocks = position // chunk
    count = job.num_shards
    if count <= 0:
        record_bytes = job.block_size * (np.dtype(job.dtype).itemsize + job.document_starts)
        count = max(1, -(-num_blocks * record_bytes // SHARD_BYTES))
    return Layout(starts, position, num_blocks, prepared.shard_ranges(num_blocks, count))


def _cut(piece: Any, layout: Layout, chunk: int) -> Iterator[tuple[int, Any]]:
    key, ids, starts = piece
    for shard, position, part, flags in prepared.shard_pieces(
        layout.starts[key], ids, starts, layout.shards, chunk
    ):
        yield shard, (position, part, flags)


def _shard_name(shard: int, layout: Layout) -> str:
    return prepared.SHARD_NAME.format(index=shard, count=len(layout.shards))


def _write_shard(grouped: tuple[int, Iterable[Any]], layout: Layout, job: Job) -> dict[str, Any]:
    shard, pieces = grouped
    first, stop = layout.shards[shard]
    blocks, starts = prepared.assemble_shard(
        stop - first, pieces, job.block_size, job.bos_id, job.eos_id, job.document_starts
    )
    name = _shard_name(shard, layout)
    prepared.write_shard(
        job.out, name, prepared.encode_records(blocks, starts, np.dtype(job.dtype))
    )
    return {"shard": shard, "file": name, "blocks": stop - first}


def _write_meta(written: list[dict[str, Any]], layout: Layout, job: Job) -> str:
    """meta.json, once every shard is written: the entry is complete."""
    if layout.num_blocks == 0:
        raise CorpusError(
            f"corpus has only {layout.tokens} tokens, fewer than one block of block_size "
            f"{job.block_size} ({job.block_size - 2} text tokens + bos + eos); use more text or "
            "a smaller data.block_size"
        )
    shards = sorted(written, key=lambda shard: shard["shard"])
    if [s["shard"] for s in shards] != list(range(len(layout.shards))):
        raise RuntimeError(f"{len(shards)} of {len(layout.shards)} shards were written")
    meta = {
        **job.meta,
        "storage": prepared.STORAGE,
        "dtype": job.dtype,
        "document_starts": job.document_starts,
        "num_blocks": layout.num_blocks,
        "block_size": job.block_size,
        "tokens": layout.tokens,
        "shards": [{"file": s["file"], "blocks": s["blocks"]} for s in shards],
    }
    path = storage.as_path(job.out) / "meta.json"
    path.write_text(json.dumps(meta, indent=2))
    return str(path)


def add_job(pipeline: beam.Pipeline, job: Job) -> None:
    """The steps that prepare ``job``'s entry, added to ``pipeline``."""
    name, chunk = job.label, job.block_size - 2
    pieces = (
        pipeline
        | f"{name}: read units" >> beam.Create(job.units)
        | f"{name}: spread units" >> beam.Reshuffle()
        | f"{name}: read and tokenize" >> beam.ParDo(_ReadAndTokenize(job))
    )
    layout = beam.pvalue.AsSingleton(
        pieces
        | f"{name}: count tokens" >> beam.Map(lambda piece: (piece[0], len(piece[1])))
        | f"{name}: gather counts" >> beam.combiners.ToList()
        | f"{name}: lay out" >> beam.Map(lay_out, job)
    )
    written = (
        pieces
        | f"{name}: cut by shard" >> beam.FlatMap(_cut, layout, chunk)
        | f"{name}: gather shards" >> beam.GroupByKey()
        | f"{name}: write shards" >> beam.Map(_write_shard, layout, job)
    )
    _ = (
        written
        | f"{name}: gather written" >> beam.combiners.ToList()
        | f"{name}: write meta" >> beam.Map(_write_meta, layout, job)
    )


def pipeline_options(pipeline_args: Sequence[str]) -> PipelineOptions:
    """Beam's options from these flags; one that is not a Beam option is refused (Beam itself
    would drop it with a warning)."""
    options = PipelineOptions(list(pipeline_args))
    known = options.get_all_options()
    every = options.get_all_options(retain_unknown_options=True)
    unknown = sorted(name.split("=")[0] for name in set(every) - set(known))
    if unknown:
        raise ValueError(
            f"unknown flag --{', --'.join(unknown)}: neither a flag of this command nor a Beam "
            "pipeline option"
        )
    return options


def run(jobs: Sequence[Job], options: PipelineOptions, *, worker_output: bool = True) -> None:
    """Runs one pipeline that prepares every job; an input error raised on a worker (a corpus
    file that cannot be read, too little text) comes back as the :class:`CorpusError` it
    was. Without ``worker_output``, stderr is dropped while the pipeline runs: the worker
    processes of the DirectRunner's ``multi_processing`` mode inherit it and print their
    start-up logs and every traceback there, whatever the log level."""
    try:
        with (
            contextlib.nullcontext() if worker_output else _stderr_dropped(),
            beam.Pipeline(options=options) as pipeline,
        ):
            for job in jobs:
                add_job(pipeline, job)
    except CorpusError:
        raise
    except Exception as error:
        found = _corpus_error(error)
        if found is None:
            raise
        raise found from None


@contextlib.contextmanager
def _stderr_dropped() -> Iterator[None]:
    """Points file descriptor 2 (this process's and its children's stderr) at the null device."""
    sys.stderr.flush()
    screen = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(screen, 2)
        os.close(screen)


def _corpus_error(error: BaseException) -> CorpusError | None:
    """The CorpusError behind a runner's error: the exception itself or one it wraps, or, from
    workers in other processes, the last ``CorpusError: ...`` line of its text."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, CorpusError):
            return CorpusError(str(seen))
        seen = seen.__cause__ or seen.__context__
    marker = f"{CorpusError.__name__}: "
    lines = [line for line in str(error).splitlines() if marker in line]
    if not lines:
        return None
    return CorpusError(lines[-1].split(marker, 1)[1].strip())
