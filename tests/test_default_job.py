"""The README's default job, exactly as configured: it must train with guidance on the embedded
corpus and show the AG loss falling by more than half and the eval MLM loss falling."""

import jax
import pytest

from conftest import REPO
from guided_jax import train
from guided_jax.config import load_config
from guided_jax.metrics import read_metrics


@pytest.mark.slow
def test_default_job_trains_with_guidance(tmp_path):
    config = load_config(str(REPO / "configs" / "default.py"))
    last = train.train_and_evaluate(config, tmp_path / "run", devices=jax.devices()[:1])
    records = read_metrics(tmp_path / "run")
    logged = [r for r in records if "ag_loss" in r]
    evals = [r["eval_mlm_loss"] for r in records if "eval_mlm_loss" in r]
    assert last["step"] == config.train.steps
    assert logged[-1]["ag_loss"] <= 0.5 * logged[0]["ag_loss"]
    assert len(evals) >= 2 and evals[-1] < evals[0]
    assert logged[-1]["mlm_loss"] < logged[0]["mlm_loss"]
