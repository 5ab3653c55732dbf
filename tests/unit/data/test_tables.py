"""Fine-tuning tables as real-world files come (guided_jax.data.tables): CSV/TSV/JSON lines with
configured columns, quoted fields with line breaks and a byte-order mark, empty labels refused
or dropped, numeric labels read by value, and header errors that name the file."""

import csv
import json

import numpy as np
import pytest

from conftest import REPO, write_keyword_csv
from guided_jax.config import load_config
from guided_jax.data.tables import FinetuneError, load_task, read_rows


def _config(**data):
    config = load_config(str(REPO / "configs" / "finetune.py"))
    config.data.update(data)
    return config


def _write_csv(path, rows, delimiter=",", encoding="utf-8"):
    """``rows`` (the header first) as the csv module writes them: every field that needs it
    quoted, CRLF line ends."""
    with open(path, "w", encoding=encoding, newline="") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def _task(tmp_path, train_rows, eval_rows=None, **data):
    train = _write_csv(tmp_path / "train.csv", [["text", "label"], *train_rows])
    evaluation = _write_csv(tmp_path / "eval.csv", [["text", "label"], *(eval_rows or train_rows)])
    return load_task(_config(train_file=str(train), eval_file=str(evaluation), **data))


def test_table_task_reads_csv_tsv_and_jsonl_with_configured_columns(tmp_path):
    (tmp_path / "train.tsv").write_text("sentence\ty\tq\n" + "A b\tpos\tc d\nE f\tneg\tg\n" * 10)
    rows = [{"sentence": "x y", "q": "z", "y": "pos"}, {"sentence": "u", "q": "v", "y": "neg"}]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = _config(
        train_file=str(tmp_path / "train.tsv"), eval_file=str(tmp_path / "eval.jsonl"),
        text_column="sentence", text_pair_column="q", label_column="y",
    )  # fmt: skip
    task = load_task(config)
    assert task.label_names == ["neg", "pos"] and not task.regression
    assert len(task.train) == 18 and len(task.validation) == 2  # 10% held out
    assert task.eval.texts == [("x y", "z"), ("u", "v")]
    assert task.eval.labels.tolist() == [1, 0]
    assert task.dropped == {"train": 0, "validation": 0, "eval": 0}


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
    with pytest.raises(FinetuneError, match=message) as caught:
        load_task(config)
    assert repr(str(path)) in str(caught.value)


def test_eval_labels_unknown_to_training_are_refused(tmp_path):
    write_keyword_csv(tmp_path / "train.csv", 20, 0)
    (tmp_path / "eval.csv").write_text("text,label\na b,maybe\n")
    config = _config(train_file=str(tmp_path / "train.csv"), eval_file=str(tmp_path / "eval.csv"))
    with pytest.raises(FinetuneError, match=r"eval\.csv' has labels \['maybe'\] that the training"):
        load_task(config)


# ----------------------------------------------------------------------------- quoting


TRICKY = [
    "line\nbreak",
    "carriage\rreturn",
    "crlf\r\ninside",
    "separators\u2028line\u2029paragraph",
    "next line\x85vertical\x0btab and form\x0cfeed",
    'a "quoted" word, and a comma',
    "tab\tinside",
    "  spaces kept  ",
    "",
]


@pytest.mark.parametrize(("suffix", "delimiter"), [(".csv", ","), (".tsv", "\t")])
def test_quoted_fields_keep_every_character(tmp_path, suffix, delimiter):
    rows = [["text", "label", "note"], *[[t, "x", f"row {i}"] for i, t in enumerate(TRICKY)]]
    path = _write_csv(tmp_path / f"t{suffix}", rows, delimiter=delimiter)
    assert b"\r\n" in path.read_bytes()  # and CRLF line ends outside the quotes
    got = read_rows(path, ["text", "label"])
    assert [(r["text"], r["label"], r["note"]) for r in got] == [tuple(r) for r in rows[1:]]


