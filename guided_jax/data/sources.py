"""Where the text comes from: source specs in the config, read as a stream of documents.

``data.train_files`` / ``data.eval_files`` hold comma-separated sources of one of these forms:

* ``PATH`` or ``GLOB`` — UTF-8 text files, local or ``gs://`` (read through ``etils.epath``),
  one document per line or per blank-line separated paragraph (``data.documents``);
* ``tfds:NAME[/CONFIG]:SPLIT`` — a TensorFlow Datasets split prepared in ``data.tfds_data_dir``
  in the ``array_record`` format, read without TensorFlow through ``tfds`` random-access data
  sources; ``data.text_field`` names the text feature;
* ``cache:DIR`` — blocks tokenized earlier (see :mod:`guided_jax.data.token_cache`), used as
  they are.

An empty train value is the embedded default corpus (:mod:`guided_jax.data.default_corpus`).
Each source knows a fingerprint (what identifies its content for the token cache), how many
documents it has where that is cheap to know, and how to draw a sample for tokenizer training.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib
import json
import re
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from etils import epath

from guided_jax.data.default_corpus import default_corpus
from guided_jax.data.text import (
    REFERENCE_TEXT,
    WHOLE_FILE,
    CorpusError,
    iter_text_file,
    reads_whole_files,
)

TFDS_PREFIX = "tfds:"
# NAME[/CONFIG][:VERSION]:SPLIT, where SPLIT may be a TFDS slice such as train[:90%].
_TFDS_SPEC = re.compile(r"(?P<name>[\w.-]+(?:/[\w.-]+)?(?::\d+\.\d+\.\d+)?):(?P<split>\S+)")
CACHE_PREFIX = "cache:"
_READ_CHUNK = 1024  # TFDS records per batched read


class Source(Protocol):
    """A stream of documents with a stable identity."""

    def describe(self) -> str: ...

    def fingerprint(self) -> dict[str, Any]: ...

    def num_documents(self) -> int | None: ...

    def documents(self) -> Iterator[str]: ...


@dataclasses.dataclass(frozen=True)
class DefaultCorpus:
    """The standard library's docstrings (no files, no download)."""

    def describe(self) -> str:
        return "the embedded default corpus (Python standard library docstrings)"

    def fingerprint(self) -> dict[str, Any]:
        # The corpus is a function of the Python installation.
        return {"default_corpus": sys.version, "stdlib": sysconfig.get_paths()["stdlib"]}

    def num_documents(self) -> int | None:
        return len(self._documents())

    def documents(self) -> Iterator[str]:
        return iter(self._documents())

    @functools.cache  # noqa: B019 - one small frozen instance per run
    def _documents(self) -> list[str]:
        return default_corpus()


@dataclasses.dataclass(frozen=True)
class TextFiles:
    """UTF-8 text files (already expanded from their globs), streamed one file at a time."""

    files: tuple[str, ...]
    mode: str = "line"

    def describe(self) -> str:
        shown = ", ".join(self.files[:3]) + (" ..." if len(self.files) > 3 else "")
        return f"{len(self.files)} text file(s) ({shown})"

    def fingerprint(self) -> dict[str, Any]:
        stats = []
        for name in self.files:
            try:
                info = epath.Path(name).stat()
            except (OSError, ImportError) as err:
                raise CorpusError(f"cannot read corpus file {name!r}: {err}") from err
            stats.append([name, info.length, info.mtime])
        return {"files": stats, "documents": self.mode}

    def num_documents(self) -> int | None:
        return None

    def documents(self) -> Iterator[str]:
        for name in self.files:
            yield from iter_text_file(name, self.mode)  # streamed, a few MB at a time


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
    """One split of a TFDS dataset prepared as array_record files, read without TensorFlow."""

    name: str
    split: str
    data_dir: str
    field: str

    def describe(self) -> str:
        return f"TFDS {self.name}:{self.split}"

    def fingerprint(self) -> dict[str, Any]:
        builder = self._builder()
        return {
            "tfds": builder.info.full_name,
            "split": self.split,
            "data_dir": str(builder.data_dir),
            "field": self.field,
            "num_documents": self.num_documents(),
        }

    def num_documents(self) -> int | None:
        return len(self._source())

    def documents(self) -> Iterator[str]:
        return self.documents_between(0, len(self._source()))

    def documents_between(self, first: int, stop: int) -> Iterator[str]:
        """The documents of records ``[first, stop)``, in order."""
        source = self._source()
        for start in range(first, stop, _READ_CHUNK):
            indices = range(start, min(start + _READ_CHUNK, stop))
            # One batched read per chunk: array_record reads the records in parallel.
            for index, record in zip(indices, source.__getitems__(indices), strict=True):
                yield self.text(record, index)

    def text(self, record: dict[str, Any], index: int) -> str:
        """The text field of one record as ``str`` (array_record files hold bytes)."""
        value = record[self.field]
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                raise CorpusError(
                    f"{self.describe()}: record {index} field {self.field!r} is not valid UTF-8"
                ) from None
        if isinstance(value, np.ndarray) and value.shape == ():
            return self.text({self.field: value.item()}, index)
        if not isinstance(value, str):
            raise CorpusError(
                f"{self.describe()}: field {self.field!r} holds {type(value).__name__}, not text; "
                "set data.text_field to a text feature"
            )
        return value

    @functools.cache  # noqa: B019 - opened once per run
    def _builder(self) -> Any:
        return open_tfds_builder(self.name, self.data_dir)

    @functools.cache  # noqa: B019 - opened once per run
    def _source(self) -> Any:
        builder = self._builder()
        where = f"TFDS {self.name} in {str(builder.data_dir)!r}"
        features = getattr(builder.info.features, "keys", lambda: [])()
        if self.field not in features:
            raise CorpusError(
                f"{where} has no field {self.field!r}; its fields are {sorted(features)}; "
                "set data.text_field"
            )
        try:
            return builder.as_data_source(split=self.split)
        except NotImplementedError as err:  # prepared as tfrecord: needs TensorFlow to read
            hint = prepare_hint(self.name, self.data_dir)
            raise CorpusError(
                f"{where} is not in the array_record format; {hint} ({err})"
            ) from None
        except (ValueError, KeyError) as err:
            splits = sorted(builder.info.splits.keys())
            raise CorpusError(
                f"{where}: unknown split {self.split!r} (expected one of {splits}, or a TFDS "
                f"slice such as 'train[:90%]'): {err}"
            ) from None


