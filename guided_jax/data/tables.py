"""Fine-tuning tasks' data: CSV/TSV/JSON-lines tables with text and label columns, and GLUE
from TFDS (read without TensorFlow), as texts and label ids, encoded for the encoder."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shlex
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import IO, Any

import ml_collections
import numpy as np
from etils import epath

from guided_jax.data.tokenizer import Tokenizer
from guided_jax.storage import as_path, is_remote

# GLUE in TFDS: text features, and whether the label is a score (regression).
GLUE_TASKS: dict[str, tuple[tuple[str, ...], bool]] = {
    "cola": (("sentence",), False),
    "sst2": (("sentence",), False),
    "mrpc": (("sentence1", "sentence2"), False),
    "qqp": (("question1", "question2"), False),
    "stsb": (("sentence1", "sentence2"), True),
    "mnli": (("premise", "hypothesis"), False),
    "qnli": (("question", "sentence"), False),
    "rte": (("sentence1", "sentence2"), False),
    "wnli": (("sentence1", "sentence2"), False),
}


class FinetuneError(ValueError):
    """A data file, column or setting that cannot work, named with what was expected."""


@dataclasses.dataclass(frozen=True)
class Split:
    """Texts (one or two per example) and labels: class ids, or floats for regression."""

    texts: list[tuple[str, ...]]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, rows: np.ndarray) -> Split:
        return Split([self.texts[i] for i in rows], self.labels[rows])


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    train: Split
    validation: Split
    eval: Split
    label_names: list[str]  # class names in id order; empty for regression
    # Rows left out for an empty label (data.drop_empty_labels), per file: "train" counts the
    # training file's (before validation is held out of it), "validation" data.validation_file's.
    dropped: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"train": 0, "validation": 0, "eval": 0}
    )

    @property
    def regression(self) -> bool:
        return not self.label_names

    @property
    def num_outputs(self) -> int:
        return 1 if self.regression else len(self.label_names)


_SHOWN_ROWS = 5  # line numbers an error about many rows names before "..."


def _lines_text(lines: Sequence[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:_SHOWN_ROWS])
    return shown + (", ..." if len(lines) > _SHOWN_ROWS else "")


def _text_file(path: epath.Path) -> IO[str]:
    """``path`` opened as text for the csv module (BOM dropped, line breaks kept as they are),
    local or on Cloud Storage (read whole: a fine-tuning table is small)."""
    if not is_remote(path):
        return open(path, encoding="utf-8-sig", newline="")
    try:
        return io.StringIO(path.read_bytes().decode("utf-8-sig"), newline="")
    except UnicodeDecodeError as error:
        raise FinetuneError(f"data file {str(path)!r} is not UTF-8 text: {error}") from None


def _read_delimited(
    path: epath.Path, delimiter: str, columns: Sequence[str]
) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows (``None`` for a field the row lacks) and the file line each starts on, read with the
    csv module from the file opened with ``newline=""``, so quoted fields keep their line breaks
    (CR, LF, U+2028, ...) exactly; header names are stripped of whitespace."""
    with _text_file(path) as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        start = 1
        try:
            header = next(reader, None)
            if header is None:
                return [], []
            names = [name.strip() for name in header]
            duplicates = sorted({n for n in names if n and names.count(n) > 1})
            if duplicates:
                raise FinetuneError(
                    f"data file {str(path)!r}: the header (line 1) names columns {duplicates} "
                    f"more than once; give every column its own name"
                )
            _check_columns(path, columns, [n for n in names if n])
            rows, lines, extra = [], [], []
            start = reader.line_num + 1
            for record in reader:
                if any(field.strip() for field in record):  # all-empty records are blank lines
                    if any(field.strip() for field in record[len(names) :]):
                        extra.append(start)
                    row = {n: record[i] if i < len(record) else None for i, n in enumerate(names)}
                    rows.append(row)
                    lines.append(start)
                start = reader.line_num + 1
        except csv.Error as error:
            raise FinetuneError(
                f"data file {str(path)!r}: the row starting on line {start} is not valid CSV "
                f"({error}); quote fields that hold the delimiter, quotes or line breaks"
            ) from None
        except UnicodeDecodeError as error:
            raise FinetuneError(f"data file {str(path)!r} is not UTF-8 text: {error}") from None
    if extra:
        raise FinetuneError(
            f"data file {str(path)!r} has {len(extra)} rows with more fields than its header's "
            f"{len(names)} (lines {_lines_text(extra)}); an unquoted delimiter inside a field? "
            f"quote such fields"
        )
    return rows, lines


