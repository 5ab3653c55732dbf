"""A corpus prepared offline (``python -m guided_jax.prepare``): packed blocks in sharded
ArrayRecord files, read in place by random access.

An entry is a directory ``<cache_dir>/<key>/``, named by the same key as a token cache entry
(:func:`guided_jax.data.token_cache.cache_key`), that holds ``blocks-SSSSS-of-NNNNN.array_record``
files and ``meta.json``, written last. Shards hold consecutive blocks, so reading shard after
shard, record after record gives the blocks in the order the in-process token cache has them.
A record is one block's token ids, little-endian ``uint16`` when the vocabulary has fewer than
65,536 rows and ``int32`` otherwise, followed, with ``data.document_masks``, by its
document-start flags (one byte per token).

Every process opens the shards through grain's ArrayRecord data source, locally or straight
from ``gs://`` (no local copy), and reads only the records that its batch rows need.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from guided_jax import storage
from guided_jax.data.text import CorpusError

STORAGE = "array_record"
SHARD_NAME = "blocks-{index:05d}-of-{count:05d}.array_record"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access reads only that record
UINT16_ROWS = 1 << 16


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` for a vocabulary of fewer than 65,536 rows (half the bytes), else ``int32``."""
    return np.dtype("<u2") if vocab_size < UINT16_ROWS else np.dtype("<i4")