@dataclasses.dataclass(frozen=True)
class CachedBlocks:
    """Blocks tokenized earlier into a token cache directory."""

    path: str

    def describe(self) -> str:
        return f"the token cache {self.path!r}"

    def fingerprint(self) -> dict[str, Any]:
        return {"cache": self.path}

    def num_documents(self) -> int | None:
        return None

    def documents(self) -> Iterator[str]:
        raise CorpusError(
            f"{self.describe()} holds tokens, not text: it cannot train a tokenizer or be mixed "
            "with text sources; set data.tokenizer_dir to the tokenizer that built it"
        )


def prepare_hint(name: str, data_dir: str) -> str:
    """How to prepare a TFDS dataset so that it reads without TensorFlow."""
    where = data_dir or "~/tensorflow_datasets"
    return (
        f"prepare it once in an environment with the tfds command's own dependencies "
        f"(tensorflow tensorflow-datasets apache-beam mlcroissant importlib_resources: see "
        f"README.md) with `tfds build {name} "
        f"--data_dir={where} --file_format=array_record`, or in Python with "
        f"`tfds.builder({name!r}, data_dir={where!r}).download_and_prepare("
        f"file_format='array_record')`"
    )


def open_tfds_builder(name: str, data_dir: str) -> Any:
    """The builder of a prepared TFDS dataset, with an error that says what to do otherwise.

    Datasets whose code TFDS does not register without TensorFlow (``wiki40b``, ``c4``, ...)
    are found by their files in ``data_dir``; failing that, their module under
    ``tensorflow_datasets.text`` is imported so that the error can say whether the name or the
    preparation is missing."""
    import tensorflow_datasets as tfds

    kwargs = {"data_dir": data_dir or None}
    try:
        builder = tfds.builder(name, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
        base = name.split("/")[0].split(":")[0]
        try:
            importlib.import_module(f"tensorflow_datasets.text.{base}")
            builder = tfds.builder(name, **kwargs)
        except (ImportError, tfds.core.registered.DatasetNotFoundError):
            raise CorpusError(
                f"unknown TFDS dataset {name!r}: not registered, and not prepared in "
                f"data.tfds_data_dir={data_dir or '(TFDS default)'!r}; check the name, or "
                f"{prepare_hint(name, data_dir)}"
            ) from None
    except ValueError as err:  # e.g. an unknown builder config
        raise CorpusError(f"TFDS dataset {name!r}: {str(err).splitlines()[0]}") from None
    if not builder.is_prepared():
        raise CorpusError(
            f"TFDS dataset {name!r} is not prepared in {str(builder.data_dir)!r}; "
            f"{prepare_hint(name, data_dir)}, and set data.tfds_data_dir to that directory"
        )
    return builder


def expand_glob(pattern: str, key: str) -> list[str]:
    """Files matching ``pattern`` (local or ``gs://``), sorted; an empty match is an error."""
    if not glob.has_magic(pattern):
        return [pattern]
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
    rest = "/".join(parts[first:])
    try:
        matches = sorted(str(p) for p in epath.Path(base).glob(rest) if not p.is_dir())
    except (OSError, ImportError) as err:
        raise CorpusError(f"{key}: cannot list {pattern!r}: {err}") from err
    if not matches:
        raise CorpusError(f"{key}: the pattern {pattern!r} matches no file")
    if base == ".":  # keep relative patterns relative, as the user wrote them
        matches = [m.removeprefix("./") for m in matches]
    return matches


def parse_sources(value: str, key: str, data_config: Any) -> list[Source]:
    """The sources named by a config value (comma-separated), globs expanded.

    An empty value gives no sources (the caller decides what that means)."""
    sources: list[Source] = []
    files: list[str] = []

    reference = reads_whole_files(data_config)

    def flush_files() -> None:
        if files:
            mode = WHOLE_FILE if reference else data_config.documents
            sources.append(TextFiles(tuple(files), mode))
            files.clear()

    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        if item.startswith(TFDS_PREFIX):
            flush_files()
            match = _TFDS_SPEC.fullmatch(item.removeprefix(TFDS_PREFIX))
            if match is None:
                raise CorpusError(
                    f"{key}: {item!r} should be tfds:NAME[/CONFIG]:SPLIT, "
                    "e.g. tfds:wiki40b/tl:train"
                )
            sources.append(
                TfdsSplit(
                    match["name"],
                    match["split"],
                    data_config.tfds_data_dir,
                    data_config.text_field,
                )
            )
        elif item.startswith(CACHE_PREFIX):
            flush_files()
            sources.append(CachedBlocks(item.removeprefix(CACHE_PREFIX)))
        else:
            files.extend(expand_glob(item, key))
    flush_files()
    if reference and any(not isinstance(s, TextFiles) for s in sources):
        raise CorpusError(
            f"{key}: data.format={REFERENCE_TEXT!r} reads text files whole, as the reference "
            f"does; {value!r} names other sources (use data.format='documents' for them)"
        )
    if any(isinstance(s, CachedBlocks) for s in sources) and len(sources) > 1:
        raise CorpusError(f"{key}: a cache: source must be the only source, got {value!r}")
    return sources


def documents(sources: Sequence[Source]) -> Iterator[str]:
    """The documents of all sources, one after the other."""
    for source in sources:
        yield from source.documents()


def count_documents(sources: Sequence[Source]) -> int | None:
    """The number of documents, or None where a source cannot tell without reading it all."""
    counts = [source.num_documents() for source in sources]
    return None if None in counts else sum(counts)  # type: ignore[arg-type]


def text_bytes(sources: Sequence[Source]) -> int:
    """The size of the sources' text files, in bytes (other sources count 0)."""
    return sum(
        int(length)
        for source in sources
        if isinstance(source, TextFiles)
        for _, length, _ in source.fingerprint()["files"]
    )


def fingerprint(sources: Sequence[Source]) -> str:
    """A JSON text that changes whenever the sources' content may have changed."""
    return json.dumps([s.fingerprint() for s in sources], sort_keys=True)


def sample_documents(sources: Sequence[Source], max_documents: int, seed: int) -> list[str]:
    """Up to ``max_documents`` documents for tokenizer training, in corpus order.

    All documents when there are no more than that (the tokenizer then sees the whole corpus,
    exactly as before sampling existed); otherwise a uniform sample drawn with ``seed``: by
    random access where the sources allow it (TFDS), by reservoir sampling over the stream
    otherwise, so a corpus far larger than memory still trains a tokenizer."""
    if max_documents <= 0:
        return list(documents(sources))
    rng = np.random.default_rng(seed)
    total = count_documents(sources)
    if total is not None and total > max_documents:
        chosen = np.sort(rng.choice(total, size=max_documents, replace=False))
        return list(_documents_at(sources, chosen))
    reservoir: list[tuple[int, str]] = []
    for index, doc in enumerate(documents(sources)):
        if index < max_documents:
            reservoir.append((index, doc))
        else:
            slot = int(rng.integers(0, index + 1))
            if slot < max_documents:
                reservoir[slot] = (index, doc)
    return [doc for _, doc in sorted(reservoir)]


def _documents_at(sources: Sequence[Source], indices: np.ndarray) -> Iterator[str]:
    """Documents at sorted global ``indices`` of sources that all know their size."""
    offset = 0
    for source in sources:
        count = source.num_documents() or 0
        local = indices[(indices >= offset) & (indices < offset + count)] - offset
        if isinstance(source, TfdsSplit):
            records = source._source()
            for index in local:
                yield source.text(records[int(index)], int(index))
        else:
            docs = list(source.documents())
            for index in local:
                yield docs[int(index)]
        offset += count
