"""The README's default job, exactly as the README runs it (XLA fully optimising, as on a user's
machine): it must train with guidance on the embedded corpus and show the AG loss falling by
more than half and the eval MLM loss falling."""

import subprocess
import sys

import pytest

from conftest import REPO, user_env
from guided_jax.config import load_config
from guided_jax.train.metrics import read_metrics


@pytest.mark.slow
def test_default_job_trains_with_guidance(tmp_path):
    config = load_config(str(REPO / "configs" / "default.py"))
    workdir = tmp_path / "run"
    command = ["-m", "guided_jax.main", "--config", "configs/default.py", "--workdir", str(workdir)]
    result = subprocess.run(
        [sys.executable, *command],
        cwd=REPO,
        env=user_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"finished at step {config.train.steps}" in result.stdout
    records = read_metrics(workdir)
    logged = [r for r in records if "ag_loss" in r]
    evals = [r["eval_mlm_loss"] for r in records if "eval_mlm_loss" in r]
    assert logged[-1]["step"] == config.train.steps
    assert logged[-1]["ag_loss"] <= 0.5 * logged[0]["ag_loss"]
    assert len(evals) >= 2 and evals[-1] < evals[0]
    assert logged[-1]["mlm_loss"] < logged[0]["mlm_loss"]