def _read_json_lines(
    path: epath.Path, columns: Sequence[str]
) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of a JSON-lines file and their line numbers (lines end at LF only)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise FinetuneError(f"data file {str(path)!r} is not UTF-8 text: {error}") from None
    rows, lines = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise FinetuneError(f"{str(path)!r} line {number}: not JSON ({error})") from None
        if not isinstance(row, dict):
            raise FinetuneError(f"{str(path)!r} line {number}: expected a JSON object")
        rows.append(row)
        lines.append(number)
    if rows:
        _check_columns(path, columns, list(rows[0]))
    return rows, lines


def _check_columns(path: Path, columns: Sequence[str], names: Sequence[str]) -> None:
    missing = [c for c in columns if c not in names]
    if missing:
        raise FinetuneError(
            f"data file {str(path)!r} has no column {missing[0]!r} (set by data.*_column); "
            f"its columns are {sorted(names)}"
        )


def _read_table(
    path: str | os.PathLike, columns: Sequence[str]
) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of a table file with ``columns`` in its header (a row may lack a value: ``None``)
    and the file line number each row starts on (1 is a CSV/TSV file's header)."""
    path = as_path(path)
    if not path.is_file():
        raise FinetuneError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows, lines = _read_json_lines(path, columns)
    elif suffix in (".csv", ".tsv", ".txt"):
        rows, lines = _read_delimited(path, "," if suffix == ".csv" else "\t", columns)
    else:
        raise FinetuneError(
            f"data file {str(path)!r}: unknown format {suffix!r}; expected .csv, .tsv or .jsonl"
        )
    if not rows:
        raise FinetuneError(f"data file {str(path)!r} holds no examples")
    return rows, lines


def read_rows(path: str | os.PathLike, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV (``.csv``), TSV (``.tsv``/``.txt``) or JSON-lines (``.jsonl``/``.json``)
    file (UTF-8, with or without a byte-order mark); every row must have ``columns``.

    CSV and TSV files are read by the csv module (RFC 4180 quoting: quoted fields may hold the
    delimiter, doubled quotes and line breaks, kept exactly); their first line is the header,
    whose names must be unique. Errors name the file and its line numbers."""
    rows, lines = _read_table(path, columns)
    for row, line in zip(rows, lines, strict=True):
        empty = [c for c in columns if row.get(c) is None]
        if empty:
            raise FinetuneError(f"{str(path)!r} line {line} lacks {empty}")
    return rows


def _text_columns(data: ml_collections.ConfigDict) -> tuple[str, ...]:
    return (
        (data.text_column, data.text_pair_column) if data.text_pair_column else (data.text_column,)
    )


@dataclasses.dataclass(frozen=True)
class _Table:
    """One table file's examples: texts, labels as written (stripped), the file line of each,
    and how many rows without a label were dropped."""

    path: str
    texts: list[tuple[str, ...]]
    labels: list[str]
    lines: list[int]
    dropped: int


def _read_labelled(path: str, data: ml_collections.ConfigDict) -> _Table:
    """A table's examples. A row whose label is empty or missing is refused, naming the file's
    line numbers, unless ``data.drop_empty_labels`` drops it (and counts it)."""
    columns = _text_columns(data)
    rows, lines = _read_table(path, (*columns, data.label_column))
    lacking = [line for row, line in zip(rows, lines, strict=True) if _lacks(row, columns)]
    if lacking:
        raise FinetuneError(
            f"data file {path!r} has {len(lacking)} rows without a value in text column(s) "
            f"{list(columns)} (lines {_lines_text(lacking)})"
        )
    labels = [_label_text(row.get(data.label_column)) for row in rows]
    empty = [line for label, line in zip(labels, lines, strict=True) if not label]
    kept = range(len(rows))
    if empty:
        if not data.get("drop_empty_labels", False):
            raise FinetuneError(
                f"data file {path!r} has {len(empty)} of {len(rows)} rows with an empty or "
                f"missing label (column {data.label_column!r}) at file lines "
                f"{_lines_text(empty)}; fill them in, remove them, or set "
                f"data.drop_empty_labels=true to leave them out"
            )
        kept = [i for i, label in enumerate(labels) if label]
        if not kept:
            raise FinetuneError(f"data file {path!r} has no row with a label")
    return _Table(
        path,
        [tuple(str(rows[i][c]) for c in columns) for i in kept],
        [labels[i] for i in kept],
        [lines[i] for i in kept],
        len(rows) - len(kept),
    )


def _lacks(row: dict[str, Any], columns: Sequence[str]) -> bool:
    return any(row.get(c) is None for c in columns)


def _label_text(value: Any) -> str:
    """A label as text without surrounding whitespace ("" when missing or null)."""
    return "" if value is None else str(value).strip()


def _number(label: str) -> Decimal | None:
    """The finite number ``label`` spells (exactly), or None."""
    try:
        value = Decimal(label)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def _number_name(value: Decimal) -> str:
    """A number's canonical class name: ``1`` for 1, 1.0, +1, 1e0; ``0.5`` for .50 (``1E+40``
    beyond 20 digits either side of the point)."""
    value = value.normalize()
    if abs(value.adjusted()) > 20:
        return str(value)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value, "f")


def _class_names(labels: Sequence[str]) -> tuple[list[str], bool]:
    """The training labels' class names in id order, and whether they are numbers."""
    numbers = [_number(label) for label in labels]
    if all(n is not None for n in numbers):
        values = {_number_name(n): n for n in numbers}
        return sorted(values, key=values.__getitem__), True
    return sorted(set(labels)), False


def _class_of(label: str, numeric: bool) -> str:
    number = _number(label) if numeric else None
    return label if number is None else _number_name(number)


def _as_split(table: _Table, label_ids: dict[str, int] | None, numeric: bool) -> Split:
    if label_ids is None:  # regression
        values = []
        for label, line in zip(table.labels, table.lines, strict=True):
            try:
                values.append(float(label))
            except ValueError:
                raise FinetuneError(
                    f"data file {table.path!r} line {line}: regression labels must be numbers, "
                    f"got {label!r}"
                ) from None
        return Split(table.texts, np.asarray(values, np.float32))
    classes = [_class_of(label, numeric) for label in table.labels]
    unknown = sorted(set(classes) - set(label_ids))
    if unknown:
        raise FinetuneError(
            f"data file {table.path!r} has labels {unknown[:5]} that the training file lacks "
            f"(it has {list(label_ids)})"
        )
    return Split(table.texts, np.asarray([label_ids[c] for c in classes], np.int32))


# Fine-tuning protocols (config.protocol): "selected" validates on held-out rows, stops early and
# scores the best checkpoint; "reference" trains on every row for a fixed number of epochs and
# scores the final parameters (configs/finetune.py:reference).
PROTOCOLS = ("selected", "reference")


def _hold_out(train: Split, config: ml_collections.ConfigDict) -> tuple[Split, Split]:
    """``(train, validation)``: a fixed random ``data.validation_fraction`` of ``train`` held
    out (the same for every fine-tuning seed); nothing with ``protocol="reference"``, which
    trains on every row, as the reference's run_glue.py."""
    if config.get("protocol") == "reference":
        return train, train.take(np.zeros(0, np.int64))
    fraction, seed = config.data.validation_fraction, config.split_seed
    if not 0.0 < fraction < 1.0:
        raise FinetuneError(f"data.validation_fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(train))
    count = max(1, round(fraction * len(train)))
    if count >= len(train):
        raise FinetuneError(f"{len(train)} training examples are too few to hold out validation")
    return train.take(np.sort(order[count:])), train.take(np.sort(order[:count]))


def load_table_task(config: ml_collections.ConfigDict) -> Task:
    """A task from CSV/TSV/JSONL files (``data.train_file``, ``data.eval_file``, optional
    ``data.validation_file``; see :func:`read_rows`).

    Labels are compared without surrounding whitespace. A row with an empty or missing label is
    an error that names the file and its line numbers, unless ``data.drop_empty_labels`` is
    set: then such rows are left out, and ``Task.dropped`` counts them per file.

    Classes: when every training label spells a finite number (``1``, `` 1``, ``1.0``,
    ``+1e0``, ...), labels of equal value are one class, named by the number's canonical form
    (``1``; ``0.5`` for ``.50``) and ordered by value; the other files' labels are read the same
    way. Otherwise each distinct label text is a class, in sorted order."""
    data = config.data
    for key in ("train_file", "eval_file"):
        if not data[key]:
            raise FinetuneError(f"task {config.task!r} needs data.{key} (a .csv, .tsv or .jsonl)")
    train_table = _read_labelled(data.train_file, data)
    label_ids, numeric = None, False
    if not config.regression:
        names, numeric = _class_names(train_table.labels)
        if len(names) < 2:
            raise FinetuneError(
                f"data file {data.train_file!r} has a single label {names}; "
                f"classification needs at least two"
            )
        label_ids = {name: i for i, name in enumerate(names)}
    train = _as_split(train_table, label_ids, numeric)
    dropped = {"train": train_table.dropped, "validation": 0}
    if data.validation_file:
        validation_table = _read_labelled(data.validation_file, data)
        validation = _as_split(validation_table, label_ids, numeric)
        dropped["validation"] = validation_table.dropped
    else:
        train, validation = _hold_out(train, config)
    eval_table = _read_labelled(data.eval_file, data)
    evaluation = _as_split(eval_table, label_ids, numeric)
    dropped["eval"] = eval_table.dropped
    names = list(label_ids) if label_ids is not None else []
    return Task(Path(data.train_file).stem, train, validation, evaluation, names, dropped)


def _decode(value: Any) -> str:
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _glue_build_command(name: str, data_dir: str) -> str:
    """The ``tfds build`` command line that writes glue/NAME as fine-tuning reads it: array_record
    (``tfds build`` writes TFRecord by default, which reads only with TensorFlow)."""
    return shlex.join(
        ["tfds", "build", f"glue/{name}", f"--data_dir={data_dir}", "--file_format=array_record"]
    )


def _glue_open_error(
    task: str, name: str, which: str, data_dir: str | None, error: Exception
) -> FinetuneError:
    """Why glue/NAME's split ``which`` did not open, and the command that fixes it: TFDS says
    "not array_record" both when nothing is prepared and when TFRecord is, so ask the builder."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(f"glue/{name}", data_dir=data_dir)
    version_dir = str(builder.data_dir)
    root = str(epath.Path(version_dir).parents[2])  # ROOT/glue/NAME/VERSION, local or gs://
    command = _glue_build_command(name, root)
    if not builder.is_prepared():
        return FinetuneError(
            f"task {task!r}: cannot open TFDS split {which!r}: glue/{name} is not prepared in "
            f"{root!r}; prepare it once with `{command}` (the tfds command needs TensorFlow: see "
            f"README.md), or set data.tfds_data_dir to the directory that holds it"
        )
    random_access = tfds.core.file_adapters.FileFormat.with_random_access()
    if not builder.info.available_file_formats() & random_access:
        stored = builder.info.file_format.value if builder.info.file_format else "unknown"
        return FinetuneError(
            f"task {task!r}: {version_dir!r} holds glue/{name} as {stored}, which fine-tuning "
            f"cannot read (it reads array_record, without TensorFlow); delete that directory "
            f"and rebuild it with `{command}`"
        )
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return FinetuneError(
        f"task {task!r}: cannot open TFDS split {which!r} of glue/{name} in {version_dir!r}: "
        f"{first_line}"
    )


def load_glue_task(config: ml_collections.ConfigDict) -> Task:
    """A GLUE task from TFDS (``glue/NAME``), read with ``tfds.data_source`` (no TensorFlow)."""
    import tensorflow_datasets as tfds
    import tensorflow_datasets.text.glue  # registers glue/* (not automatic without TensorFlow)

    name = config.task.removeprefix("glue/")
    if name not in GLUE_TASKS:
        raise FinetuneError(f"task {config.task!r}: expected glue/ one of {sorted(GLUE_TASKS)}")
    features, regression = GLUE_TASKS[name]
    data_dir = config.data.tfds_data_dir or None

    def split(which: str) -> Split:
        try:
            source = tfds.data_source(
                f"glue/{name}", split=which, data_dir=data_dir, download=False
            )
        except Exception as error:  # tfds raises many kinds; find out which case this is
            raise _glue_open_error(config.task, name, which, data_dir, error) from None
        examples = [source[i] for i in range(len(source))]
        texts = [tuple(_decode(e[f]) for f in features) for e in examples]
        dtype = np.float32 if regression else np.int32
        return Split(texts, np.asarray([e["label"] for e in examples], dtype))

    validation_name = "validation_matched" if name == "mnli" else "validation"
    train, validation = _hold_out(split("train"), config)
    evaluation = split(validation_name)
    if not regression:
        num_classes = 3 if name == "mnli" else 2
        labels = [str(i) for i in range(num_classes)]
        for part in (train, validation, evaluation):
            if len(part) and (part.labels.min() < 0 or part.labels.max() >= num_classes):
                raise FinetuneError(f"task {config.task!r}: labels outside [0, {num_classes})")
    return Task(name, train, validation, evaluation, [] if regression else labels)


def load_task(config: ml_collections.ConfigDict) -> Task:
    if config.task.startswith("glue/"):
        return load_glue_task(config)
    if config.task != "table":
        raise FinetuneError(f"task must be 'table' or 'glue/<name>', got {config.task!r}")
    return load_table_task(config)


def encode(tokenizer: Tokenizer, split: Split, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """``<s> a </s>`` or ``<s> a </s></s> b </s>`` (BERT: ``[CLS] a [SEP] b [SEP]``), longest
    text cut first, padded to the longest example (at most ``max_length``): ids and mask."""
    pair_sep = [tokenizer.eos_id] if tokenizer.kind == "wordpiece" else [tokenizer.eos_id] * 2
    columns = list(zip(*split.texts, strict=True))
    encoded = [tokenizer.encode_batch(list(column)) for column in columns]
    rows = []
    for parts in zip(*encoded, strict=True):
        parts = [list(p) for p in parts]
        budget = max_length - 2 - (len(pair_sep) if len(parts) == 2 else 0)
        while sum(len(p) for p in parts) > budget:
            max(parts, key=len).pop()
        ids = [tokenizer.bos_id, *parts[0]]
        if len(parts) == 2:
            ids += [*pair_sep, *parts[1]]
        rows.append([*ids, tokenizer.eos_id])
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), tokenizer.pad_id, np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    mask = np.zeros_like(ids, dtype=bool)
    for i, row in enumerate(rows):
        mask[i, : len(row)] = True
    return ids, mask
