"""Sequence classification (or regression) on a pretrained encoder, over several seeds.

The head is RoBERTa's: the first token's (``<s>``/``[CLS]``) final hidden state through
dropout, a tanh dense layer, dropout and a linear layer to the labels. Each seed starts from
the same pretrained weights with its own head initialisation, dropout and data order; training
evaluates the validation split every ``eval_every`` steps (default: each epoch), keeps the best
parameters and stops after ``patience`` evaluations without improvement. The best parameters are
scored on the eval split (accuracy, macro-F1 and MCC, or Pearson and Spearman for regression);
``WORKDIR/results.json`` holds every seed and the mean ± std. That is the ``selected``
protocol (``config.protocol``, the default). It first picks the learning rate as papers report
GLUE: every candidate of ``learning_rates`` is trained with the first seed and scored on
validation only (the eval split is never used to choose); the best rate then runs with every
seed. A run whose best validation is its last one was still improving when training ended:
it is flagged ``cut_short``, with the warning :data:`CUT_SHORT` in the output and in
``results.json``. The ``reference`` protocol
(``configs/finetune.py:reference``) is the reference implementation's HuggingFace ``run_glue.py``:
every training row (the last batch of an epoch partial), a fixed number of epochs, no
validation and no early stopping, and the final parameters scored on the eval split.

Splits (:mod:`guided_jax.data.tables`): CSV-like tasks read ``data.train_file`` and
``data.eval_file`` and hold out ``data.validation_fraction`` of the training rows for early
stopping unless ``data.validation_file`` is given. GLUE tasks train on TFDS's ``train`` split,
hold out the validation rows the same way, and report on its labelled ``validation`` split
(GLUE's test labels are not public). The ``reference`` protocol holds nothing out.

Training is functional, as pretraining is: parameters and optimizer state are arrays passed
through one jitted step.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import scipy.stats
from flax import nnx
from sklearn import metrics as skm
from tqdm import tqdm

from guided_jax import weights
from guided_jax.config.checks import check_finetune_config, learning_rates, parse_seeds
from guided_jax.data.tables import FinetuneError, Task, encode, load_task
from guided_jax.model import EncoderForMLM, Params, build_model, model_params
from guided_jax.storage import as_path, check_location
from guided_jax.train.optimizer import adamw, warmup_linear_decay

__all__ = ["FinetuneError", "format_results", "run", "scores", "train_one_seed"]

# The metric that picks the best checkpoint (GLUE's headline metric of each task).
SELECTION_METRIC = {"cola": "mcc", "stsb": "pearson"}
# Why a score may not be trusted: validation still improved at the final evaluation.
CUT_SHORT = "best step = last step: raise epochs or learning_rate"

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


def _loss(outputs: jax.Array, labels: jax.Array, weights: jax.Array, regression: bool) -> jax.Array:
    """Mean squared error (regression) or cross-entropy over the batch's examples of weight 1
    (a partial batch is padded with examples of weight 0)."""
    if regression:
        losses = (outputs[:, 0] - labels) ** 2
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
    return jnp.sum(losses * weights) / jnp.sum(weights)


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


# ----------------------------------------------------------------------------- protocol


def steps_per_epoch(rows: int, batch_size: int, protocol: str) -> int:
    """Optimizer steps per epoch: ``reference`` takes every row, the last batch partial (a
    DataLoader without ``drop_last``); ``selected`` full batches only."""
    if protocol == "reference":
        return math.ceil(rows / batch_size)
    return max(1, rows // batch_size)


# ----------------------------------------------------------------------------- training


def _batches(count: int, batch_size: int) -> list[np.ndarray]:
    return [np.arange(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]


def _pad_rows(rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Row indices padded to a full batch (repeating row 0), so every batch has one shape and
    one compiled function; the caller keeps the first ``len(rows)`` outputs."""
    return np.concatenate([rows, np.zeros(batch_size - len(rows), rows.dtype)])


