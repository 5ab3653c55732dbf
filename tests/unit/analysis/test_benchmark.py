"""Tests for guided_jax.benchmark: the command end to end on the tiny shapes (timings are not
asserted, only that every arm ran and the report and results row are well formed), and its
FLOP count and results file."""

import importlib.util
import re
import subprocess
import sys

import pytest

from conftest import REPO, cli_env
from guided_jax import benchmark
from guided_jax.config import load_config
from guided_jax.experiment import build_model_config

HAS_HF_FLAX = importlib.util.find_spec("transformers") is not None


def _benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "guided_jax.benchmark", *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_benchmark_reports_every_arm_and_appends_a_row(tmp_path):
    results = tmp_path / "RESULTS.md"
    run = _benchmark(
        "--config=configs/benchmark.py:tiny",
        "--steps=2",
        "--rounds=1",
        "--warmup=1",
        f"--results={results}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert re.search(r"ours: step +[\d.]+ ms +\d+ tokens/s", run.stdout)
    assert re.search(r"ours_guided: step +[\d.]+ ms", run.stdout)
    assert re.search(r"input pipeline: \d+ examples/s", run.stdout)
    assert re.search(r"head diagnostics: [\d.]+ ms per log step", run.stdout)
    if HAS_HF_FLAX:
        assert re.search(r"hf_flax: step +[\d.]+ ms", run.stdout)
        assert re.fullmatch(
            r"guidance_overhead=\d+\.\d{3}x speedup_vs_hf_flax=\d+\.\d{3}x", lines[-1]
        )
    else:
        assert "hf_flax: not measured: transformers is not installed" in run.stdout
        assert re.fullmatch(r"guidance_overhead=\d+\.\d{3}x", lines[-1])
    table = results.read_text().splitlines()
    assert table[2].startswith("| date | device |") and len(table) == 5
    assert "| benchmark.py:tiny | 4x32 | float32/dense |" in table[4]


def test_bad_step_counts_are_refused():
    run = _benchmark("--config=configs/benchmark.py:tiny", "--steps=0")
    assert run.returncode != 0
    assert "--steps and --rounds must be >= 1" in run.stderr


def test_model_flops_count_the_encoder_and_the_selected_positions_head():
    config = load_config(str(REPO / "configs" / "benchmark.py"))
    exp = type("Exp", (), {"model": build_model_config(config, 8000), "config": config})
    d, f, v, n, layers, tokens = 256, 1024, 8000, 128, 4, 16 * 128
    per_token = 6 * (layers * (4 * d * d + 2 * d * f) + 0.15 * (d * d + d * v))
    assert benchmark.model_flops_per_step(exp) == pytest.approx(
        tokens * (per_token + 12 * layers * n * d)
    )


def test_results_file_gets_its_header_once(tmp_path):
    path = tmp_path / "bench" / "RESULTS.md"
    benchmark.append_results(path, "| a |")
    benchmark.append_results(path, "| b |")
    text = path.read_text()
    assert text.count("| date | device |") == 1 and text.endswith("| a |\n| b |\n")
