"""Tokenize once: packed blocks on disk, keyed by what produced them.

A cache entry is a directory ``<cache_dir>/<key>/`` with ``blocks.bin`` (int32, row-major
``[num_blocks, block_size]``, read back as a ``numpy.memmap`` so a corpus larger than memory
costs no RAM) and ``meta.json`` (shape, key and what the key was made of). ``meta.json`` is
written last, so an entry cut short by a crash is never taken for a complete one. Entries built
for ``data.document_masks`` also hold ``starts.bin`` (uint8, the same shape: 1 where a document
starts, see :class:`guided_jax.data.packing.BlockPacker`) and have a key of their own; the
others are read without it.

The key hashes the tokenizer's files, the sources' fingerprint (file sizes and times, TFDS
name, version and split), the block size and the document separator: a rerun of the same
config finds its blocks and skips tokenization; any change builds a new entry.

An entry on ``gs://`` (a ``gs://`` workdir or ``data.cache_dir``) is built locally and uploaded
with meta.json last; every process maps a local copy of it (:func:`guided_jax.storage.local_copy`).

An entry prepared offline by ``python -m guided_jax.prepare`` has the same key and meta.json
but holds sharded ArrayRecord files (:mod:`guided_jax.data.prepared`), read in place, never
copied. Beside its entries, such a cache directory holds the tokenizer that prepared them under
``tokenizers/<key>/``, keyed by what trained it (:func:`tokenizer_key`), so a run of the same
config loads it instead of training its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from guided_jax import storage
from guided_jax.data import prepared
from guided_jax.data.packing import BlockPacker
from guided_jax.data.text import CorpusError
from guided_jax.data.tokenizer import Tokenizer

FORMAT = 1
BLOCKS_FILE = "blocks.bin"
STARTS_FILE = "starts.bin"
META_FILE = "meta.json"
TOKENIZERS = "tokenizers"  # beside the entries: tokenizers trained by the prepare command
_CHUNK_DOCUMENTS = 4096  # documents per encode_batch call: library parallelism, bounded memory


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of the tokenizer's files and settings (the same files give the same ids)."""
    digest = hashlib.sha256(f"{tokenizer.kind}:{tokenizer.lowercase}".encode())
    directory = tokenizer.directory
    if directory is None:
        raise ValueError("a tokenizer without a directory cannot key a token cache")
    for name in sorted(os.listdir(directory)):
        path = Path(directory, name)
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_key(
    tokenizer: Tokenizer,
    source_fingerprint: str,
    block_size: int,
    separator: str,
    document_starts: bool = False,
) -> tuple[str, dict[str, Any]]:
    """The entry name for these inputs, and the inputs themselves (recorded in meta.json).
    ``document_starts`` entries also record where documents start (the key of an entry
    without them is the same as before that option existed)."""
    parts = {
        "format": FORMAT,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sources": source_fingerprint,
        "block_size": int(block_size),
        "separator": separator,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
    }
    if document_starts:
        parts["document_starts"] = True
    text = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24], parts


def tokenizer_key(
    kind: str, vocab_size: int, max_documents: int, seed: int, source_fingerprint: str
) -> str:
    """The name of a tokenizer trained, as a run trains one, on a sample of ``max_documents``
    documents drawn with ``seed`` from sources of this fingerprint: the same inputs train the
    same tokenizer."""
    parts = {
        "kind": kind,
        "vocab_size": int(vocab_size),
        "max_documents": int(max_documents),
        "seed": int(seed),
        "sources": source_fingerprint,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _complete_meta(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``meta.json`` of a complete entry at ``path`` (local or ``gs://``), or None."""
    try:
        return json.loads((storage.as_path(path) / META_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None


def _prepared(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The meta of an entry prepared offline (sharded ArrayRecord), or None for any other."""
    meta = _complete_meta(path)
    return meta if meta is not None and meta.get("storage") == prepared.STORAGE else None


def _local_entry(path: str | os.PathLike[str]) -> Path | None:
    """The entry at ``path`` on the local filesystem, or None when there is no complete one: a
    local entry itself; for ``gs://`` a local copy, downloaded again when its meta.json is not
    the bucket's (every process of a run reads the entry that process 0 built)."""
    if not storage.is_remote(path):
        local = Path(path)
        return local if (local / META_FILE).is_file() else None
    try:
        meta = (storage.as_path(path) / META_FILE).read_text()
    except FileNotFoundError:
        return None
    local = storage.local_copy_dir(path)
    copied = local / META_FILE
    if not (copied.is_file() and copied.read_text() == meta):
        storage.local_copy(path)
    return local


def _entry(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], tuple[int, int]] | None:
    """``(local directory, meta, (num_blocks, block_size))`` of a complete entry, or None."""
    local = _local_entry(path)
    if local is None:
        return None
    meta = json.loads((local / META_FILE).read_text())
    return local, meta, (int(meta["num_blocks"]), int(meta["block_size"]))


def load(path: str | os.PathLike[str]) -> np.ndarray | prepared.PreparedBlocks | None:
    """The blocks of a complete entry at ``path`` (read-only memmap; read in place for an
    entry prepared offline), or None if there is none."""
    meta = _prepared(path)
    if meta is not None:
        return prepared.PreparedBlocks(path, meta)
    entry = _entry(path)
    if entry is None:
        return None
    local, _, shape = entry
    blocks_file = local / BLOCKS_FILE
    if not blocks_file.is_file() or blocks_file.stat().st_size != shape[0] * shape[1] * 4:
        raise CorpusError(
            f"token cache {str(path)!r} is damaged ({BLOCKS_FILE} does not hold {shape[0]} "
            f"blocks of {shape[1]}); delete that directory to rebuild it"
        )
    return np.memmap(blocks_file, dtype=np.int32, mode="r", shape=shape)


def load_starts(path: str | os.PathLike[str]) -> np.ndarray | prepared.PreparedBlocks | None:
    """The document-start flags of a complete entry (read-only uint8 memmap, the blocks'
    shape), or None if the entry was built without them."""
    meta = _prepared(path)
    if meta is not None:
        if not meta["document_starts"]:
            return None
        return prepared.PreparedBlocks(path, meta, part="starts")
    entry = _entry(path)
    if entry is None or not entry[1].get("document_starts"):
        return None
    local, _, shape = entry
    starts_file = local / STARTS_FILE
    if not starts_file.is_file() or starts_file.stat().st_size != shape[0] * shape[1]:
        raise CorpusError(
            f"token cache {str(path)!r} is damaged ({STARTS_FILE} does not hold {shape[0]} "
            f"blocks of {shape[1]} flags); delete that directory to rebuild it"
        )
    return np.memmap(starts_file, dtype=np.uint8, mode="r", shape=shape)


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``meta.json`` of an entry; a clear error if ``path`` is not one."""
    meta_file = storage.as_path(path) / META_FILE
    if not meta_file.is_file():
        raise CorpusError(
            f"{str(path)!r} is not a token cache (no {META_FILE}); expected a directory under "
            "data.cache_dir written by an earlier run"
        )
    return json.loads(meta_file.read_text())


def publish(built: Path, final: str | os.PathLike[str]) -> None:
    """Moves the complete local entry ``built`` to ``final``, unless an equal entry (the same
    key) got there first. On ``gs://`` it is uploaded with meta.json last, and ``built``
    becomes the local copy that :func:`load` reads."""
    if load(final) is not None:
        shutil.rmtree(built, ignore_errors=True)
        return
    if storage.is_remote(final):
        storage.copy_tree(built, final, last=META_FILE)
        local = storage.local_copy_dir(final)
        local.parent.mkdir(parents=True, exist_ok=True)
        storage.replace_dir(built, local)
        return
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    shutil.move(built, final)


def build(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    block_size: int,
    out_dir: str | os.PathLike[str],
    meta: dict[str, Any],
    *,
    separator: str = "\n",
    total: int | None = None,
    description: str = "tokenize",
    document_starts: bool = False,
    reference_text: bool = False,
) -> np.ndarray:
    """Tokenize ``documents`` and pack them into ``out_dir`` as the reference packs (see
    :mod:`guided_jax.data.packing`: one token stream, ``[bos] + chunk + [eos]`` blocks, the
    remainder dropped), streaming, with a progress bar; returns the blocks (memmap).

    Each document is followed by ``separator`` (the newline that reading removed).
    ``document_starts`` also writes where documents start (:func:`load_starts` reads them).
    ``reference_text``: documents are whole files, tokenized as the reference tokenizes them
    (:meth:`Tokenizer.encode_reference_batch`)."""
    encode = tokenizer.encode_reference_batch if reference_text else tokenizer.encode_batch
    packer = BlockPacker(block_size, tokenizer.bos_id, tokenizer.eos_id, starts=document_starts)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with (
        open(out / BLOCKS_FILE, "wb") as sink,
        open(out / STARTS_FILE, "wb") if document_starts else contextlib.nullcontext() as flags,
        tqdm(total=total, desc=description, unit="doc", dynamic_ncols=True) as bar,
    ):
        for texts in _chunks(documents, separator):
            blocks, starts = packer.add(encode(texts))
            sink.write(blocks.tobytes())
            if flags is not None:
                flags.write(starts.tobytes())
            bar.update(len(texts))
            bar.set_postfix(blocks=packer.blocks)
    try:
        packer.check_not_empty()
    except CorpusError:
        shutil.rmtree(out, ignore_errors=True)
        raise
    record = {
        **meta,
        "document_starts": document_starts,
        "num_blocks": packer.blocks,
        "block_size": block_size,
        "tokens": packer.tokens,
    }
    (out / META_FILE).write_text(json.dumps(record, indent=2))
    loaded = load(out)
    assert loaded is not None
    return loaded


def _chunks(documents: Iterable[str], separator: str) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in documents:
        batch.append(doc + separator)
        if len(batch) == _CHUNK_DOCUMENTS:
            yield batch
            batch = []
    if batch:
        yield batch