def shard_ranges(num_blocks: int, num_shards: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` blocks of each shard: consecutive runs of equal length (the last
    may be shorter), at most ``num_shards`` of them and none empty."""
    if num_blocks <= 0:
        return []
    per_shard = math.ceil(num_blocks / max(1, min(num_shards, num_blocks)))
    return [(s, min(s + per_shard, num_blocks)) for s in range(0, num_blocks, per_shard)]


def shard_pieces(
    start: int,
    ids: np.ndarray,
    starts: np.ndarray | None,
    ranges: Sequence[tuple[int, int]],
    chunk: int,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None]]:
    """Cuts a run of the token stream, ``ids`` at stream positions ``[start, start + len)``, by
    the shards that hold it: ``(shard, position in the shard's text, ids, starts)`` for each.
    A shard's text is its blocks' ``chunk`` text tokens one after the other; stream positions
    past the last full block (the remainder) belong to no shard."""
    if not ranges:
        return
    per_shard = (ranges[0][1] - ranges[0][0]) * chunk
    end = min(start + len(ids), ranges[-1][1] * chunk)
    position = start
    while position < end:
        shard = position // per_shard
        stop = min(end, (shard + 1) * per_shard)
        piece = slice(position - start, stop - start)
        yield (
            shard,
            position - shard * per_shard,
            ids[piece],
            None if starts is None else starts[piece],
        )
        position = stop


def assemble_shard(
    count: int,
    pieces: Iterable[tuple[int, np.ndarray, np.ndarray | None]],
    block_size: int,
    bos_id: int,
    eos_id: int,
    with_starts: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The ``[count, block_size]`` int32 blocks (and uint8 start flags) of one shard from its
    ``(position, ids, starts)`` pieces, as :class:`guided_jax.data.packing.BlockPacker` cuts
    them: ``bos + chunk + eos``, start flags 0 in the bos and eos columns. Every text position
    must be covered exactly once."""
    chunk = block_size - 2
    text = np.zeros(count * chunk, dtype=np.int32)
    flags = np.zeros(count * chunk, dtype=np.uint8)
    covered = np.zeros(count * chunk, dtype=np.int32)
    for position, ids, starts in pieces:
        where = slice(position, position + len(ids))
        text[where] = ids
        covered[where] += 1
        if with_starts and starts is not None:
            flags[where] = starts
    if not np.all(covered == 1):
        raise RuntimeError(
            f"a shard of {count} blocks got {int(covered.sum())} text tokens for "
            f"{count * chunk} positions ({int((covered == 0).sum())} missing)"
        )
    blocks = np.empty((count, block_size), dtype=np.int32)
    blocks[:, 0], blocks[:, -1] = bos_id, eos_id
    blocks[:, 1:-1] = text.reshape(count, chunk)
    if not with_starts:
        return blocks, None
    block_flags = np.zeros((count, block_size), dtype=np.uint8)
    block_flags[:, 1:-1] = flags.reshape(count, chunk)
    return blocks, block_flags


def encode_records(
    blocks: np.ndarray, starts: np.ndarray | None, dtype: np.dtype
) -> Iterator[bytes]:
    """One record per block: its ids as ``dtype``, then its start flags when there are any."""
    if np.issubdtype(dtype, np.unsignedinteger) and len(blocks):
        top = int(blocks.max())
        if top >= np.iinfo(dtype).max + 1 or int(blocks.min()) < 0:
            raise ValueError(f"token id {top} does not fit {dtype.name}")
    ids = blocks.astype(dtype)
    for row in range(len(blocks)):
        record = ids[row].tobytes()
        yield record if starts is None else record + starts[row].astype(np.uint8).tobytes()


def write_shard(directory: str | os.PathLike[str], name: str, records: Iterable[bytes]) -> None:
    """Writes one ArrayRecord file ``directory/name`` (local or ``gs://``), built in a local
    temporary file and then moved (locally) or uploaded in one piece, so a shard is either
    whole or absent."""
    from array_record.python.array_record_module import ArrayRecordWriter

    scratch = Path(tempfile.mkdtemp(prefix="guided_jax_shard_"))
    try:
        local = scratch / name
        writer = ArrayRecordWriter(str(local), WRITER_OPTIONS)
        for record in records:
            writer.write(record)
        writer.close()
        if storage.is_remote(directory):
            target = storage.as_path(directory) / name
            with open(local, "rb") as reader, target.open("wb") as sink:
                shutil.copyfileobj(reader, sink, 1 << 24)
        else:
            Path(directory).mkdir(parents=True, exist_ok=True)
            os.replace(local, Path(directory, name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _Shards:
    """The entry's shards as one grain ``ArrayRecordDataSource``, opened on first read (the
    files are listed with their record counts from meta.json, so opening reads no file)."""

    def __init__(self, path: str, meta: dict[str, Any]) -> None:
        self.path = path
        self.files = [
            f"{storage.as_path(path) / shard['file']}[0:{int(shard['blocks'])}]"
            for shard in meta["shards"]
        ]
        self._source: Any = None
        self._lock = threading.Lock()

    def source(self) -> Any:
        if self._source is None:
            with self._lock:
                if self._source is None:
                    import grain

                    self._source = grain.sources.ArrayRecordDataSource(self.files)
        return self._source


class PreparedBlocks:
    """Random access to the blocks of a prepared entry (or a contiguous range of them): an
    integer index reads that one record and gives the block's ``int32`` ids (``part="ids"``),
    its ``uint8`` start flags (``"starts"``) or both as a ``[2, block_size]`` int32 example
    (``"both"``, what :func:`guided_jax.data.pipeline.examples` builds); a slice is another
    view (nothing read), and ``copy()`` or ``numpy.asarray`` reads every record of the view."""

    ndim = 2
    PARTS = ("ids", "starts", "both")

    def __init__(
        self,
        path: str | os.PathLike[str],
        meta: dict[str, Any],
        *,
        part: str = "ids",
        rows: range | None = None,
        shards: _Shards | None = None,
    ) -> None:
        if part not in self.PARTS:
            raise ValueError(f"part must be one of {list(self.PARTS)}, got {part!r}")
        self.path, self.meta, self.part = os.fspath(path), meta, part
        self.block_size = int(meta["block_size"])
        self.token_dtype = np.dtype(meta["dtype"])
        self.with_starts = bool(meta.get("document_starts"))
        if part != "ids" and not self.with_starts:
            raise ValueError(f"prepared corpus {self.path!r} records no document starts")
        self.record_bytes = self.block_size * (self.token_dtype.itemsize + self.with_starts)
        self.rows = range(int(meta["num_blocks"])) if rows is None else rows
        self._shards = shards or _Shards(self.path, meta)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.part == "starts" else np.int32)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.part == "both":
            return (len(self.rows), 2, self.block_size)
        return (len(self.rows), self.block_size)

    def __len__(self) -> int:
        return len(self.rows)

    def view(self, part: str) -> PreparedBlocks:
        """The same rows, read as another part."""
        return PreparedBlocks(self.path, self.meta, part=part, rows=self.rows, shards=self._shards)

    def same_rows(self, other: Any) -> bool:
        """Whether ``other`` views the same rows of the same entry."""
        return (
            isinstance(other, PreparedBlocks)
            and other._shards is self._shards
            and other.rows == self.rows
        )

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return PreparedBlocks(
                self.path, self.meta, part=self.part, rows=self.rows[index], shards=self._shards
            )
        record = self._shards.source()[self.rows[int(index)]]
        return self._decode(record)

    def __getitems__(self, indices: Sequence[int]) -> list[np.ndarray]:
        keys = [self.rows[int(i)] for i in indices]
        return [self._decode(r) for r in self._shards.source().__getitems__(keys)]

    def copy(self) -> np.ndarray:
        """Every row of the view, read into memory."""
        if not len(self):
            return np.zeros(self.shape, dtype=self.dtype)
        return np.stack(self.__getitems__(range(len(self))))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        values = self.copy()
        return values if dtype is None else values.astype(dtype)

    def _decode(self, record: bytes) -> np.ndarray:
        if len(record) != self.record_bytes:
            raise CorpusError(
                f"prepared corpus {self.path!r} is damaged: a record of {len(record)} bytes, "
                f"expected {self.record_bytes}; prepare it again with python -m guided_jax.prepare"
            )
        size = self.block_size
        if self.part != "starts":
            ids = np.frombuffer(record, self.token_dtype, count=size).astype(np.int32)
            if self.part == "ids":
                return ids
        offset = size * self.token_dtype.itemsize
        flags = np.frombuffer(record, np.uint8, count=size, offset=offset)
        if self.part == "starts":
            return flags.copy()
        return np.stack([ids, flags.astype(np.int32)])

    def __repr__(self) -> str:
        return f"PreparedBlocks({self.path!r}, part={self.part!r}, rows={self.rows})"


def shard_files(directory: str | os.PathLike[str]) -> list[epath.Path]:
    """The shard files in ``directory``, in shard order."""
    return sorted(storage.as_path(directory).glob("blocks-*-of-*.array_record"))
