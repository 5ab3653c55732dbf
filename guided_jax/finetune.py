"""Sequence classification (or regression) on a pretrained encoder: GLUE tasks via TFDS, or any
CSV/TSV/JSONL file with text and label columns, over several seeds.

    python -m guided_jax.finetune --config configs/finetune.py --pretrained runs/default \
        --workdir runs/ft_hate --config.data.train_file=hate_train.csv \
        --config.data.eval_file=hate_test.csv
    python -m guided_jax.finetune --config configs/finetune.py --pretrained runs/default \
        --workdir runs/ft_cola --config.task=glue/cola

The head is RoBERTa's: the first token's (``<s>``/``[CLS]``) final hidden state through
dropout, a tanh dense layer, dropout and a linear layer to the labels. Each seed starts from
the same pretrained weights with its own head initialisation, dropout and data order; training
evaluates the validation split every ``eval_every`` steps (default: each epoch), keeps the best
parameters and stops after ``patience`` evaluations without improvement. The best parameters are
scored on the eval split (accuracy, macro-F1 and MCC, or Pearson and Spearman for regression);
``WORKDIR/results.json`` holds every seed and the mean ± std.

Splits: CSV-like tasks read ``data.train_file`` and ``data.eval_file`` and hold out
``data.validation_fraction`` of the training rows for early stopping unless
``data.validation_file`` is given. GLUE tasks train on TFDS's ``train`` split, hold out the
validation rows the same way, and report on its labelled ``validation`` split (GLUE's test
labels are not public).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.stats
from flax import nnx
from sklearn import metrics as skm

from guided_jax import pretrained
from guided_jax.model import EncoderForMLM
from guided_jax.tokenizer import Tokenizer

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
# The metric that picks the best checkpoint (GLUE's headline metric of each task).
SELECTION_METRIC = {"cola": "mcc", "stsb": "pearson"}


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


# ----------------------------------------------------------------------------- data


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


# ----------------------------------------------------------------------------- model


class SequenceClassifier(nnx.Module):
    """The pretrained encoder and RoBERTa's classification head on the first token."""

    def __init__(self, encoder: EncoderForMLM, num_outputs: int, dropout: float, rngs: nnx.Rngs):
        d = encoder.config.hidden_size
        init = nnx.initializers.normal(encoder.config.initializer_range)
        self.encoder = encoder
        self.dense = nnx.Linear(d, d, kernel_init=init, rngs=rngs)
        self.out = nnx.Linear(d, num_outputs, kernel_init=init, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)

    def __call__(
        self, ids: jax.Array, mask: jax.Array, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        _, aux = self.encoder(ids, attention_mask=mask, dropout_key=dropout_key, return_hidden=True)
        first = aux["hidden"][:, 0].astype(jnp.float32)
        keys = (
            (None, None)
            if dropout_key is None
            else jax.random.split(jax.random.fold_in(dropout_key, 2**20), 2)
        )

        def drop(x: jax.Array, key: jax.Array | None) -> jax.Array:
            return self.dropout(x, deterministic=key is None, rngs=key)

        return self.out(drop(jnp.tanh(self.dense(drop(first, keys[0]))), keys[1]))


def _loss(outputs: jax.Array, labels: jax.Array, weights: jax.Array, regression: bool):
    if regression:
        per_example = (outputs[:, 0] - labels) ** 2
    else:
        per_example = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


# ----------------------------------------------------------------------------- metrics


def scores(predictions: np.ndarray, labels: np.ndarray, regression: bool) -> dict[str, float]:
    """Accuracy, macro-F1 and MCC (classification) or Pearson and Spearman (regression)."""
    if regression:
        if np.std(predictions) == 0 or np.std(labels) == 0:
            return {"pearson": 0.0, "spearman": 0.0}
        return {
            "pearson": float(scipy.stats.pearsonr(predictions, labels).statistic),
            "spearman": float(scipy.stats.spearmanr(predictions, labels).statistic),
        }
    return {
        "accuracy": float(skm.accuracy_score(labels, predictions)),
        "macro_f1": float(skm.f1_score(labels, predictions, average="macro", zero_division=0)),
        "mcc": float(skm.matthews_corrcoef(labels, predictions)),
    }


def selection_metric(task: Task) -> str:
    return SELECTION_METRIC.get(task.name, "pearson" if task.regression else "accuracy")


# ----------------------------------------------------------------------------- training


def _schedule(config: ml_collections.ConfigDict, total: int) -> optax.Schedule:
    warmup = round(config.warmup_fraction * total)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
            optax.linear_schedule(config.learning_rate, 0.0, max(total - warmup, 1)),
        ],
        [warmup],
    )


