"""Fine-tuning (guided_jax.analysis.finetune): metrics against hand-computed values, the best
validation step's parameters scored on the eval split, early stopping at the right validation,
the reference protocol (every train row, the final parameters scored) and its preset's values,
classification and regression runs on the session's tiny encoder, and every FinetuneError."""

import json
import math

import numpy as np
import pytest

from conftest import REPO, write_keyword_csv
from guided_jax import weights
from guided_jax.analysis import finetune
from guided_jax.config import load_config
from guided_jax.data.tables import FinetuneError, Split, Task, encode, load_task
from guided_jax.model import model_params


def _config(task="table", **data):
    config = load_config(str(REPO / "configs" / "finetune.py"))
    config.task = task
    config.data.update(data)
    return config


# ----------------------------------------------------------------------------- metrics


def test_scores():
    got = finetune.scores(np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1]), regression=False)
    assert got["accuracy"] == 0.75
    assert got["macro_f1"] == pytest.approx(0.7333333)
    assert got["mcc"] == pytest.approx(0.5773503)
    reg = finetune.scores(np.array([0.1, 0.4, 0.3]), np.array([1.0, 3.0, 2.0]), regression=True)
    assert reg["pearson"] == pytest.approx(0.9819805) and reg["spearman"] == pytest.approx(1.0)
    assert finetune.mean_std([0.5, 0.7]) == {
        "mean": pytest.approx(0.6), "std": pytest.approx(0.1414214), "values": [0.5, 0.7],
    }  # fmt: skip


def test_macro_f1_and_mcc_on_unbalanced_labels():
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    predictions = np.array([0, 0, 0, 0, 0, 1, 0, 1, 1, 0, 0, 0])
    got = finetune.scores(predictions, labels, regression=False)
    # class 0: tp 6, fp 3, fn 1 -> F1 12/16; class 1: tp 2, fp 1, fn 1 -> F1 4/6;
    # class 2 is never predicted: tp 0 -> F1 0 (precision counted as 0, not an error).
    assert got["macro_f1"] == pytest.approx((12 / 16 + 4 / 6 + 0) / 3)
    assert got["accuracy"] == pytest.approx(8 / 12)
    # Multi-class MCC: (c s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2) (s^2 - sum t_k^2)) with
    # c = 8 correct of s = 12, predicted counts p = (9, 3, 0), true counts t = (7, 3, 2).
    want = (8 * 12 - (9 * 7 + 3 * 3)) / np.sqrt((144 - (81 + 9)) * (144 - (49 + 9 + 4)))
    assert got["mcc"] == pytest.approx(want)
    assert got["macro_f1"] < got["accuracy"]  # the rare class pulls the macro average down


# ----------------------------------------------------------------------------- one seed


@pytest.fixture(scope="module")
def encoder(tiny_run):
    return weights.load(tiny_run)


def _keyword_split(rows: int, seed: int, regression: bool) -> Split:
    """Short sentences as a split: class 1 with the word "excellent", else 0; for regression
    distinct scores, 2 higher with the word."""
    rng = np.random.default_rng(seed)
    words = ["the", "a", "cat", "dog", "sees", "likes", "river", "garden"]
    texts, labels = [], []
    for i in range(rows):
        sentence = list(rng.choice(words, size=5))
        if i % 2:
            sentence.insert(2, "excellent")
        texts.append((" ".join(sentence),))
        labels.append(2.0 * (i % 2) + 0.01 * i if regression else i % 2)
    return Split(texts, np.asarray(labels, np.float32 if regression else np.int32))


def _one_seed_inputs(encoder, *, regression: bool, train_rows: int = 32, **overrides):
    """A fine-tuning config and a small task whose validation and eval splits hold the same
    texts (so a validation score is also the eval score of the same parameters)."""
    config = _config()
    config.update(
        batch_size=8, epochs=2, max_length=16, learning_rates="3e-3", eval_every=1, patience=0
    )
    config.update(overrides)
    config.regression = regression
    held = _keyword_split(8, 1, regression)
    task = Task(
        "keywords",
        _keyword_split(train_rows, 0, regression),
        held,
        Split(list(held.texts), held.labels.copy()),  # equal values, another array
        [] if regression else ["0", "1"],
    )
    encoded = {
        name: encode(encoder.tokenizer, getattr(task, name), config.max_length)
        for name in ("train", "validation", "eval")
    }
    return config, task, encoded


