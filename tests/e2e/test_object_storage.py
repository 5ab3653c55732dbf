"""A run whose workdir is on Cloud Storage (a local emulator, tests/gcs_emulator.py), driven as
users drive it: ``kill -9`` and the same command resume it bit-exactly, a second run is refused
while the first holds the workdir, and the other commands read and write ``gs://`` too."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import safetensors.numpy
from etils import epath

from conftest import (
    INTERRUPTED_STEPS,
    REPO,
    cli_env,
    interrupted_run_args,
    records_without_timing,
    write_keyword_csv,
)
from guided_jax import weights
from guided_jax.train.metrics import has_metrics, read_metrics
from guided_jax.weights.hf import export
from guided_jax.weights.workdir import checkpoint_steps

pytestmark = pytest.mark.slow


def _command(name: str, *args: str) -> list[str]:
    return [sys.executable, "-m", f"guided_jax.{name}", *map(str, args)]


def _run(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(name, *args), cwd=REPO, env=cli_env(), capture_output=True, text=True
    )


def _saved(workdir: str) -> list[int]:
    """The run's complete checkpoints (none while the directory does not exist)."""
    if not epath.Path(workdir, "checkpoints").exists():
        return []
    return checkpoint_steps(workdir)


def test_a_gs_workdir_resumes_after_kill_9_and_serves_the_other_commands(
    gcs_dir, run_corpus, uninterrupted_run, tmp_path
):
    workdir = f"{gcs_dir}/run"
    train = _command("main", f"--workdir={workdir}", *interrupted_run_args(run_corpus))
    first = subprocess.Popen(
        train, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while not _saved(workdir):  # the resume starts from step 20 at least
        assert first.poll() is None and time.monotonic() < deadline, "run ended before the kill"
        time.sleep(0.2)
    first.send_signal(signal.SIGSTOP)  # alive, holding the lease, frozen mid-run
    try:
        second = _run("main", f"--workdir={workdir}", *interrupted_run_args(run_corpus))
        assert second.returncode == 1, second.stderr[-3000:]
        owner = f"pid {first.pid} on {socket.gethostname()}"
        assert f"guided_jax.main: error: workdir {workdir} is in use by another run ({owner}, " in (
            second.stderr
        )
    finally:
        first.kill()
    assert first.wait(timeout=60) == -signal.SIGKILL
    logged, saved = len(read_metrics(workdir)), _saved(workdir)
    assert logged < INTERRUPTED_STEPS, f"the kill came too late: {logged} steps logged, {saved}"
    kept = [record for record in read_metrics(workdir) if record["step"] <= max(saved)]

    rerun = subprocess.run(train, cwd=REPO, env=cli_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    # It restored the newest checkpoint and trained only the steps after it: the records up to
    # that step, their timings included, are the first run's.
    assert f"resuming from the checkpoint at step {max(saved)} of {INTERRUPTED_STEPS}" in (
        rerun.stdout
    )
    assert read_metrics(workdir)[: len(kept)] == kept
    assert f"took over the lease of workdir {workdir} from {owner}: its process on this host" in (
        rerun.stdout
    )
    last = rerun.stdout.strip().splitlines()[-1]
    assert last.startswith(f"finished at step {INTERRUPTED_STEPS}: ag_loss=")
    assert records_without_timing(workdir) == records_without_timing(uninterrupted_run)
    assert not epath.Path(workdir, "lease.json").exists(), "the finished run kept its lease"

    # hf_interop reads the gs:// workdir and writes to gs://: the weights are the uninterrupted
    # run's, bit for bit.
    exported = f"{gcs_dir}/hf"
    result = _run("hf_interop", "--workdir", workdir, "--out", exported)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith(f"to {exported} (RobertaForMaskedLM)")
    local = weights.load(uninterrupted_run)
    reference = export(local.model, local.tokenizer, tmp_path / "hf", step=local.step)
    tensors = safetensors.numpy.load(epath.Path(exported, "model.safetensors").read_bytes())
    expected = safetensors.numpy.load_file(os.fspath(reference / "model.safetensors"))
    assert tensors.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
    for name in ("vocab.json", "merges.txt", "config.json"):
        assert epath.Path(exported, name).read_bytes() == (reference / name).read_bytes(), name

    # finetune reads the gs:// workdir and writes its results there.
    train_csv = write_keyword_csv(tmp_path / "train.csv", 48, seed=0)
    eval_csv = write_keyword_csv(tmp_path / "eval.csv", 16, seed=1)
    results = f"{gcs_dir}/ft"
    result = _run(
        "finetune", "--config", "configs/finetune.py", "--pretrained", workdir,
        "--workdir", results, f"--config.data.train_file={train_csv}",
        f"--config.data.eval_file={eval_csv}", "--config.seeds=1", "--config.epochs=1",
        "--config.batch_size=8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {results}/results.json" in result.stdout
    written = json.loads(epath.Path(results, "results.json").read_text())
    assert written["pretrained"] == workdir and written["pretrained_step"] == INTERRUPTED_STEPS


def test_sigterm_saves_to_a_gs_workdir_and_releases_it(gcs_dir, run_corpus):
    workdir = f"{gcs_dir}/run"
    process = subprocess.Popen(
        _command(
            "main", "--config", "configs/tiny.py", "--workdir", workdir,
            f"--config.data.train_files={run_corpus}", "--config.train.steps=100000",
            "--config.train.log_every=1", "--config.train.checkpoint_every=0",
        ),
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (has_metrics(workdir) and len(read_metrics(workdir)) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    assert epath.Path(workdir, "lease.json").exists()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "stopped by signal 15 at step" in stderr and "rerun the same command" in stderr
    saved = [int(p.name) for p in epath.Path(workdir, "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3
    assert max(r["step"] for r in read_metrics(workdir)) <= saved[0]
    assert not epath.Path(workdir, "lease.json").exists()