def _batches(count: int, batch_size: int) -> list[np.ndarray]:
    return [np.arange(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]


def _pad_rows(rows: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices padded to a full batch (repeating row 0) and their 0/1 weights, so every
    batch has one shape and one compiled step."""
    weights = np.zeros(batch_size, np.float32)
    weights[: len(rows)] = 1.0
    return np.concatenate([rows, np.zeros(batch_size - len(rows), rows.dtype)]), weights


def train_one_seed(
    config: ml_collections.ConfigDict,
    task: Task,
    source: pretrained.Pretrained,
    params: pretrained.Params,
    seed: int,
    encoded: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, Any]:
    """Fine-tunes from ``params`` with ``seed``; returns the best validation step and scores
    and the eval scores of the best parameters."""
    encoder = pretrained.build_model(source.config, params)
    model = SequenceClassifier(encoder, task.num_outputs, config.classifier_dropout, nnx.Rngs(seed))
    batch_size = config.batch_size
    steps_per_epoch = max(1, len(task.train) // batch_size)
    total = steps_per_epoch * config.epochs
    eval_every = config.eval_every or steps_per_epoch
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(_schedule(config, total), weight_decay=config.weight_decay),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    regression = task.regression
    label_dtype = np.float32 if regression else np.int32

    @nnx.jit
    def train_step(model, optimizer, ids, mask, labels, weights, key):
        def loss_fn(model):
            return _loss(model(ids, mask, key), labels, weights, regression)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def predict(model, ids, mask):
        outputs = model(ids, mask)
        return outputs[:, 0] if regression else jnp.argmax(outputs, axis=-1)

    def evaluate(split: str) -> dict[str, float]:
        ids, mask = encoded[split]
        labels = getattr(task, split).labels
        out = []
        for rows in _batches(len(ids), batch_size):
            padded, _ = _pad_rows(rows, batch_size)
            out.append(np.asarray(predict(model, ids[padded], mask[padded]))[: len(rows)])
        return scores(np.concatenate(out), labels, regression)

    ids, mask = encoded["train"]
    labels = task.train.labels.astype(label_dtype)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    metric = selection_metric(task)
    best: dict[str, Any] = {"step": 0, "validation": evaluate("validation")}
    best_state = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    stale, step, history = 0, 0, []
    for _ in range(config.epochs):
        order = rng.permutation(len(ids))
        for batch in range(steps_per_epoch):
            rows = order[batch * batch_size : (batch + 1) * batch_size]
            weights = np.ones(len(rows), np.float32)
            loss = train_step(
                model, optimizer, ids[rows], mask[rows], labels[rows], weights,
                jax.random.fold_in(key, step),
            )  # fmt: skip
            step += 1
            if step % eval_every and step != total:
                continue
            validation = evaluate("validation")
            history.append({"step": step, "loss": float(loss), **validation})
            if validation[metric] > best["validation"][metric]:
                best = {"step": step, "validation": validation}
                best_state = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
                stale = 0
            else:
                stale += 1
            if config.patience and stale >= config.patience:
                break
        else:
            continue
        break
    nnx.update(model, best_state)
    return {
        "seed": seed,
        "best_step": best["step"],
        "steps": step,
        "validation": best["validation"],
        "eval": evaluate("eval"),
        "history": history,
    }


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (0 for one value)."""
    array = np.asarray(values, np.float64)
    std = float(np.std(array, ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(np.mean(array)), "std": std, "values": [float(v) for v in array]}


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise FinetuneError(f"seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise FinetuneError(f"seeds must name at least one seed, each once; got {text!r}")
    return seeds


def check_config(config: ml_collections.ConfigDict) -> None:
    positive = ("batch_size", "epochs", "learning_rate", "max_length")
    for key in positive:
        if not config[key] > 0:
            raise FinetuneError(f"{key} must be positive, got {config[key]}")
    if config.max_length < 3:
        raise FinetuneError(f"max_length must be at least 3, got {config.max_length}")
    if config.eval_every < 0 or config.patience < 0:
        raise FinetuneError("eval_every and patience must be >= 0 (0: each epoch / never stop)")
    parse_seeds(config.seeds)


def run(
    config: ml_collections.ConfigDict,
    source: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
) -> dict[str, Any]:
    """Fine-tunes the encoder in ``source`` (workdir or HuggingFace directory) once per seed
    and writes ``WORKDIR/results.json``; returns its contents."""
    check_config(config)
    seeds = parse_seeds(config.seeds)
    loaded = pretrained.load(source, step)
    task = load_task(config)
    max_length = min(config.max_length, loaded.config.max_block_size)
    encoded = {
        name: encode(loaded.tokenizer, getattr(task, name), max_length)
        for name in ("train", "validation", "eval")
    }
    if len(task.train) < config.batch_size:
        raise FinetuneError(
            f"{len(task.train)} training examples are fewer than batch_size={config.batch_size}"
        )
    params = pretrained.model_params(loaded.model)
    runs = []
    for seed in seeds:
        result = train_one_seed(config, task, loaded, params, seed, encoded)
        runs.append(result)
        shown = " ".join(f"{k}={v:.4f}" for k, v in result["eval"].items())
        print(f"seed {seed}: best step {result['best_step']}, eval {shown}")
    metric_names = list(runs[0]["eval"])
    results = {
        "task": config.task if config.task != "table" else task.name,
        "pretrained": str(source),
        "pretrained_step": loaded.step,
        "labels": task.label_names,
        "sizes": {name: len(getattr(task, name)) for name in ("train", "validation", "eval")},
        "selection_metric": selection_metric(task),
        "metrics": {m: mean_std([r["eval"][m] for r in runs]) for m in metric_names},
        "runs": runs,
    }
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def format_results(results: dict[str, Any]) -> str:
    lines = [f"{results['task']} ({len(results['runs'])} seeds, eval split):"]
    for name, m in results["metrics"].items():
        lines.append(f"  {name:>9}: {m['mean']:.4f} ± {m['std']:.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str]) -> None:
    from absl import flags, logging

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    values = flags.FLAGS
    if not values["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        results = run(values.config, values.pretrained, values.workdir, step=values.step)
    except (ValueError, OSError) as error:
        sys.exit(f"guided_jax.finetune: error: {error}")
    print(format_results(results))
    print(f"wrote {Path(values.workdir) / 'results.json'}")


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Fine-tuning config (configs/finetune.py).")
    flags.DEFINE_string("pretrained", None, "Pretraining workdir or HuggingFace directory.")
    flags.DEFINE_integer("step", None, "Checkpoint step of the workdir (default: the newest).")
    flags.DEFINE_string("workdir", None, "Directory for results.json.")
    flags.mark_flags_as_required(["config", "pretrained", "workdir"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
