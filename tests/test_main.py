"""The command line, run as users run it (a fresh process per call)."""

import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, cli_env


def _main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "guided_jax.main", *args],
        cwd=REPO,
        env=cli_env(),
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


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exiting(corpus_file, tmp_path):
    workdir = tmp_path / "run"
    args = [
        "--config",
        "configs/tiny.py",
        "--workdir",
        str(workdir),
        f"--config.data.train_files={corpus_file}",
        "--config.train.steps=100000",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=0",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "guided_jax.main", *args],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "stopped by signal 15 at step" in stderr and "rerun the same command" in stderr
    saved = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert max(steps) <= saved[0]