def test_byte_order_mark_and_multi_line_fields(tmp_path):
    rows = [["text", "label"], ["first\nsecond line", "1"], ["plain", "0"]] * 6
    train = _write_csv(
        tmp_path / "train.csv", rows[:1] + rows[1::3] + rows[2::3], encoding="utf-8-sig"
    )
    assert train.read_bytes().startswith(b"\xef\xbb\xbftext,")
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text(
        '{"text": "x\u2028y", "label": "1"}\n{"text": "z", "label": "0"}\n', "utf-8-sig"
    )
    task = load_task(_config(train_file=str(train), eval_file=str(jsonl)))
    assert task.label_names == ["0", "1"]
    texts = {t for (t,) in task.train.texts + task.validation.texts}
    assert texts == {"first\nsecond line", "plain"} and len(task.train) + len(task.validation) == 12
    assert task.eval.texts == [("x\u2028y",), ("z",)] and task.eval.labels.tolist() == [1, 0]


def test_header_names_are_stripped_and_unnamed_columns_allowed(tmp_path):
    (tmp_path / "t.csv").write_text(",text , label\n0,a,yes\n1,b,no\n")  # pandas' index column
    rows = read_rows(tmp_path / "t.csv", ["text", "label"])
    assert [(r["text"], r["label"]) for r in rows] == [("a", "yes"), ("b", "no")]


