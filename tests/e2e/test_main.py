"""The command line, run as users run it (a fresh process per call)."""

import json
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import (
    INTERRUPTED_STEPS,
    REPO,
    cli_env,
    final_params,
    interrupted_run_args,
    records_without_timing,
)
from guided_jax.weights.workdir import checkpoint_steps


def _main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "guided_jax.main", *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_rejects_unknown_config_key(tmp_path):
    result = _main(
        "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"), "--config.train.stepz=4"
    )
    assert result.returncode == 2
    assert "unknown config key train.stepz; did you mean train.steps?" in result.stderr
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


def test_cli_refuses_a_workdir_url_it_cannot_write():
    """Path("s3://b/run") would be a local folder s3:/b/run: refused before anything exists."""
    url = "s3://guided-jax-test-bucket/run"
    try:
        result = _main("--config", "configs/tiny.py", "--workdir", url)
        assert result.returncode == 1
        expected = "expected a local path or a Cloud Storage URL gs://bucket/path"
        assert f"guided_jax.main: error: --workdir {url!r}: {expected}" in result.stderr
        assert not (REPO / "s3:").exists()
    finally:
        shutil.rmtree(REPO / "s3:", ignore_errors=True)


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


@pytest.mark.slow
def test_kill_9_then_rerun_equals_an_uninterrupted_run(run_corpus, uninterrupted_run, tmp_path):
    """Nothing is lost but the steps since the last checkpoint, and those are redone exactly."""
    workdir = tmp_path / "run"
    args = [
        sys.executable, "-m", "guided_jax.main", f"--workdir={workdir}",
        *interrupted_run_args(run_corpus),
    ]  # fmt: skip
    process = subprocess.Popen(
        args, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 30):
        assert process.poll() is None and time.monotonic() < deadline, "run ended before the kill"
        time.sleep(0.01)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    logged = metrics.read_text().count("\n")
    assert logged < INTERRUPTED_STEPS, "the kill came too late to interrupt anything"
    saved = max(checkpoint_steps(workdir))
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= saved]

    rerun = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # It restored the newest checkpoint and trained only the steps after it: the records up to
    # that step, their timings included, are the first run's.
    assert f"resuming from the checkpoint at step {saved} of {INTERRUPTED_STEPS}" in rerun.stdout
    assert metrics.read_text().splitlines()[: len(kept)] == kept and saved > 0
    last = rerun.stdout.strip().splitlines()[-1]
    assert last.startswith(f"finished at step {INTERRUPTED_STEPS}: ag_loss=")
    assert records_without_timing(workdir) == records_without_timing(uninterrupted_run)
    jax.tree.map(
        np.testing.assert_array_equal,
        final_params(workdir, step=INTERRUPTED_STEPS, with_key_bias=True),
        final_params(uninterrupted_run, step=INTERRUPTED_STEPS, with_key_bias=True),
    )
