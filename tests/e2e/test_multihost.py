"""A real multi-process run: two processes on localhost, four CPU devices each, one mesh."""

import fcntl
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


def _wait(processes, timeout=480):
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout))
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


def test_a_workdir_another_run_holds_stops_every_process_with_the_reason(run_corpus, tmp_path):
    """Only process 0 takes the workdir; when another run holds it, the other processes stop
    too, at once and saying why, instead of waiting for process 0 at the first barrier."""
    workdir = tmp_path / "held"
    workdir.mkdir()
    with open(workdir / ".lock", "a+") as lock:  # another run's hold, as _file_lock takes it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 4242 on another-host\n")
        lock.flush()
        processes = _launch(workdir, run_corpus, STEPS)
        start = time.monotonic()
        results = _wait(processes, timeout=120)
    assert time.monotonic() - start < 120
    (code0, _, err0), (code1, _, err1) = results
    assert code0 != 0 and "is in use by another run (pid 4242 on another-host)" in err0, err0
    assert code1 != 0, err1
    assert "error: process 0 could not take the workdir: workdir " in err1, err1
    assert "is in use by another run (pid 4242 on another-host)" in err1, err1


def test_a_corpus_process_0_refuses_stops_every_process_with_the_reason(tmp_path):
    """Only process 0 reads the corpus; when it refuses it (bad UTF-8 here), the other process
    stops with the same reason instead of timing out in the barrier after preparation."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"a first line of text\n" * 50 + b"caf\xe9 is not UTF-8\n")
    results = _wait(_launch(tmp_path / "run", corpus, STEPS), timeout=120)
    (code0, _, err0), (code1, _, err1) = results
    reason = [line for line in err0.splitlines() if "UTF-8" in line]
    assert code0 != 0 and reason, err0
    assert code1 != 0, err1
    why = reason[0].split("error: ", 1)[1]  # "guided_jax.main: error: corpus file ..."
    assert f"error: process 0 could not prepare the workdir: {why}\n" in err1, err1
    for err in (err0, err1):  # no library INFO lines (jax's "Connecting to ...")
        assert not re.search(r"^I\d{4} ", err, re.MULTILINE), err