def _scripted(monkeypatch, task: Task, metric: str, trajectory: list[float]):
    """Validation scores follow ``trajectory`` (the first is the untrained model's); every call's
    real predictions are recorded as ``(split, predictions)``."""
    calls = []
    real = finetune.scores

    def scores(predictions, labels, regression):
        got = real(predictions, labels, regression)
        split = "validation" if labels is task.validation.labels else "eval"
        calls.append((split, np.array(predictions)))
        if split == "validation":
            got[metric] = trajectory[sum(s == "validation" for s, _ in calls) - 1]
        return got

    monkeypatch.setattr(finetune, "scores", scores)
    return calls


@pytest.mark.parametrize(
    ("trajectory", "best"),
    [
        ([0.0, 0.2, 0.7, 0.5, 0.4, 0.3, 0.6, 0.1, 0.05], 2),  # the last validation is worse
        ([0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], 0),  # never better than untrained
    ],
    ids=["middle", "untrained"],
)
def test_eval_scores_the_parameters_of_the_best_validation(encoder, monkeypatch, trajectory, best):
    config, task, encoded = _one_seed_inputs(encoder, regression=True)
    calls = _scripted(monkeypatch, task, "pearson", trajectory)
    params = model_params(encoder.model)
    result = finetune.train_one_seed(config, task, encoder.config, params, 0, encoded)
    assert result["steps"] == 8 and [h["step"] for h in result["history"]] == list(range(1, 9))
    assert [h["pearson"] for h in result["history"]] == trajectory[1:]
    assert result["best_step"] == best and result["validation"]["pearson"] == trajectory[best]

    validations = [p for split, p in calls if split == "validation"]
    (evaluated,) = [p for split, p in calls if split == "eval"]
    assert len(validations) == 9  # the untrained model's, then one per step
    # The eval split holds the validation texts: the best step's parameters predict on it
    # exactly what they predicted at that validation, and the last ones predict otherwise.
    np.testing.assert_array_equal(evaluated, validations[best])
    assert not np.allclose(evaluated, validations[-1], atol=1e-6)
    labels = task.eval.labels.astype(np.float64)
    pearson = np.corrcoef(evaluated.astype(np.float64), labels)[0, 1]
    ranks = np.corrcoef(np.argsort(np.argsort(evaluated)), np.argsort(np.argsort(labels)))[0, 1]
    assert result["eval"]["pearson"] == pytest.approx(pearson, rel=1e-5)
    assert result["eval"]["spearman"] == pytest.approx(ranks, rel=1e-6)


@pytest.mark.parametrize(
    ("patience", "eval_every", "trajectory", "validated", "best"),
    [
        (2, 1, [0.0, 0.3, 0.5, 0.5, 0.4, 0.9, 0.9, 0.9, 0.9], [1, 2, 3, 4], 2),  # tie, worse
        (1, 1, [0.0, 0.3, 0.5, 0.5, 0.4, 0.9, 0.9, 0.9, 0.9], [1, 2, 3], 2),  # a tie is stale
        (1, 2, [0.0, 0.5, 0.4, 0.9, 0.9], [2, 4], 2),
        (2, 3, [0.0, 0.5, 0.4, 0.3], [3, 6, 8], 3),  # the last step is always validated
        (0, 3, [0.0, 0.5, 0.4, 0.3], [3, 6, 8], 3),  # patience 0: never stops
        (2, 1, [0.5, 0.5, 0.4, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], [1, 2], 0),
    ],
)
def test_early_stopping_stops_at_the_right_validation(
    encoder, monkeypatch, patience, eval_every, trajectory, validated, best
):
    config, task, encoded = _one_seed_inputs(
        encoder, regression=False, patience=patience, eval_every=eval_every
    )
    calls = _scripted(monkeypatch, task, "accuracy", trajectory)
    params = model_params(encoder.model)
    result = finetune.train_one_seed(config, task, encoder.config, params, 0, encoded)
    assert [h["step"] for h in result["history"]] == validated
    assert result["steps"] == validated[-1]
    assert result["best_step"] == best
    assert [s for s, _ in calls] == ["validation"] * (len(validated) + 1) + ["eval"]
    assert set(result["eval"]) == {"accuracy", "macro_f1", "mcc"}


def test_flat_validation_stops_after_patience_evaluations(encoder):
    # A learning rate far below float32 resolution leaves every prediction as it was.
    config, task, encoded = _one_seed_inputs(
        encoder, regression=False, learning_rates="1e-30", patience=2
    )
    params = model_params(encoder.model)
    result = finetune.train_one_seed(config, task, encoder.config, params, 0, encoded)
    assert [h["step"] for h in result["history"]] == [1, 2] and result["steps"] == 2
    assert result["best_step"] == 0
    assert [h["accuracy"] for h in result["history"]] == [result["validation"]["accuracy"]] * 2
    assert result["eval"] == result["validation"]  # the same texts and the same parameters


# ----------------------------------------------------------------------------- reference protocol

# What the reference's GLUE fine-tuning uses (ameet-1997/AttentionGuidance). The argparse
# defaults of attention_guidance/src/transformers/training_args.py (TrainingArguments, parsed by
# attention_guidance/examples/text-classification/run_glue.py) and of
# attention_guidance/src/transformers/data/datasets/glue.py (--max_seq_length), overridden where
# the GLUE command of attention_guidance/examples/text-classification/README.md passes a flag
# (--max_seq_length 128 --per_device_train_batch_size 32 --learning_rate 2e-5
# --num_train_epochs 3.0).
REFERENCE_RUN_GLUE = {
    "learning_rate": 2e-5,  # README --learning_rate 2e-5 (default 5e-5)
    "epochs": 3,  # README --num_train_epochs 3.0 (default 3.0)
    "batch_size": 32,  # README --per_device_train_batch_size 32 (default 8)
    "max_length": 128,  # README --max_seq_length 128 (default 128)
    "warmup_fraction": 0.0,  # --warmup_steps default 0
    "weight_decay": 0.0,  # --weight_decay default 0.0
    "adam_eps": 1e-8,  # --adam_epsilon default 1e-8
    "grad_clip_norm": 1.0,  # --max_grad_norm default 1.0
    "seeds": "42",  # --seed default 42
    "classifier_dropout": 0.1,  # hidden_dropout_prob, attention_guidance/ag_config/roberta_12
}


def test_reference_preset_has_the_reference_values_and_the_default_is_unchanged():
    reference = load_config(f"{REPO / 'configs' / 'finetune.py'}:reference")
    assert reference.protocol == "reference"
    assert {key: reference[key] for key in REFERENCE_RUN_GLUE} == REFERENCE_RUN_GLUE
    assert reference.data.validation_file == ""
    selected = _config()
    assert selected.protocol == "selected"
    assert "learning_rates" not in reference and "learning_rate" not in selected
    selected_keys = [k if k != "learning_rate" else "learning_rates" for k in REFERENCE_RUN_GLUE]
    assert {key: selected[key] for key in selected_keys} == {
        "learning_rates": "1e-5,3e-5,1e-4,3e-4,1e-3", "epochs": 3, "batch_size": 16,
        "max_length": 128, "warmup_fraction": 0.06, "weight_decay": 0.01, "adam_eps": 1e-8,
        "grad_clip_norm": 1.0, "seeds": "1,2,3", "classifier_dropout": 0.1,
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"expected one of \['selected', 'reference'\]"):
        load_config(f"{REPO / 'configs' / 'finetune.py'}:best")


def test_padded_examples_do_not_count_in_the_loss():
    outputs = np.array([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]], np.float32)
    labels = np.array([0, 0, 1])
    weights = np.array([1.0, 1.0, 0.0], np.float32)
    each = -np.log(np.exp(outputs[:2, 0]) / np.exp(outputs[:2]).sum(axis=1))
    got = finetune._loss(outputs, labels, weights, regression=False)
    assert float(got) == pytest.approx(each.mean(), rel=1e-6)
    got = finetune._loss(outputs, np.array([1.0, 0.5, 9.0]), weights, regression=True)
    assert float(got) == pytest.approx((1.0 + 0.25) / 2, rel=1e-6)


def test_an_epoch_of_batches_weighs_every_row_once():
    order = np.random.default_rng(0).permutation(20)
    batches = [finetune._train_batch(order, b, 8) for b in range(math.ceil(20 / 8))]
    assert all(len(rows) == len(weights) == 8 for rows, weights in batches)
    rows, weights = batches[-1]  # 4 rows and 4 of padding
    np.testing.assert_array_equal(rows[:4], order[16:])
    np.testing.assert_array_equal(weights, [1, 1, 1, 1, 0, 0, 0, 0])
    counted = np.zeros(20)
    for rows, weights in batches:
        np.add.at(counted, rows, weights)
    np.testing.assert_array_equal(counted, np.ones(20))


def test_reference_keeps_every_train_row(tmp_path):
    train_csv = write_keyword_csv(tmp_path / "train.csv", 20, 0)
    config = _config(train_file=str(train_csv), eval_file=str(train_csv))
    task = load_task(config)
    assert (len(task.train), len(task.validation)) == (18, 2)  # what "selected" holds out
    config.protocol = "reference"
    whole = load_task(config)
    rows = [tuple(line.rsplit(",", 1)) for line in train_csv.read_text().splitlines()[1:]]
    names = whole.label_names
    got = [(t, names[y]) for (t,), y in zip(whole.train.texts, whole.train.labels, strict=True)]
    assert got == rows and len(whole.validation) == 0  # every row, in the file's order


