"""Attention grids (guided_jax.analysis.attention_maps): the maps of a checkpoint for one
sentence, drawn layers x heads."""

import shutil

import numpy as np
import pytest

from guided_jax import weights
from guided_jax.analysis import attention_maps
from guided_jax.weights.workdir import read_run_config

PNG = b"\x89PNG\r\n\x1a\n"


def test_maps_are_attention_probabilities_of_every_layer_and_head(tiny_run):
    loaded = weights.load(tiny_run)
    ids = attention_maps.encode_sentence(loaded.tokenizer, "The cat sees the dog today.", 32)
    assert ids[0] == loaded.tokenizer.bos_id and ids[-1] == loaded.tokenizer.eos_id
    maps = attention_maps.attention_maps(loaded.model, ids)
    assert maps.shape == (2, 4, len(ids), len(ids))
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    labels = attention_maps.token_labels(loaded.tokenizer, ids)
    assert labels[0] == "<s>" and labels[-1] == "</s>" and len(labels) == len(ids)


def test_sentence_is_cut_to_max_tokens(tiny_run):
    tokenizer = weights.load(tiny_run).tokenizer
    ids = attention_maps.encode_sentence(tokenizer, "the cat sees the dog " * 20, 10)
    assert len(ids) == 10 and ids[-1] == tokenizer.eos_id
    with pytest.raises(ValueError, match="--text is empty"):
        attention_maps.encode_sentence(tokenizer, "  ", 10)


def test_guided_heads_are_titled_with_their_pattern(tiny_run):
    config = read_run_config(tiny_run)  # tiny: spec 0,1,1,1 over 4 heads
    assert attention_maps.head_titles(config, 4) == [
        "head 0\n→ next",
        "head 1\n→ prev",
        "head 2\n→ first",
        "head 3",
    ]


def test_draws_the_grid_of_a_chosen_step(tiny_run, tmp_path):
    out = attention_maps.draw(tiny_run, "A small bird calls!", tmp_path / "init.png", step=0)
    assert out == tmp_path / "init.png" and out.read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match=r"has no checkpoint at step 4; it has \[3, 6\]"):
        attention_maps.draw(tiny_run, "x", tmp_path / "missing.png", step=4)
    assert not (tmp_path / "missing.png").exists()


def test_default_output_is_named_after_the_step(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    path = attention_maps.draw(workdir, "Our teacher draws a letter.")
    assert path == workdir / "attention_step6.png" and path.read_bytes().startswith(PNG)
