"""One command runs the reference's setup on a reference-style model directory: its config.json
says 52,000 rows beside a smaller vocabulary (as the Oromo directories do), the training file is
read whole, <unk> is an MLM target, and the steps come from 3 epochs at 4 examples per device
(here two devices: a global batch of 8)."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

FIXTURE = REPO / "tests" / "fixtures" / "reference_text"


def _model_dir(path):
    """A RoBERTa directory as the reference's ag_config/ ones, at a size a test can train."""
    path.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (path / name).write_bytes((FIXTURE / name).read_bytes())
    config = {
        "architectures": ["RobertaForMaskedLM"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 36,
        "model_type": "roberta",
        "num_attention_heads": 8,
        "num_hidden_layers": 2,
        "type_vocab_size": 1,
        "vocab_size": 52000,
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.slow
def test_reference_preset_on_a_reference_directory(tmp_path):
    directory = _model_dir(tmp_path / "om_tiny")
    workdir = tmp_path / "run"
    sample = FIXTURE / "sample.txt"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "guided_jax.main",
            "--config=configs/reference.py",
            f"--workdir={workdir}",
            f"--config.model.from_dir={directory}",
            f"--config.data.train_files={sample}",
            "--config.data.block_size=34",
        ],
        cwd=REPO,
        env=cli_env(devices=2),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = len(json.loads((FIXTURE / "vocab.json").read_text()))
    blocks = len(json.loads((FIXTURE / "expected.json").read_text())["blocks"])
    steps = int(math.ceil(blocks / 8) * 3)  # 3 epochs, 4 per device on 2, no accumulation
    out = result.stdout
    assert f"model.vocab_size={rows}: the tokenizer's length, not the 52000 of" in out
    assert (
        f"train.steps={steps}: 3 epochs of {blocks} training blocks at a global batch of 8" in out
    )
    assert f"finished at step {steps}:" in out
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["vocab_size"] == rows and saved["train"]["steps"] == steps
    assert (saved["data"]["mlm_targets"], saved["data"]["format"]) == (
        "reference",
        "reference_text",
    )
    assert (saved["train"]["batch_size"], saved["train"]["per_device_batch_size"]) == (8, 4)
    assert "over 2 devices" in out
