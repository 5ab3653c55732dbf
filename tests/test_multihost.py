"""A real multi-process run: two processes on localhost, four CPU devices each, one mesh."""

import socket
import subprocess
import sys

import pytest

from conftest import REPO, assert_runs_match, cli_env, run_config
from guided_jax import train

MESH = dict(data=2, fsdp=2, tensor=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(corpus_file, tmp_path):
    reference = tmp_path / "single"
    train.train_and_evaluate(run_config(corpus_file, **MESH), reference)

    workdir = tmp_path / "multi"
    port = _free_port()
    overrides = [
        f"--config.data.train_files={corpus_file}",
        "--config.train.steps=20",
        "--config.train.log_every=1",
        "--config.train.eval_every=10",
        "--config.train.checkpoint_every=10",
        *(f"--config.mesh.{axis}={size}" for axis, size in MESH.items()),
    ]
    processes = [
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
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=480))
    finally:
        for process in processes:
            process.kill()
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    assert "finished at step 20" in outputs[0][0]
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8 devices" in outputs[0][0]
    assert "mesh" not in outputs[1][0]  # only process 0 reports
    assert_runs_match(reference, workdir)
