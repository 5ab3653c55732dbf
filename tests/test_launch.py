"""Launch scripts parse and print the commands they would run."""

import os
import subprocess

from conftest import REPO

SCRIPT = REPO / "launch" / "ag_vs_baseline.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_prints_both_arms():
    result = subprocess.run(
        ["bash", str(SCRIPT), "configs/default.py", "runs/cmp", "--config.train.steps=10"],
        env={**os.environ, "DRY_RUN": "1", "PYTHON": "python3"},
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines == [
        "python3 -m guided_jax.main --config configs/default.py --workdir runs/cmp/ag "
        "--config.guidance.enabled=true --config.train.steps=10 ",
        "python3 -m guided_jax.main --config configs/default.py --workdir runs/cmp/baseline "
        "--config.guidance.enabled=false --config.train.steps=10 ",
    ]


def test_missing_arguments_exit_with_usage():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr
