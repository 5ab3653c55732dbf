"""A pattern registered in a config file reaches every command that reads the run back: the
run keeps that file, and reading the run registers its patterns again in a new process."""

import json
import subprocess
import sys

from conftest import REPO, cli_env, write_corpus

CONFIG_FILE = """
import numpy as np

from guided_jax.config import load_config
from guided_jax.guidance import register_pattern

# Attend two tokens back: a pattern of this file only.
register_pattern("two_back", lambda n: np.eye(n, k=-2))


def get_config():
    config = load_config({tiny!r})
    config.guidance.heads = "next:1,two_back:2"
    return config
"""


def _run(command: str, *args) -> str:
    """``python -m guided_jax.COMMAND ARGS`` (or ``python -c ARGS`` for ``-c``) in a new
    process: nothing registered but what the package and the run provide."""
    module = ["-c"] if command == "-c" else ["-m", f"guided_jax.{command}"]
    result = subprocess.run(
        [sys.executable, *module, *map(str, args)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_a_registered_pattern_reaches_the_analysis_commands(tmp_path):
    config = tmp_path / "my_patterns.py"
    config.write_text(CONFIG_FILE.format(tiny=str(REPO / "configs" / "tiny.py")))
    workdir = tmp_path / "run"
    corpus = write_corpus(tmp_path / "corpus.txt", lines=60)
    _run("main", "--config", config, "--workdir", workdir, f"--config.data.train_files={corpus}")
    index = json.loads((workdir / "patterns" / "patterns.json").read_text())
    assert index == {"two_back": {"file": "0_my_patterns.py", "registered_in": str(config)}}

    config.unlink()  # the run's own copy is what registers it again
    png = tmp_path / "maps.png"
    _run("visualize", "--workdir", workdir, "--text", "The cat sat on the mat.", "--out", png)
    assert png.read_bytes().startswith(b"\x89PNG")
    titles = _run(
        "-c",
        "from guided_jax.analysis.attention_maps import head_titles\n"
        "from guided_jax.weights.workdir import read_run_config\n"
        f"print(head_titles(read_run_config({str(workdir)!r}), 4))",
    )
    assert titles.strip() == repr(
        ["head 0\n→ next", "head 1\n→ two_back", "head 2\n→ two_back", "head 3"]
    )
