"""The package's architecture is enforced, not described: import-linter's contracts in
pyproject.toml (layers, and the heavy libraries only analysis/ may import) hold, an upward import
placed inside a function breaks them, and no two guided_jax modules import each other, counting
imports inside functions."""

import shutil
import subprocess
import sys

import grimp

from conftest import REPO, cli_env


def _lint_imports(root) -> subprocess.CompletedProcess:
    """``lint-imports`` with the contracts of ``root/pyproject.toml``, on ``root/guided_jax``."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
         "sys.exit(lint_imports_command())", "--config", str(root / "pyproject.toml")],
        cwd=root, env={**cli_env(), "PYTHONPATH": str(root)}, capture_output=True, text=True,
        check=False,
    )  # fmt: skip


def test_layer_contracts_hold():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_an_upward_import_inside_a_function_breaks_the_layers(tmp_path):
    """guidance/ is the bottom layer: a lazy import of the model from it must fail CI."""
    shutil.copytree(REPO / "guided_jax", tmp_path / "guided_jax")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    loss = tmp_path / "guided_jax" / "guidance" / "loss.py"
    loss.write_text(
        loss.read_text()
        + "\n\ndef _model_config():\n    from guided_jax.model import ModelConfig\n\n"
        + "    return ModelConfig\n"
    )
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "guided_jax.guidance is not allowed to import guided_jax.model" in result.stdout
    assert "guided_jax.guidance.loss -> guided_jax.model" in result.stdout


def test_no_two_modules_import_each_other():
    graph = grimp.build_graph("guided_jax")
    cycles = [
        (module, imported)
        for module in sorted(graph.modules)
        for imported in graph.find_modules_directly_imported_by(module)
        if graph.chain_exists(importer=imported, imported=module)
    ]
    assert cycles == []
