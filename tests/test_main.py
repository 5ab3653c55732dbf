"""The command line, run as users run it (a fresh process per call)."""

import subprocess
import sys

import pytest

from conftest import REPO


def _main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "guided_jax.main", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_cli_trains_tiny_config(corpus_file, tmp_path):
    result = _main(
        "--config",
        "configs/tiny.py",
        "--workdir",
        str(tmp_path / "run"),
        f"--config.data.train_files={corpus_file}",
        "--config.train.steps=4",
    )
    assert result.returncode == 0, result.stderr
    assert "finished at step 4" in result.stdout
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_cli_rejects_unknown_config_key(tmp_path):
    result = _main(
        "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"), "--config.train.stepz=4"
    )
    assert result.returncode != 0
    assert "stepz" in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_reports_bad_corpus_without_traceback(tmp_path):
    result = _main(
        "--config",
        "configs/tiny.py",
        "--workdir",
        str(tmp_path / "run"),
        f"--config.data.train_files={tmp_path / 'missing.txt'}",
    )
    assert result.returncode != 0
    assert "missing.txt" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