def _train_batch(order: np.ndarray, batch: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of batch ``batch`` of an epoch's ``order`` padded to ``batch_size``, and each row's
    weight in the loss: 1, or 0 for the padding of a partial last batch."""
    rows = order[batch * batch_size : (batch + 1) * batch_size]
    weights = np.zeros(batch_size, np.float32)
    weights[: len(rows)] = 1.0
    return _pad_rows(rows, batch_size), weights


def train_one_seed(
    config: ml_collections.ConfigDict,
    task: Task,
    encoder_config: Any,
    params: Params,
    seed: int,
    encoded: dict[str, tuple[np.ndarray, np.ndarray]],
    progress: tqdm | None = None,
    *,
    learning_rate: float | None = None,
    score_eval: bool = True,
    return_model: bool = False,
) -> dict[str, Any]:
    """Fine-tunes from the pretrained ``params`` of an encoder of ``encoder_config`` with
    ``seed`` at ``learning_rate`` (default: the config's only rate). Protocol ``selected``:
    returns the best validation step and scores, whether that was the last step
    (``cut_short``), and the eval scores of the best parameters; with ``score_eval=False`` no
    eval score is computed, and ``"score_eval"`` (not JSON) computes it on request, once the
    rate is chosen. ``reference``: the eval scores of the final parameters (``encoded`` needs
    no validation split). ``progress`` (a bar over the steps) shows the loss and the last
    validation. ``return_model`` adds the model as it is after the last step, whichever
    parameters were scored (``"final_model"``, not JSON), for checks."""
    reference = config.protocol == "reference"
    if learning_rate is None:
        (learning_rate,) = learning_rates(config)
    encoder = build_model(encoder_config, params)
    model = SequenceClassifier(encoder, task.num_outputs, config.classifier_dropout, nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    batch_size = config.batch_size
    per_epoch = steps_per_epoch(len(task.train), batch_size, config.protocol)
    total = per_epoch * config.epochs
    eval_every = config.eval_every or per_epoch
    schedule = warmup_linear_decay(learning_rate, round(config.warmup_fraction * total), total)
    tx = adamw(
        schedule,
        clip_norm=config.grad_clip_norm,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    opt_state = tx.init(state)
    regression = task.regression

    def loss_fn(state, ids, mask, labels, weights, key):
        outputs = nnx.merge(graphdef, state)(ids, mask, key)
        return _loss(outputs, labels, weights, regression)

    @jax.jit
    def train_step(state, opt_state, ids, mask, labels, weights, key):
        loss, grads = jax.value_and_grad(loss_fn)(state, ids, mask, labels, weights, key)
        updates, opt_state = tx.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    @jax.jit
    def predict(state, ids, mask):
        outputs = nnx.merge(graphdef, state)(ids, mask)
        return outputs[:, 0] if regression else jnp.argmax(outputs, axis=-1)

    def evaluate(state, split: str) -> dict[str, float]:
        ids, mask = encoded[split]
        out = []
        for rows in _batches(len(ids), batch_size):
            padded = _pad_rows(rows, batch_size)
            out.append(np.asarray(predict(state, ids[padded], mask[padded]))[: len(rows)])
        return scores(np.concatenate(out), getattr(task, split).labels, regression)

    ids, mask = encoded["train"]
    labels = task.train.labels.astype(np.float32 if regression else np.int32)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    metric = selection_metric(task)
    best: dict[str, Any] = {}
    if not reference:
        best = {"step": 0, "validation": evaluate(state, "validation"), "state": state}
    stale, step, history = 0, 0, []
    stopped = False
    for _ in range(config.epochs):
        order = rng.permutation(len(ids))
        for batch in range(per_epoch):
            rows, weights = _train_batch(order, batch, batch_size)
            state, opt_state, loss = train_step(
                state, opt_state, ids[rows], mask[rows], labels[rows], weights,
                jax.random.fold_in(key, step),
            )  # fmt: skip
            step += 1
            if progress is not None:
                progress.update(1)
            if reference:
                if step % per_epoch == 0:  # the loss of each epoch's last batch
                    history.append({"step": step, "loss": float(loss)})
                    if progress is not None:
                        progress.set_postfix(loss=f"{float(loss):.4g}")
                continue
            if step % eval_every and step != total:
                continue
            validation = evaluate(state, "validation")
            history.append({"step": step, "loss": float(loss), **validation})
            if progress is not None:
                progress.set_postfix(
                    loss=f"{float(loss):.4g}", **{metric: f"{validation[metric]:.4f}"}
                )
            if validation[metric] > best["validation"][metric]:
                best = {"step": step, "validation": validation, "state": state}
                stale = 0
            else:
                stale += 1
            if config.patience and stale >= config.patience:
                stopped = True
                break
        if stopped:
            break
    if reference:
        result = {"seed": seed, "steps": step, "eval": evaluate(state, "eval"), "history": history}
    else:
        result = {
            "seed": seed,
            "learning_rate": learning_rate,
            "best_step": best["step"],
            "steps": step,
            "cut_short": best["step"] == step,
            "validation": best["validation"],
            "history": history,
        }
        best_state = best["state"]
        if score_eval:
            result["eval"] = evaluate(best_state, "eval")
        else:
            result["score_eval"] = lambda: evaluate(best_state, "eval")
    if return_model:
        result["final_model"] = nnx.merge(graphdef, state)
    return result


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (0 for one value)."""
    array = np.asarray(values, np.float64)
    std = float(np.std(array, ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(np.mean(array)), "std": std, "values": [float(v) for v in array]}


def run(
    config: ml_collections.ConfigDict,
    source: str | os.PathLike,
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tunes the encoder in ``source`` (workdir or HuggingFace directory) once per seed
    and writes ``WORKDIR/results.json``; returns its contents. ``progress`` shows a bar per
    seed with the loss and the last validation score."""
    check_location(workdir, "--workdir")
    check_finetune_config(config)
    reference = config.protocol == "reference"
    seeds = parse_seeds(config.seeds)
    loaded = weights.load(source, step)
    task = load_task(config)
    max_length = min(config.max_length, loaded.config.max_block_size)
    encoded = {
        name: encode(loaded.tokenizer, getattr(task, name), max_length)
        for name in (("train", "eval") if reference else ("train", "validation", "eval"))
    }
    if len(task.train) < config.batch_size:
        raise FinetuneError(
            f"{len(task.train)} training examples are fewer than batch_size={config.batch_size}"
        )
    params = model_params(loaded.model)
    per_epoch = steps_per_epoch(len(task.train), config.batch_size, config.protocol)

    def one_run(seed: int, rate: float, **options: Any) -> dict[str, Any]:
        with tqdm(
            total=per_epoch * config.epochs, desc=f"fine-tune seed {seed} lr {rate:g}",
            unit="step", disable=not progress, dynamic_ncols=True, leave=False,
        ) as bar:  # fmt: skip
            return train_one_seed(
                config, task, loaded.config, params, seed, encoded, bar, learning_rate=rate,
                **options,
            )  # fmt: skip

    rates = learning_rates(config)
    selection = None
    if len(rates) > 1:
        selection, first = _select_rate(
            task, rates, lambda rate: one_run(seeds[0], rate, score_eval=False)
        )
        runs = [first]
        later = ", ".join(str(seed) for seed in seeds[1:])
        print(  # the whole table comes with the results (format_results)
            f"learning rate {selection['chosen']:g}, chosen on validation {selection['metric']}"
            f" (seed {selection['seed']})" + (f"; now seeds {later}" if later else "")
        )
    else:
        runs = []
    chosen = rates[0] if selection is None else selection["chosen"]
    runs += [one_run(seed, chosen) for seed in seeds[len(runs) :]]
    for result in runs:
        shown = " ".join(f"{k}={v:.4f}" for k, v in result["eval"].items())
        scored = (
            f"final step {result['steps']}" if reference else f"best step {result['best_step']}"
        )
        short = f"; warning: {CUT_SHORT}" if result.get("cut_short") else ""
        print(f"seed {result['seed']}: {scored}, eval {shown}{short}")
    metric_names = list(runs[0]["eval"])
    results = {
        "task": config.task if config.task != "table" else task.name,
        "protocol": config.protocol,
        "pretrained": str(source),
        "pretrained_step": loaded.step,
        "labels": task.label_names,
        "sizes": {name: len(getattr(task, name)) for name in ("train", "validation", "eval")},
        "dropped_rows": dict(task.dropped),
        "selection_metric": None if reference else selection_metric(task),
        "learning_rate": chosen,
        "learning_rate_selection": selection,
        "steps_per_epoch": per_epoch,
        "metrics": {m: mean_std([r["eval"][m] for r in runs]) for m in metric_names},
        "cut_short": any(r.get("cut_short", False) for r in runs),
        "warnings": [
            f"seed {r['seed']} (learning rate {r['learning_rate']:g}): {CUT_SHORT}"
            for r in runs
            if r.get("cut_short")
        ],
        "runs": runs,
    }
    out = as_path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _select_rate(
    task: Task, rates: Sequence[float], train_first_seed: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Trains ``train_first_seed(rate)`` for every rate (validation only) and keeps the rate
    of the best validation score (the first of equal ones); returns the selection record and
    the chosen rate's run, its best parameters now scored on the eval split."""
    metric = selection_metric(task)
    trials = [train_first_seed(rate) for rate in rates]
    best = max(range(len(rates)), key=lambda i: (trials[i]["validation"][metric], -i))
    chosen = trials[best]
    chosen["eval"] = chosen.pop("score_eval")()
    for trial in trials:
        trial.pop("score_eval", None)  # frees the other rates' parameters
    record = {
        "seed": chosen["seed"],
        "metric": metric,
        "chosen": rates[best],
        "candidates": [
            {
                "learning_rate": rate,
                "validation": trial["validation"][metric],
                "best_step": trial["best_step"],
                "cut_short": trial["cut_short"],
            }
            for rate, trial in zip(rates, trials, strict=True)
        ],
    }
    return record, chosen


def _format_selection(selection: dict[str, Any]) -> str:
    """Every candidate rate's validation score, and the chosen one."""
    lines = [
        f"learning rate, chosen on validation {selection['metric']} (seed {selection['seed']}):"
    ]
    for candidate in selection["candidates"]:
        mark = " <- chosen" if candidate["learning_rate"] == selection["chosen"] else ""
        short = f" ({CUT_SHORT})" if candidate["cut_short"] else ""
        lines.append(
            f"  {candidate['learning_rate']:>8g}: {candidate['validation']:.4f}{mark}{short}"
        )
    return "\n".join(lines)


def format_results(results: dict[str, Any]) -> str:
    scored = {
        "selected": "the best validation checkpoint of each seed",
        "reference": "the final parameters of each seed, trained on the whole train split",
    }[results["protocol"]]
    seeds = len(results["runs"])
    lines = [
        f"{results['task']} ({seeds} seed{'s' * (seeds != 1)}, eval split; protocol "
        f"{results['protocol']!r}: {scored}):"
    ]
    for name, m in results["metrics"].items():
        lines.append(f"  {name:>9}: {m['mean']:.4f} ± {m['std']:.4f}")
    if results.get("learning_rate_selection"):
        lines.insert(0, _format_selection(results["learning_rate_selection"]))
    lines.extend(f"warning: {w}" for w in results.get("warnings", []))
    return "\n".join(lines)
