"""A real multi-process run: two processes on localhost, four CPU devices each, one mesh."""

import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, STEPS, assert_runs_match, cli_env

MESH = dict(data=2, fsdp=2, tensor=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, corpus_file, steps):
    """Both processes of a run, as two users' shells would start them."""
    port = _free_port()
    overrides = [
        f"--config.data.train_files={corpus_file}",
        f"--config.train.steps={steps}",
        "--config.train.log_every=1",
        "--config.train.eval_every=10",
        "--config.train.checkpoint_every=10",
        *(f"--config.mesh.{axis}={size}" for axis, size in MESH.items()),
    ]
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "guided_jax.main",
                "--config=configs/tiny.py",
                f"--workdir={workdir}",
                *overrides,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={index}",
            ],
            cwd=REPO,
            env=cli_env(devices=4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]


def _wait(processes):
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=480))
    finally:
        for process in processes:
            process.kill()
    return [
        (process.returncode, *output) for process, output in zip(processes, outputs, strict=True)
    ]


@pytest.mark.slow
def test_two_processes_survive_preemption_and_train_like_one(run_corpus, sharded_run, tmp_path):
    """Two processes x 4 devices train like one process with 8 on the same mesh, also across
    a preemption."""
    # SIGTERM reaches one process only; JAX's preemption service makes both stop and save
    # at the same step.
    workdir = tmp_path / "multi"
    processes = _launch(workdir, run_corpus, STEPS)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert all(p.poll() is None for p in processes) and time.monotonic() < deadline
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)
    results = _wait(processes)
    stops = [re.search(r"stopped by signal 15 at step (\d+)", err) for _, _, err in results]
    assert all(stops), [err[-2000:] for _, _, err in results]
    assert stops[0][1] == stops[1][1]
    assert (workdir / "checkpoints" / stops[0][1]).is_dir()

    # The same command again: resumes and finishes where a single process would have.
    results = _wait(_launch(workdir, run_corpus, STEPS))
    for returncode, _, stderr in results:
        assert returncode == 0, stderr[-3000:]
    assert f"finished at step {STEPS}" in results[0][1] and "over 8 devices" in results[0][1]
    # Only process 0 reports (stdout may still carry the collectives library's own lines).
    assert "over 8 devices" not in results[1][1] and "finished" not in results[1][1]
    assert_runs_match(sharded_run, workdir)
