"""guided_jax.analysis.benchmark: its FLOP count and results file (the command itself runs in
tests/e2e)."""

import os
import subprocess
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


def _cells(date: str, attention: str) -> list[str]:
    """A results row's cells from date to input examples/s."""
    return [date, "abc1234", "cpu x, 2 cores", "1x cpu", "jax 0.10.2", "benchmark.py",
            "16x128", f"float32/{attention}", *["1"] * 9]  # fmt: skip


def test_results_rows_are_numbered_and_supersede_their_predecessors(tmp_path):
    path = tmp_path / "bench" / "RESULTS.md"
    assert benchmark.append_results(path, _cells("2026-01-01", "dense")) == "R1"
    assert benchmark.append_results(path, _cells("2026-01-02", "flash")) == "R2"
    assert benchmark.append_results(path, _cells("2026-01-03", "dense")) == "R3"
    text = path.read_text()
    assert text.count("| row | date | commit | machine | device |") == 1
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| R")]
    assert [(r[0], r[1], r[-1]) for r in rows] == [
        ("| R1", "2026-01-01", "superseded by R3 |"),  # the same measurement, newer
        ("| R2", "2026-01-02", "current |"),  # another attention: not superseded
        ("| R3", "2026-01-03", "current |"),
    ]
    assert all(len(r) == len(benchmark.RESULTS_COLUMNS) for r in rows)


def test_a_results_row_names_its_commit_and_machine():
    commit = benchmark.source_commit()
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert head.startswith(commit.removesuffix("+changes")) and len(commit) >= 10
    assert benchmark.host_machine().endswith(f", {os.cpu_count()} cores")