def test_reference_trains_on_every_row_and_scores_the_final_parameters(
    tiny_run, tmp_path, monkeypatch, capsys
):
    config = load_config(f"{REPO / 'configs' / 'finetune.py'}:reference")
    config.data.update(
        train_file=str(_scores_csv(tmp_path / "train.csv", 20, 0)),
        eval_file=str(_scores_csv(tmp_path / "eval.csv", 8, 1)),
    )
    # 20 rows in batches of 8: 3 steps an epoch, the last of 4 rows ("selected" would hold 2
    # rows out and take 2). Patience and eval_every would stop a validating run early.
    config.update(regression=True, batch_size=8, epochs=2, max_length=16, learning_rate=3e-3)
    config.update(patience=1, eval_every=1)
    scored, seen = [], {}
    real_scores, real_train = finetune.scores, finetune.train_one_seed

    def scores(predictions, labels, regression):
        scored.append(np.array(predictions))
        return real_scores(predictions, labels, regression)

    def train_one_seed(*args, **kwargs):
        result = real_train(*args, **kwargs, return_model=True)
        seen.update(model=result.pop("final_model"), encoded=args[5])
        return result

    monkeypatch.setattr(finetune, "scores", scores)
    monkeypatch.setattr(finetune, "train_one_seed", train_one_seed)
    results = finetune.run(config, tiny_run, tmp_path / "ft", progress=False)

    assert json.loads((tmp_path / "ft" / "results.json").read_text()) == results
    assert results["protocol"] == "reference" and results["selection_metric"] is None
    assert results["sizes"] == {"train": 20, "validation": 0, "eval": 8}
    assert set(seen["encoded"]) == {"train", "eval"}
    (run,) = results["runs"]
    assert run["seed"] == 42 and run["steps"] == math.ceil(20 / 8) * 2 == 6
    assert [h["step"] for h in run["history"]] == [3, 6]  # one loss per epoch
    assert "best_step" not in run and "validation" not in run
    assert len(scored) == 1  # the final eval only: nothing validated
    # The eval scores are those of the parameters after the last step, predicted here anew.
    ids, mask = seen["encoded"]["eval"]
    final = np.asarray(seen["model"](ids, mask)[:, 0], np.float64)
    np.testing.assert_allclose(scored[0], final, rtol=1e-5, atol=1e-6)
    labels = np.asarray([float(line.rsplit(",", 1)[1]) for line in
                         (tmp_path / "eval.csv").read_text().splitlines()[1:]])  # fmt: skip
    assert run["eval"]["pearson"] == pytest.approx(np.corrcoef(final, labels)[0, 1], abs=1e-3)

    assert "seed 42: final step 6, eval pearson=" in capsys.readouterr().out
    assert "protocol 'reference': the final parameters" in finetune.format_results(results)
    selected = {**results, "protocol": "selected"}
    assert "protocol 'selected': the best validation checkpoint" in (
        finetune.format_results(selected)
    )


# ----------------------------------------------------------------------------- whole runs


