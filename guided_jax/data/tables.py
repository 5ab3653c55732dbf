"""Fine-tuning tasks' data: CSV/TSV/JSON-lines tables with text and label columns, and GLUE
from TFDS (read without TensorFlow), as texts and label ids, encoded for the encoder."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from guided_jax.data.tokenizer import Tokenizer

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

    @property
    def regression(self) -> bool:
        return not self.label_names

    @property
    def num_outputs(self) -> int:
        return 1 if self.regression else len(self.label_names)


def read_rows(path: str | os.PathLike, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV (``.csv``), TSV (``.tsv``/``.txt``) or JSON-lines (``.jsonl``/``.json``)
    file; every row must have ``columns``."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise FinetuneError(f"data file {str(path)!r} is not UTF-8 text: {error}") from None
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise FinetuneError(f"{str(path)!r} line {number}: not JSON ({error})") from None
            if not isinstance(row, dict):
                raise FinetuneError(f"{str(path)!r} line {number}: expected a JSON object")
            rows.append(row)
    elif suffix in (".csv", ".tsv", ".txt"):
        delimiter = "," if suffix == ".csv" else "\t"
        rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
    else:
        raise FinetuneError(
            f"data file {str(path)!r}: unknown format {suffix!r}; expected .csv, .tsv or .jsonl"
        )
    if not rows:
        raise FinetuneError(f"data file {str(path)!r} holds no examples")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise FinetuneError(
            f"data file {str(path)!r} has no column {missing[0]!r} (set by data.*_column); "
            f"its columns are {sorted(rows[0])}"
        )
    for number, row in enumerate(rows, 1):
        empty = [c for c in columns if row.get(c) is None]
        if empty:
            raise FinetuneError(f"{str(path)!r} example {number} lacks {empty}")
    return rows


def _text_columns(data: ml_collections.ConfigDict) -> tuple[str, ...]:
    return (
        (data.text_column, data.text_pair_column) if data.text_pair_column else (data.text_column,)
    )


def _table_split(
    path: str, data: ml_collections.ConfigDict, label_ids: dict[str, int] | None
) -> tuple[list[tuple[str, ...]], list[str]]:
    columns = _text_columns(data)
    rows = read_rows(path, (*columns, data.label_column))
    texts = [tuple(str(row[c]) for c in columns) for row in rows]
    labels = [str(row[data.label_column]).strip() for row in rows]
    if label_ids is not None:
        unknown = sorted(set(labels) - set(label_ids))
        if unknown:
            raise FinetuneError(
                f"data file {path!r} has labels {unknown[:5]} that the training file lacks "
                f"(it has {sorted(label_ids)})"
            )
    return texts, labels


def _as_split(texts, labels, label_ids: dict[str, int] | None, path: str) -> Split:
    if label_ids is None:  # regression
        try:
            values = np.asarray([float(v) for v in labels], np.float32)
        except ValueError as error:
            raise FinetuneError(
                f"data file {path!r}: regression labels must be numbers: {error}"
            ) from None
        return Split(texts, values)
    return Split(texts, np.asarray([label_ids[v] for v in labels], np.int32))


def _hold_out(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """A fixed random ``fraction`` of ``train`` (the same for every fine-tuning seed)."""
    if not 0.0 < fraction < 1.0:
        raise FinetuneError(f"data.validation_fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(len(train))
    count = max(1, round(fraction * len(train)))
    if count >= len(train):
        raise FinetuneError(f"{len(train)} training examples are too few to hold out validation")
    return train.take(np.sort(order[count:])), train.take(np.sort(order[:count]))


def load_table_task(config: ml_collections.ConfigDict) -> Task:
    """A task from CSV/TSV/JSONL files (``data.train_file``, ``data.eval_file``, optional
    ``data.validation_file``)."""
    data = config.data
    for key in ("train_file", "eval_file"):
        if not data[key]:
            raise FinetuneError(f"task {config.task!r} needs data.{key} (a .csv, .tsv or .jsonl)")
    texts, labels = _table_split(data.train_file, data, None)
    label_ids = None if config.regression else {v: i for i, v in enumerate(sorted(set(labels)))}
    if label_ids is not None and len(label_ids) < 2:
        raise FinetuneError(
            f"data file {data.train_file!r} has a single label {sorted(label_ids)}; "
            f"classification needs at least two"
        )
    train = _as_split(texts, labels, label_ids, data.train_file)
    if data.validation_file:
        validation = _as_split(
            *_table_split(data.validation_file, data, label_ids), label_ids, data.validation_file
        )
    else:
        train, validation = _hold_out(train, data.validation_fraction, config.split_seed)
    evaluation = _as_split(
        *_table_split(data.eval_file, data, label_ids), label_ids, data.eval_file
    )
    names = sorted(label_ids, key=label_ids.get) if label_ids is not None else []
    return Task(Path(data.train_file).stem, train, validation, evaluation, names)


def _decode(value: Any) -> str:
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


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
            source = tfds.data_source(f"glue/{name}", split=which, data_dir=data_dir)
        except Exception as error:  # tfds raises many kinds; say which dataset was missing
            raise FinetuneError(
                f"task {config.task!r}: cannot open TFDS split {which!r} "
                f"({str(error).strip().splitlines()[0]}); prepare it "
                f"first (tfds build glue/{name}) or set data.tfds_data_dir"
            ) from None
        examples = [source[i] for i in range(len(source))]
        texts = [tuple(_decode(e[f]) for f in features) for e in examples]
        dtype = np.float32 if regression else np.int32
        return Split(texts, np.asarray([e["label"] for e in examples], dtype))

    validation_name = "validation_matched" if name == "mnli" else "validation"
    train, validation = _hold_out(
        split("train"), config.data.validation_fraction, config.split_seed
    )
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
