"""End-to-end runs of train_and_evaluate on the tiny config, and every bad input it must refuse."""

import json
import shutil

import jax
import pytest

from guided_jax import train
from guided_jax.metrics import read_metrics

ONE_DEVICE = jax.devices()[:1]

REQUIRED_KEYS = {
    "step",
    "loss",
    "mlm_loss",
    "ag_loss",
    "ag_weight",
    "learning_rate",
    "tokens_per_sec",
}


@pytest.mark.slow
def test_tiny_run_lowers_mlm_and_guidance_losses(tiny_config, tmp_path):
    cfg = tiny_config
    cfg.train.steps = 40
    cfg.train.learning_rate = 3e-3
    cfg.train.log_every = 5
    cfg.train.eval_every = 20
    workdir = tmp_path / "run"
    last = train.train_and_evaluate(cfg, workdir, devices=ONE_DEVICE)

    records = read_metrics(workdir)
    logged = [r for r in records if "mlm_loss" in r]
    evals = [r for r in records if "eval_mlm_loss" in r]
    assert [r["step"] for r in logged] == list(range(5, 41, 5))
    assert [r["step"] for r in evals] == [20, 40]
    assert all(set(r) >= REQUIRED_KEYS for r in logged)
    assert logged[-1]["mlm_loss"] < logged[0]["mlm_loss"] - 0.5
    # "first" is learnable from the <s> token alone; next/prev need position embeddings to
    # grow first, which takes a few hundred steps (the default job shows them converge).
    assert logged[-1]["ag_loss"] < 0.8 * logged[0]["ag_loss"]
    assert logged[-1]["ag_loss/first"] < 0.2 * logged[0]["ag_loss/first"]
    assert evals[-1]["eval_mlm_loss"] < evals[0]["eval_mlm_loss"]
    assert all(r["ag_weight"] == pytest.approx(100.0) for r in logged)
    # Per-pattern losses add up to the total.
    first = logged[0]
    parts = [v for k, v in first.items() if k.startswith("ag_loss/")]
    assert len(parts) == 3 and sum(parts) == pytest.approx(first["ag_loss"], rel=1e-5)
    assert last["step"] == 40
    assert (workdir / "checkpoints" / "40").is_dir()
    assert (workdir / "tokenizer" / "vocab.json").is_file()
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 40


def test_baseline_trains_without_guidance_but_measures_it(tiny_config, tmp_path):
    tiny_config.guidance.enabled = False
    train.train_and_evaluate(tiny_config, tmp_path / "run", devices=ONE_DEVICE)
    records = read_metrics(tmp_path / "run")
    logged = [r for r in records if "mlm_loss" in r]
    assert all(r["ag_weight"] == 0.0 and r["ag_loss"] == 0.0 for r in logged)
    assert all(r["loss"] == pytest.approx(r["mlm_loss"]) for r in logged)
    assert all(r["eval_ag_loss"] > 0.0 for r in records if "eval_mlm_loss" in r)


def test_token_set_guidance_trains(tiny_config, tmp_path):
    tiny_config.guidance.heads = "next:1,token[</s>]:1,token[.]:1"
    last = train.train_and_evaluate(tiny_config, tmp_path / "run", devices=ONE_DEVICE)
    assert {"ag_loss/next", "ag_loss/token[</s>]", "ag_loss/token[.]"} <= set(last)
    assert last["ag_loss/token[.]"] > 0.0


def _without_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_sec"} for r in records]


def test_rerun_resumes_from_last_checkpoint_identically(tiny_config, tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config, workdir, devices=ONE_DEVICE)
    uninterrupted = read_metrics(workdir)
    # Lose the final checkpoint, as if the run had died after step 3's save.
    shutil.rmtree(workdir / "checkpoints" / "6")
    train.train_and_evaluate(tiny_config, workdir, devices=ONE_DEVICE)
    resumed = read_metrics(workdir)
    assert [r["step"] for r in resumed] == [2, 3, 4, 6]
    assert _without_timing(resumed) == _without_timing(uninterrupted)


def test_finished_run_is_not_repeated(tiny_config, tmp_path):
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config, workdir, devices=ONE_DEVICE)
    before = (workdir / "metrics.jsonl").read_text()
    assert train.train_and_evaluate(tiny_config, workdir, devices=ONE_DEVICE) == {}
    assert (workdir / "metrics.jsonl").read_text() == before


def test_non_finite_loss_stops_without_saving_it(tiny_config, tmp_path):
    tiny_config.train.learning_rate = 1e38  # the first update overflows the parameters
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step \d"):
        train.train_and_evaluate(tiny_config, tmp_path / "run", devices=ONE_DEVICE)
    assert not any((tmp_path / "run" / "checkpoints").glob("[0-9]*"))