def _with_empty_labels(path, lines: list[int]):
    """Empties the label of the given file lines of a keyword CSV (the header is line 1)."""
    rows = path.read_text().splitlines()
    for line in lines:
        rows[line - 1] = rows[line - 1].rsplit(",", 1)[0] + ","
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.slow
def test_learns_a_keyword_task_clearly_above_chance(tiny_run, tmp_path):
    train_csv = _with_empty_labels(write_keyword_csv(tmp_path / "train.csv", 324, 0), [3, 8, 9, 50])
    eval_csv = _with_empty_labels(write_keyword_csv(tmp_path / "eval.csv", 101, 1), [102])
    config = _config(train_file=str(train_csv), eval_file=str(eval_csv))
    with pytest.raises(FinetuneError, match=r"4 of 324 rows .* lines 3, 8, 9, 50;"):
        finetune.run(config, tiny_run, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()

    config.data.drop_empty_labels = True
    config.update(seeds="1,2", learning_rates="1e-3", epochs=4, max_length=16)
    results = finetune.run(config, tiny_run, tmp_path / "ft", progress=False)
    assert json.loads((tmp_path / "ft" / "results.json").read_text()) == results
    assert results["labels"] == ["no", "yes"] and results["pretrained_step"] == 6
    assert results["sizes"] == {"train": 288, "validation": 32, "eval": 100}
    assert results["dropped_rows"] == {"train": 4, "validation": 0, "eval": 1}
    accuracy = results["metrics"]["accuracy"]
    assert [r["seed"] for r in results["runs"]] == [1, 2]
    assert min(accuracy["values"]) >= 0.8, accuracy  # chance is 0.5
    assert accuracy["values"] == [r["eval"]["accuracy"] for r in results["runs"]]
    assert accuracy["mean"] == pytest.approx(np.mean(accuracy["values"]))
    assert accuracy["std"] == pytest.approx(np.std(accuracy["values"], ddof=1))
    assert f"accuracy: {accuracy['mean']:.4f} ± {accuracy['std']:.4f}" in (
        finetune.format_results(results)
    )
    for run in results["runs"]:
        assert 0 < run["best_step"] <= run["steps"]
        assert set(run["eval"]) == {"accuracy", "macro_f1", "mcc"}


def _scores_csv(path, rows: int, seed: int):
    """The keyword table with numeric labels: 1 with "excellent", 0 without, plus 0.001 per row
    (so no two are equal)."""
    lines = write_keyword_csv(path, rows, seed).read_text().splitlines()
    for i, line in enumerate(lines[1:], 1):
        text, label = line.rsplit(",", 1)
        lines[i] = f"{text},{float(label == 'yes') + 0.001 * i:.3f}"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_regression_task_trains(tiny_run, tmp_path):
    config = _config(
        train_file=str(_scores_csv(tmp_path / "train.csv", 320, 0)),
        eval_file=str(_scores_csv(tmp_path / "eval.csv", 48, 1)),
    )
    config.update(regression=True, seeds="3", epochs=3, learning_rates="2e-3", max_length=16)
    config.update(eval_every=5, patience=0)
    results = finetune.run(config, tiny_run, tmp_path / "ft", progress=False)
    assert results["labels"] == [] and results["selection_metric"] == "pearson"
    assert set(results["metrics"]) == {"pearson", "spearman"}
    assert results["sizes"] == {"train": 288, "validation": 32, "eval": 48}
    (run,) = results["runs"]
    assert run["steps"] == 54 and [h["step"] for h in run["history"]][-1] == 54
    assert run["eval"]["pearson"] > 0.7, run
    losses = [h["loss"] for h in run["history"]]  # MSE of one batch: 0.25 for the mean alone
    assert max(losses[-3:]) < min(losses[:2]), losses


# ----------------------------------------------------------------------------- data and errors


def test_pairs_are_encoded_as_the_model_type_expects(encoder):
    tokenizer = encoder.tokenizer
    split = Split([("the cat", "a dog sees the ball")], np.zeros(1, np.int32))
    ids, mask = encode(tokenizer, split, 64)
    a, b = tokenizer.encode_batch(["the cat", "a dog sees the ball"])
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    assert ids[0].tolist() == [bos, *a, eos, eos, *b, eos] and mask.all()
    short, _ = encode(tokenizer, split, 8)
    assert short.shape == (1, 8) and short[0, -1] == eos


def test_glue_tasks_come_from_tfds():
    tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed")
    with tfds.testing.mock_data(num_examples=20):
        task = load_task(_config("glue/stsb"))
        assert task.regression and task.num_outputs == 1
        assert all(len(t) == 2 and all(isinstance(s, str) for s in t) for t in task.eval.texts)
        cola = load_task(_config("glue/cola"))
    assert cola.label_names == ["0", "1"] and len(cola.train) == 18
    assert finetune.selection_metric(cola) == "mcc"


def _glue_with_negative_labels(monkeypatch):
    import tensorflow_datasets as tfds

    examples = [{"sentence": b"a b", "label": -1}, {"sentence": b"c", "label": 1}] * 10
    monkeypatch.setattr(tfds, "data_source", lambda *args, **kwargs: examples)


# name: (what to set up, the config's task, data and other values, the expected message)
ERRORS = {
    "file does not exist": ("", "table", {"train_file": "nope.csv"}, {}, "'.*nope.csv' does not"),
    "not UTF-8": ("latin1", "table", {}, {}, "is not UTF-8 text"),
    "JSON line": ("bad_json", "table", {}, {}, r"line 2: not JSON"),
    "JSON object": ("json_list", "table", {}, {}, r"line 1: expected a JSON object"),
    "format": ("xlsx", "table", {}, {}, r"unknown format '\.xlsx'"),
    "no examples": ("header_only", "table", {}, {}, "holds no examples"),
    "no column": ("", "table", {"label_column": "y"}, {}, r"has no column 'y'.*\['label'"),
    "duplicate header": ("duplicate", "table", {}, {}, r"names columns \['label'\] more than"),
    "bad quoting": ("bad_quote", "table", {}, {}, r"row starting on line 3 is not valid CSV"),
    "extra fields": ("extra", "table", {}, {}, r"1 rows with more fields .* \(lines 3\)"),
    "no text": ("no_text", "table", {"text_pair_column": "pair"}, {}, r"'pair'\] \(lines 3\)"),
    "empty labels": ("empty_label", "table", {}, {}, r"2 of 22 rows .* lines 3, 5;"),
    "no label at all": ("all_empty", "table", {"drop_empty_labels": True}, {}, "no row with a"),
    "regression": ("", "table", {}, {"regression": True}, r"line 2: regression labels"),
    "unknown label": ("maybe", "table", {}, {}, r"labels \['maybe'\] that the training"),
    "single label": ("single", "table", {}, {}, r"a single label \['1'\]"),
    "fraction": ("", "table", {"validation_fraction": 1.0}, {}, r"must be in \(0, 1\)"),
    "too few": ("two_rows", "table", {"validation_fraction": 0.9}, {}, "too few to hold out"),
    "no eval file": ("", "table", {"eval_file": ""}, {}, r"needs data\.eval_file"),
    "task": ("", "squad", {}, {}, "task must be 'table' or 'glue/<name>'"),
    "glue task": ("", "glue/squad", {}, {}, "glue/ one of"),
    "glue missing": ("empty_dir", "glue/cola", {}, {}, "cannot open TFDS split 'train'"),
    "glue labels": ("glue_labels", "glue/cola", {}, {}, r"labels outside \[0, 2\)"),
}
# Their messages are about the settings, not about one file.
NAMES_NO_FILE = {"fraction", "too few", "no eval file", "task"} | {n for n in ERRORS if "glue" in n}
CONFIG_ERRORS = {
    "batch_size": ({"batch_size": 0}, "config batch_size must be positive, got 0"),
    "epochs": ({"epochs": -1}, "config epochs must be positive"),
    "learning_rates": ({"learning_rates": "0"}, "config learning_rates must be comma-separated"),
    "max_length positive": ({"max_length": 0}, "config max_length must be positive"),
    "max_length": ({"max_length": 2}, "max_length must be at least 3, got 2"),
    "eval_every": ({"eval_every": -1}, "eval_every must be >= 0"),
    "patience": ({"patience": -1}, "patience must be >= 0"),
    "weight_decay": ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
    "split_seed": ({"split_seed": -1}, "split_seed must be >= 0"),
    "warmup_fraction": ({"warmup_fraction": 1.0}, r"warmup_fraction must be in \[0, 1\)"),
    "classifier_dropout": ({"classifier_dropout": -0.1}, r"classifier_dropout must be in \[0, 1"),
    "validation_fraction": ({"data.validation_fraction": 0.0}, r"validation_fraction .*\(0, 1\)"),
    "protocol": ({"protocol": "best"}, r"config protocol must be one of \['selected', 'refer"),
    "reference validation_file": (
        {"protocol": "reference", "data.validation_file": "valid.csv"},
        r"config data\.validation_file must be empty with protocol='reference'.*'valid\.csv'",
    ),
    "adam_eps": ({"adam_eps": 0.0}, "config adam_eps must be positive, got 0.0"),
    "grad_clip_norm": ({"grad_clip_norm": -1.0}, "config grad_clip_norm must be >= 0"),
    "seeds": ({"seeds": "1,x"}, "seeds must be comma-separated integers"),
    "seeds once": ({"seeds": "1,1"}, "seeds must name at least one seed, each once"),
    "no seed": ({"seeds": " "}, "seeds must name at least one seed"),
}

KEYWORDS = "text,label\n" + "a b,yes\nc d,no\n" * 10
FILES = {
    "latin1": ("t.csv", "text,label\ncaf\xe9,1\n".encode("latin-1")),
    "bad_json": ("t.jsonl", b'{"text": "a", "label": "x"}\n{"text": \n'),
    "json_list": ("t.jsonl", b'["a", "x"]\n'),
    "xlsx": ("t.xlsx", b"text,label\na,1\nb,0\n"),
    "header_only": ("t.csv", b"text,label\n"),
    "duplicate": ("t.csv", b"text,label,label\na,1,2\nb,0,1\n"),
    "bad_quote": ("t.csv", b'text,label\na,1\n"b" c,0\n'),
    "extra": ("t.csv", b"text,label\na,1\nb, c,0\n"),
    "no_text": ("t.csv", b"text,pair,label\na,,1\nb\n"),
    "empty_label": ("t.csv", b"text,label\na,yes\nb,\nc,no\nd, \n" + b"e,yes\nf,no\n" * 9),
    "all_empty": ("t.csv", b"text,label\na,\nb,\n"),
    "single": ("t.csv", b"text,label\na,1\nb,1\n"),
    "two_rows": ("t.csv", b"text,label\na,1\nb,0\n"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_every_bad_task_is_refused_with_what_was_expected(name, tmp_path, monkeypatch):
    setup, task, data, values, message = ERRORS[name]
    train = tmp_path / "train.csv"
    train.write_text(KEYWORDS)
    data = {"train_file": str(train), "eval_file": str(train), **data}
    if data["train_file"] == "nope.csv":
        data["train_file"] = str(tmp_path / "nope.csv")
    if setup in FILES:
        file_name, content = FILES[setup]
        (tmp_path / file_name).write_bytes(content)
        data["train_file"] = str(tmp_path / file_name)
    elif setup == "maybe":
        (tmp_path / "eval.csv").write_text("text,label\na b,maybe\n")
        data["eval_file"] = str(tmp_path / "eval.csv")
    elif setup == "empty_dir":
        data["tfds_data_dir"] = str(tmp_path / "tfds")
    elif setup == "glue_labels":
        _glue_with_negative_labels(monkeypatch)
    config = _config(task, **data)
    config.update(values)
    with pytest.raises(FinetuneError, match=message) as caught:
        load_task(config)
    if name not in NAMES_NO_FILE:
        assert str(tmp_path) in str(caught.value)


@pytest.mark.parametrize("name", list(CONFIG_ERRORS))
def test_bad_settings_are_refused_before_anything_is_read(name, tmp_path):
    values, message = CONFIG_ERRORS[name]
    config = _config(train_file=str(tmp_path / "absent.csv"), eval_file="")
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    with pytest.raises(FinetuneError, match=message):
        finetune.run(config, tmp_path / "no_such_encoder", tmp_path / "ft", progress=False)
    assert not (tmp_path / "ft").exists()


def test_fewer_examples_than_a_batch_are_refused(tiny_run, tmp_path):
    data = write_keyword_csv(tmp_path / "train.csv", 20, 0)
    config = _config(train_file=str(data), eval_file=str(data))
    config.batch_size = 32
    with pytest.raises(FinetuneError, match="18 training examples are fewer than batch_size=32"):
        finetune.run(config, tiny_run, tmp_path / "ft", progress=False)
    assert not (tmp_path / "ft").exists()


# ----------------------------------------------------------------------------- learning rates


def test_the_rate_is_chosen_on_validation_with_the_first_seed_then_run_with_every_seed(
    tiny_run, tmp_path, monkeypatch, capsys
):
    """Each candidate trains with the first seed and is scored on validation only; the best
    (the first of equal scores) runs with every seed, its first-seed run reused. Eval scores
    are set to reverse the validation order, so a choice made on them would differ."""
    validation = {1e-5: 0.6, 3e-5: 0.9, 1e-4: 0.9, 3e-4: 0.7, 1e-3: 0.5}
    eval_score = {rate: 1.0 - v for rate, v in validation.items()}
    calls, scored = [], []

    def train_one_seed(config, task, encoder_config, params, seed, encoded, bar=None, *,
                       learning_rate, score_eval=True):  # fmt: skip
        calls.append((seed, learning_rate, score_eval))
        result = {
            "seed": seed, "learning_rate": learning_rate, "best_step": 3, "steps": 5,
            "cut_short": False, "validation": {"accuracy": validation[learning_rate]},
            "history": [],
        }  # fmt: skip

        def score():
            scored.append((seed, learning_rate))
            return {"accuracy": eval_score[learning_rate] + seed / 100}

        if score_eval:
            result["eval"] = score()
        else:
            result["score_eval"] = score
        return result

    monkeypatch.setattr(finetune, "train_one_seed", train_one_seed)
    train_csv = write_keyword_csv(tmp_path / "train.csv", 40, 0)
    config = _config(train_file=str(train_csv), eval_file=str(train_csv))
    config.update(seeds="4,5,6", max_length=16)
    results = finetune.run(config, tiny_run, tmp_path / "ft", progress=False)

    rates = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
    assert calls == [(4, r, False) for r in rates] + [(5, 3e-5, True), (6, 3e-5, True)]
    assert scored == [(4, 3e-5), (5, 3e-5), (6, 3e-5)]  # no other rate ever reached eval
    assert results["learning_rate"] == 3e-5
    selection = results["learning_rate_selection"]
    assert (selection["seed"], selection["metric"], selection["chosen"]) == (4, "accuracy", 3e-5)
    assert [(c["learning_rate"], c["validation"]) for c in selection["candidates"]] == [
        (r, validation[r]) for r in rates
    ]
    assert [r["eval"]["accuracy"] for r in results["runs"]] == pytest.approx([0.14, 0.15, 0.16])
    assert json.loads((tmp_path / "ft" / "results.json").read_text()) == results
    # The choice as soon as it is made (one line), the candidates' table once, with the results
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == (
        "learning rate 3e-05, chosen on validation accuracy (seed 4); now seeds 5, 6"
    )
    table = finetune.format_results(results)
    assert "learning rate, chosen on validation accuracy (seed 4):" in table
    assert "     3e-05: 0.9000 <- chosen" in table and "    0.0003: 0.7000\n" in table
    assert "<- chosen" not in printed


@pytest.mark.parametrize(
    ("patience", "trajectory", "cut_short"),
    [
        (0, [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], True),  # still rising at the end
        (0, [0.0, 0.2, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], False),  # peaked, then worse
        (2, [0.0, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], False),  # a plateau stops it early
        (0, [0.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2], True),  # late gain at the last step
    ],
    ids=["rising", "peaked", "plateau", "last-step-gain"],
)
def test_a_run_whose_best_validation_is_its_last_is_cut_short(
    encoder, monkeypatch, patience, trajectory, cut_short
):
    config, task, encoded = _one_seed_inputs(encoder, regression=False, patience=patience)
    _scripted(monkeypatch, task, "accuracy", trajectory)
    params = model_params(encoder.model)
    result = finetune.train_one_seed(config, task, encoder.config, params, 0, encoded)
    assert result["cut_short"] is cut_short
    assert result["cut_short"] is (result["best_step"] == result["steps"] == 8)


def test_cut_short_runs_are_warned_about_in_the_output_and_results(
    tiny_run, tmp_path, monkeypatch, capsys
):
    def train_one_seed(config, task, encoder_config, params, seed, encoded, bar=None, *,
                       learning_rate, score_eval=True):  # fmt: skip
        return {
            "seed": seed, "learning_rate": learning_rate, "best_step": 5, "steps": 5,
            "cut_short": seed == 2, "validation": {"accuracy": 0.8},
            "eval": {"accuracy": 0.7}, "history": [],
        }  # fmt: skip

    monkeypatch.setattr(finetune, "train_one_seed", train_one_seed)
    train_csv = write_keyword_csv(tmp_path / "train.csv", 40, 0)
    config = _config(train_file=str(train_csv), eval_file=str(train_csv))
    config.update(seeds="1,2", max_length=16, learning_rates="1e-4")
    results = finetune.run(config, tiny_run, tmp_path / "ft", progress=False)
    warning = "seed 2 (learning rate 0.0001): best step = last step: raise epochs or learning_rate"
    assert results["cut_short"] is True and results["warnings"] == [warning]
    assert results["learning_rate_selection"] is None and results["learning_rate"] == 1e-4
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "seed 1: best step 5, eval accuracy=0.7000"
    assert lines[1] == (
        "seed 2: best step 5, eval accuracy=0.7000; warning: best step = last step: raise "
        "epochs or learning_rate"
    )
    assert finetune.format_results(results).splitlines()[-1] == f"warning: {warning}"


@pytest.mark.slow
def test_the_default_rate_selection_is_within_a_point_of_the_best_rate(tiny_run, tmp_path):
    """The default protocol against a manual sweep of its candidates (every rate with every
    seed, scored on eval): the rate it picks on validation scores within 1 point of the best."""
    train_csv = write_keyword_csv(tmp_path / "train.csv", 320, 0)
    eval_csv = write_keyword_csv(tmp_path / "eval.csv", 100, 1)
    config = _config(train_file=str(train_csv), eval_file=str(eval_csv))
    config.update(seeds="1,2", max_length=16, epochs=4)
    default = finetune.run(config, tiny_run, tmp_path / "default", progress=False)
    sweep = {}
    for rate in [float(r) for r in config.learning_rates.split(",")]:
        config.learning_rates = str(rate)
        one = finetune.run(config, tiny_run, tmp_path / f"lr{rate:g}", progress=False)
        sweep[rate] = one["metrics"]["accuracy"]["mean"]
    best = max(sweep.values())
    assert max(sweep.values()) - min(sweep.values()) > 0.05, sweep  # the rate matters here
    print(f"manual sweep (eval accuracy, mean of 2 seeds): {sweep}; chosen on validation: "
          f"{default['learning_rate']:g}")  # fmt: skip
    assert default["metrics"]["accuracy"]["mean"] >= best - 0.01, (default["learning_rate"], sweep)
    assert default["metrics"]["accuracy"]["mean"] == pytest.approx(sweep[default["learning_rate"]])
