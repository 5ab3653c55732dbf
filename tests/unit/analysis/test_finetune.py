"""Fine-tuning: tables and GLUE (TFDS mock data) read into splits, sequence pairs encoded,
metrics from scikit-learn/scipy, and a tiny pretrained encoder that learns a keyword task
from a CSV clearly above chance, over two seeds."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, cli_env, write_corpus
from guided_jax import finetune, pretrained, train
from guided_jax.config import load_config

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sees",
    "likes",
    "river",
    "garden",
    "ball",
    "letter",
    "old",
    "small",
    "red",
    "bird",
    "man",
]


def _config(task="table", **data):
    config = load_config(str(REPO / "configs" / "finetune.py"))
    config.task = task
    config.data.update(data)
    return config


def write_keyword_csv(path, rows: int, seed: int):
    """Label 1 when the sentence holds the word "excellent", else 0 (half of each)."""
    rng = np.random.default_rng(seed)
    lines = ["text,label"]
    for i in range(rows):
        words = list(rng.choice(WORDS, size=rng.integers(4, 9)))
        if i % 2:
            words.insert(int(rng.integers(0, len(words))), "excellent")
        lines.append(f"{' '.join(words)},{'yes' if i % 2 else 'no'}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.data.train_files = str(write_corpus(root / "corpus.txt"))
    train.train_and_evaluate(config, root / "run", devices=jax.devices()[:1])
    return root / "run"


def test_table_task_reads_csv_tsv_and_jsonl_with_configured_columns(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\ty\tq\n" + "A b\tpos\tc d\nE f\tneg\tg\n" * 10)
    rows = [{"sentence": "x y", "q": "z", "y": "pos"}, {"sentence": "u", "q": "v", "y": "neg"}]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = _config(
        train_file=str(tmp_path / "train.tsv"), eval_file=str(tmp_path / "eval.jsonl"),
        text_column="sentence", text_pair_column="q", label_column="y",
    )  # fmt: skip
    task = finetune.load_task(config)
    assert task.label_names == ["neg", "pos"] and not task.regression
    assert len(task.train) == 18 and len(task.validation) == 2  # 10% held out
    assert task.eval.texts == [("x y", "z"), ("u", "v")]
    assert task.eval.labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("content", "column", "message"),
    [
        (
            "text,label\na,1\n",
            "labels",
            "has no column 'labels'.*columns are \\['label', 'text'\\]",
        ),
        ("text,label\na,1\nb,1\n", "label", "has a single label \\['1'\\]"),
        ("", "label", "holds no examples"),
    ],
)
def test_bad_tables_name_the_file_and_what_was_expected(tmp_path, content, column, message):
    path = tmp_path / "train.csv"
    path.write_text(content)
    config = _config(train_file=str(path), eval_file=str(path), label_column=column)
    with pytest.raises(finetune.FinetuneError, match=message):
        finetune.load_task(config)


def test_eval_labels_unknown_to_training_are_refused(tmp_path):
    write_keyword_csv(tmp_path / "train.csv", 20, 0)
    (tmp_path / "eval.csv").write_text("text,label\na b,maybe\n")
    config = _config(train_file=str(tmp_path / "train.csv"), eval_file=str(tmp_path / "eval.csv"))
    with pytest.raises(finetune.FinetuneError, match="labels \\['maybe'\\] that the training"):
        finetune.load_task(config)


def test_glue_tasks_come_from_tfds(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed")
    with tfds.testing.mock_data(num_examples=20):
        task = finetune.load_task(_config("glue/stsb"))
        assert task.regression and task.num_outputs == 1
        assert all(len(t) == 2 and all(isinstance(s, str) for s in t) for t in task.eval.texts)
        cola = finetune.load_task(_config("glue/cola"))
    assert cola.label_names == ["0", "1"] and len(cola.train) == 18
    assert finetune.selection_metric(cola) == "mcc"
    with pytest.raises(finetune.FinetuneError, match="glue/ one of"):
        finetune.load_task(_config("glue/squad"))


def test_pairs_are_encoded_as_the_model_type_expects(tiny_run):
    tokenizer = pretrained.load(tiny_run).tokenizer
    split = finetune.Split([("the cat", "a dog sees the ball")], np.zeros(1, np.int32))
    ids, mask = finetune.encode(tokenizer, split, 64)
    a, b = tokenizer.encode_batch(["the cat", "a dog sees the ball"])
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    assert ids[0].tolist() == [bos, *a, eos, eos, *b, eos] and mask.all()
    short, _ = finetune.encode(tokenizer, split, 8)
    assert short.shape == (1, 8) and short[0, -1] == eos


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


@pytest.mark.slow
def test_cli_learns_a_keyword_task_clearly_above_chance(tiny_run, tmp_path):
    train_csv = write_keyword_csv(tmp_path / "train.csv", 320, 0)
    eval_csv = write_keyword_csv(tmp_path / "eval.csv", 100, 1)
    result = subprocess.run(
        [sys.executable, "-m", "guided_jax.finetune", f"--config={REPO / 'configs/finetune.py'}",
         f"--pretrained={tiny_run}", f"--workdir={tmp_path / 'ft'}",
         f"--config.data.train_file={train_csv}", f"--config.data.eval_file={eval_csv}",
         "--config.seeds=1,2", "--config.learning_rate=0.001", "--config.epochs=4",
         "--config.max_length=16"],
        env=cli_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert results["labels"] == ["no", "yes"] and results["pretrained_step"] == 6
    assert results["sizes"] == {"train": 288, "validation": 32, "eval": 100}
    accuracy = results["metrics"]["accuracy"]
    assert [r["seed"] for r in results["runs"]] == [1, 2]
    assert min(accuracy["values"]) >= 0.8, accuracy  # chance is 0.5
    assert accuracy["mean"] == pytest.approx(np.mean(accuracy["values"]))
    assert f"accuracy: {accuracy['mean']:.4f} ± {accuracy['std']:.4f}" in result.stdout
    for run in results["runs"]:
        assert 0 < run["best_step"] <= run["steps"]
        assert set(run["eval"]) == {"accuracy", "macro_f1", "mcc"}