def test_duplicate_or_missing_header_names_name_the_file(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("text,label,text\na,1,b\n")
    with pytest.raises(FinetuneError, match=r"'.*dup\.csv'.*header \(line 1\).*\['text'\]"):
        read_rows(path, ["text", "label"])
    path = tmp_path / "headless.csv"
    path.write_text("the cat sees the dog,1\na bird,0\n")  # no header row at all
    with pytest.raises(FinetuneError, match=r"'.*headless\.csv' has no column 'text'"):
        read_rows(path, ["text", "label"])


def test_rows_with_more_fields_than_the_header_are_refused(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\ngood,1\nhello, world,0\nok,1,\nfine,0\n\n,,\nbad, really,1\n")
    with pytest.raises(FinetuneError, match=r"2 rows with more fields .* 2 \(lines 3, 8\)"):
        read_rows(path, ["text", "label"])


# ----------------------------------------------------------------------------- empty labels


def test_empty_labels_are_refused_with_their_line_numbers(tmp_path):
    rows = [["tweet one", "1"], ["tweet\ntwo", ""], ["three", "0"], ["four", " "], ["five"]]
    rows += [[f"more {i}", ""] for i in range(6)] + [["last", "0"]]
    path = _write_csv(tmp_path / "tweets.csv", [["text", "label"], *rows])
    config = _config(train_file=str(path), eval_file=str(path))
    # Lines: header 1, "tweet one" 2, "tweet\ntwo" 3-4, "three" 5, "four" 6, "five" 7, ...
    with pytest.raises(FinetuneError) as caught:
        load_task(config)
    message = str(caught.value)
    assert f"{str(path)!r} has 9 of 12 rows with an empty or missing label" in message
    assert "(column 'label') at file lines 3, 6, 7, 8, 9, ...;" in message
    assert "data.drop_empty_labels=true" in message


def test_the_tweets_that_made_a_three_class_task(tmp_path):
    rows = [[f"tweet {i}", str(i % 2)] for i in range(40)] + [
        [f"unlabelled {i}", ""] for i in range(3)
    ]
    with pytest.raises(FinetuneError, match="3 of 43 rows with an empty or missing label"):
        _task(tmp_path, rows)
    task = _task(tmp_path, rows, drop_empty_labels=True)
    assert task.label_names == ["0", "1"] and task.num_outputs == 2
    assert len(task.train) + len(task.validation) == 40 and len(task.eval) == 40
    assert task.dropped == {"train": 3, "validation": 0, "eval": 3}


def test_dropped_rows_are_counted_per_file(tmp_path):
    def table(name, labels):
        rows = [["text", "label"], *[[f"{name} {i}", v] for i, v in enumerate(labels)]]
        return str(_write_csv(tmp_path / f"{name}.csv", rows))

    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text(
        '{"text": "a", "label": "yes"}\n{"text": "b", "label": null}\n{"text": "c"}\n'
        '{"text": "d", "label": "no"}\n{"text": "e", "label": ""}\n'
    )
    config = _config(
        train_file=table("train", ["yes", "no", "", "yes", "no", " "]),
        validation_file=table("validation", ["no", "", "yes"]),
        eval_file=str(jsonl),
        drop_empty_labels=True,
    )
    task = load_task(config)
    assert task.dropped == {"train": 2, "validation": 1, "eval": 3}
    assert task.train.texts == [("train 0",), ("train 1",), ("train 3",), ("train 4",)]
    assert task.validation.texts == [("validation 0",), ("validation 2",)]
    assert task.eval.texts == [("a",), ("d",)] and task.eval.labels.tolist() == [1, 0]


# ----------------------------------------------------------------------------- numeric labels


def test_labels_equal_as_numbers_are_one_class(tmp_path):
    spellings = ["1", "1.0", " 1", "+1", "1e0", "01", "0", "0.0", "-0", " 0 "]
    rows = [[f"text {i}", spellings[i % len(spellings)]] for i in range(40)]
    task = _task(tmp_path, rows, [["a", "1.00"], ["b", "0"], ["c", "1"]])
    assert task.label_names == ["0", "1"]
    labels = np.concatenate([task.train.labels, task.validation.labels])
    texts = [int(t.split()[1]) for (t,) in task.train.texts + task.validation.texts]
    want = [int(float(spellings[i % len(spellings)])) for i in texts]
    assert labels.tolist() == want
    assert task.eval.labels.tolist() == [1, 0, 1]


def test_numeric_classes_are_ordered_by_value_and_named_canonically(tmp_path):
    rows = [[f"t {i}", v] for i, v in enumerate(["10", "2", "2.0", "-1.50", "0.5", ".50"] * 4)]
    task = _task(tmp_path, rows, [["a", "2.00"], ["b", "-1.5"], ["c", "10.0"], ["d", "5e-1"]])
    assert task.label_names == ["-1.5", "0.5", "2", "10"]
    assert task.eval.labels.tolist() == [2, 0, 3, 1]
    with pytest.raises(FinetuneError, match=r"labels \['3'\] that the training file lacks"):
        _task(tmp_path, rows, [["a", "3.0"]])


def test_labels_that_are_not_all_numbers_stay_text(tmp_path):
    rows = [[f"t {i}", v] for i, v in enumerate(["1", "1.0", "one", "nan"] * 5)]
    task = _task(tmp_path, rows)
    assert task.label_names == ["1", "1.0", "nan", "one"]
    json_rows = tmp_path / "t.jsonl"
    json_rows.write_text(
        "".join(json.dumps({"text": str(v), "label": v}) + "\n" for v in [1, 1.0, 0] * 4)
    )
    task = load_task(_config(train_file=str(json_rows), eval_file=str(json_rows)))
    assert task.label_names == ["0", "1"]  # JSON numbers too


def test_regression_labels_are_numbers(tmp_path):
    rows = [[f"t {i}", v] for i, v in enumerate([" 1.5", "2", "-0.25e1", "3.0"] * 5)]
    path = _write_csv(tmp_path / "r.csv", [["text", "label"], *rows])
    config = _config(train_file=str(path), eval_file=str(path))
    config.regression = True
    task = load_task(config)
    assert task.regression and task.label_names == []
    np.testing.assert_array_equal(task.eval.labels, np.float32([1.5, 2, -2.5, 3.0] * 5))
