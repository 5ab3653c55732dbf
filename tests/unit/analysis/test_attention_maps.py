"""Attention grids: the maps of a checkpoint for one sentence, drawn layers x heads."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, cli_env, write_corpus
from guided_jax import pretrained, train, visualize
from guided_jax.config import load_config

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("visualize")
    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.data.train_files = str(write_corpus(root / "corpus.txt"))
    train.train_and_evaluate(config, root / "run", devices=jax.devices()[:1])
    return root / "run"


def test_maps_are_attention_probabilities_of_every_layer_and_head(tiny_run):
    loaded = pretrained.load(tiny_run)
    ids = visualize.encode_sentence(loaded.tokenizer, "The cat sees the dog today.", 32)
    assert ids[0] == loaded.tokenizer.bos_id and ids[-1] == loaded.tokenizer.eos_id
    maps = visualize.attention_maps(loaded.model, ids)
    assert maps.shape == (2, 4, len(ids), len(ids))
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    labels = visualize.token_labels(loaded.tokenizer, ids)
    assert labels[0] == "<s>" and labels[-1] == "</s>" and len(labels) == len(ids)


def test_sentence_is_cut_to_max_tokens(tiny_run):
    tokenizer = pretrained.load(tiny_run).tokenizer
    ids = visualize.encode_sentence(tokenizer, "the cat sees the dog " * 20, 10)
    assert len(ids) == 10 and ids[-1] == tokenizer.eos_id
    with pytest.raises(ValueError, match="--text is empty"):
        visualize.encode_sentence(tokenizer, "  ", 10)


def test_guided_heads_are_titled_with_their_pattern(tiny_run):
    config = pretrained.read_run_config(tiny_run)  # tiny: spec 0,1,1,1 over 4 heads
    assert visualize.head_titles(config, 4) == [
        "head 0\n→ next",
        "head 1\n→ prev",
        "head 2\n→ first",
        "head 3",
    ]


def test_cli_draws_the_grid_of_a_chosen_step(tiny_run, tmp_path):
    out = tmp_path / "init.png"
    command = [sys.executable, "-m", "guided_jax.visualize", f"--workdir={tiny_run}"]
    result = subprocess.run(
        [*command, "--text=A small bird calls!", "--step=0", f"--out={out}"],
        env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(PNG)
    missing = subprocess.run(
        [*command, "--text=x", "--step=4"],
        env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode != 0
    assert "has no checkpoint at step 4; it has [3, 6]" in missing.stderr


def test_default_output_is_named_after_the_step(tiny_run):
    path = visualize.draw(tiny_run, "Our teacher draws a letter.")
    assert path == tiny_run / "attention_step6.png" and path.read_bytes().startswith(PNG)
