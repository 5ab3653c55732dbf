"""The reference's run length and batch: steps counted from epochs as its trainer counts them,
and a per-device batch that becomes the global one on the run's devices."""

import json
import math

import jax
import pytest

from guided_jax.config import ConfigError
from guided_jax.config.resolve import steps_for_epochs
from guided_jax.train.inputs import prepare
from guided_jax.train.loop import train_and_evaluate
from guided_jax.train.metrics import read_metrics


def _reference_steps(blocks: int, per_step: int, accum: int, epochs: float) -> int:
    """trainer_ag.py: t_total = int(len(loader) // accum * epochs), the loader yielding
    micro-batches of per_step / accum examples with the short last one kept."""
    loader = math.ceil(blocks / (per_step // accum))
    return int(loader // accum * epochs)


@pytest.mark.parametrize(
    ("blocks", "batch", "accum", "epochs"),
    [(10, 4, 1, 3), (10, 4, 2, 3), (9, 4, 2, 1.5), (1000, 32, 4, 3), (7, 8, 1, 1)],
)
def test_steps_follow_the_reference_count(blocks, batch, accum, epochs):
    assert steps_for_epochs(blocks, batch, accum, epochs) == _reference_steps(
        blocks, batch, accum, epochs
    )


def test_epochs_set_the_steps_that_the_run_records_and_resumes_with(tiny_config, tmp_path, capsys):
    tiny_config.train.epochs = 2.0
    workdir = tmp_path / "run"
    inputs = prepare(tiny_config, workdir)
    blocks = len(inputs.train_blocks)
    expected = _reference_steps(blocks, tiny_config.train.batch_size, 1, 2.0)
    assert inputs.config.train.steps == inputs.objective.total_steps == expected
    assert tiny_config.train.steps == 6  # the caller's config is left alone
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == expected
    printed = capsys.readouterr().out
    assert f"train.steps={expected}: 2 epochs of {blocks} training blocks" in printed
    assert prepare(tiny_config, workdir).config.train.steps == expected  # the same command
    tiny_config.train.epochs = 3.0
    with pytest.raises(ConfigError, match=r"train\.epochs: 2\.0 -> 3\.0"):
        prepare(tiny_config, workdir)


def test_epochs_that_make_no_step_are_refused(tiny_config, tmp_path):
    tiny_config.train.epochs = 1e-6
    with pytest.raises(ConfigError, match=r"train\.epochs=1e-06 over \d+ training blocks"):
        prepare(tiny_config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_per_device_batch_times_devices_and_accumulation_is_the_global_batch(tiny_config, tmp_path):
    """--per_gpu_train_batch_size 2 on two devices with two micro-batches: 8 per step."""
    tiny_config.train.update(per_device_batch_size=2, grad_accum_steps=2, epochs=0.3)
    tiny_config.train.update(warmup_steps=0, log_every=1, eval_every=0, checkpoint_every=0)
    workdir = tmp_path / "run"
    train_and_evaluate(tiny_config, workdir, devices=jax.devices()[:2])
    saved = json.loads((workdir / "config.json").read_text())["train"]
    assert (saved["batch_size"], saved["per_device_batch_size"]) == (8, 2)
    blocks = len(prepare(tiny_config, tmp_path / "count", write=False).train_blocks)
    steps = _reference_steps(blocks, 8, 2, 0.3)
    assert steps >= 2 and saved["steps"] == steps
    assert [r["step"] for r in read_metrics(workdir) if "mlm_loss" in r] == list(
        range(1, steps + 1)
    )
