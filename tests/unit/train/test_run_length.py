"""The reference's run length: steps counted from epochs as its trainer counts them (a whole
run with a per-device batch on two devices: tests/e2e/test_reference_run.py)."""

import json
import math

import pytest

from guided_jax.config import ConfigError
from guided_jax.config.resolve import steps_for_epochs
from guided_jax.train.inputs import prepare


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
    tiny_config.train.update(steps=0, epochs=2.0)
    workdir = tmp_path / "run"
    inputs = prepare(tiny_config, workdir)
    blocks = len(inputs.train_blocks)
    expected = _reference_steps(blocks, tiny_config.train.batch_size, 1, 2.0)
    assert inputs.config.train.steps == inputs.objective.total_steps == expected
    assert tiny_config.train.steps == 0  # the caller's config is left alone
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == expected
    printed = capsys.readouterr().out
    assert f"train.steps={expected}: 2 epochs of {blocks} training blocks" in printed
    assert prepare(tiny_config, workdir).config.train.steps == expected  # the same command
    tiny_config.train.epochs = 3.0
    with pytest.raises(ConfigError, match=r"train\.epochs: 2\.0 -> 3\.0"):
        prepare(tiny_config, workdir)


def test_epochs_that_make_no_step_are_refused(tiny_config, tmp_path):
    tiny_config.train.update(steps=0, epochs=1e-6)
    with pytest.raises(ConfigError, match=r"train\.epochs=1e-06 over \d+ training blocks"):
        prepare(tiny_config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_steps_and_epochs_together_are_refused_naming_both(tiny_config, tmp_path):
    tiny_config.train.epochs = 2.0  # tiny's train.steps=6 stays set
    expected = (
        r"train\.steps=6 and train\.epochs=2 are both set, and a run has one length: set "
        r"train\.epochs=0 to train 6 steps, or train\.steps=0 to count the steps from 2 epochs"
    )
    with pytest.raises(ConfigError, match=expected):
        prepare(tiny_config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
