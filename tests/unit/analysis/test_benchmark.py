"""guided_jax.analysis.benchmark: its FLOP count and results file (the command itself runs in
tests/e2e)."""

import types

import pytest

from conftest import REPO
from guided_jax.analysis import benchmark
from guided_jax.config import load_config
from guided_jax.config.resolve import build_model_config


def test_model_flops_count_the_encoder_and_the_selected_positions_head():
    config = load_config(str(REPO / "configs" / "benchmark.py"))
    inputs = types.SimpleNamespace(model=build_model_config(config, 8000), config=config)
    d, f, v, n, layers, tokens = 256, 1024, 8000, 128, 4, 16 * 128
    per_token = 6 * (layers * (4 * d * d + 2 * d * f) + 0.15 * (d * d + d * v))
    assert benchmark.model_flops_per_step(inputs) == pytest.approx(
        tokens * (per_token + 12 * layers * n * d)
    )


def test_results_file_gets_its_header_once(tmp_path):
    path = tmp_path / "bench" / "RESULTS.md"
    benchmark.append_results(path, "| a |")
    benchmark.append_results(path, "| b |")
    text = path.read_text()
    assert text.count("| date | device |") == 1 and text.endswith("| a |\n| b |\n")
