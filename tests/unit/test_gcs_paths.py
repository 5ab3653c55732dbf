"""Every gs:// path a command takes is read and written on Cloud Storage (here the emulator),
never as a local folder named ``gs:``: tokenizer --out, benchmark --results, fine-tuning data
files."""

from __future__ import annotations

import json
import pathlib

from etils import epath

from guided_jax.analysis import benchmark
from guided_jax.data.tables import read_rows
from guided_jax.data.tokenizer import CONFIG_FILE, load_tokenizer, train_tokenizer

TEXTS = ["The cat sat on the mat.", "A dog barked at the mailman twice.", "Birds sing."] * 30


def _no_local_gs_folder() -> None:
    assert not pathlib.Path("gs:").exists()


def test_a_tokenizer_is_trained_to_gs(gcs_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    remote = train_tokenizer(TEXTS, 300, f"{gcs_dir}/tok", kind="wordpiece")
    _no_local_gs_folder()
    settings = epath.Path(f"{gcs_dir}/tok/{CONFIG_FILE}").read_text()
    assert json.loads(settings) == {"tokenizer_class": "BertTokenizer", "do_lower_case": False}
    vocabulary = epath.Path(f"{gcs_dir}/tok/vocab.txt").read_text().splitlines()
    assert len(vocabulary) == remote.vocab_size
    again = load_tokenizer(f"{gcs_dir}/tok")
    assert again.encode_batch(TEXTS[:3]) == remote.encode_batch(TEXTS[:3])


def _cells(attention: str) -> list[str]:
    return ["2026-01-01", "abc", "cpu, 2 cores", "1x cpu", "jax 0", "benchmark.py", "16x128",
            f"float32/{attention}", *["1"] * 9]  # fmt: skip


def test_benchmark_results_are_appended_on_gs(gcs_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert benchmark.append_results(f"{gcs_dir}/RESULTS.md", _cells("dense")) == "R1"
    assert benchmark.append_results(f"{gcs_dir}/RESULTS.md", _cells("dense")) == "R2"
    _no_local_gs_folder()
    text = epath.Path(f"{gcs_dir}/RESULTS.md").read_text()
    assert "| R1 |" in text and text.rstrip().endswith("| current |")


def test_finetuning_tables_are_read_from_gs(gcs_dir, tmp_path):
    table = 'text,label\n"a, quoted\nline",pos\nplain,neg\n'
    (tmp_path / "train.csv").write_text(table)
    epath.Path(f"{gcs_dir}/train.csv").write_text(table)
    columns = ("text", "label")
    assert read_rows(f"{gcs_dir}/train.csv", columns) == read_rows(tmp_path / "train.csv", columns)
    assert read_rows(f"{gcs_dir}/train.csv", columns)[0]["text"] == "a, quoted\nline"
