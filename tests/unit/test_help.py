r"""What ``python -m guided_jax.X --help`` shows: absl prints the command module's docstring as
it is, so each example command in it must read as a user pastes it into a shell, a long one
continued over several lines that end in `` \`` (in a docstring without the ``r`` prefix, Python
drops a backslash-newline and the example collapses into one line with runs of spaces).

The docstrings are read from the source (the command modules cannot all be imported into one
process: they define the same flags); two commands are also run with ``--help``."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO, cli_env

PACKAGE = REPO / "guided_jax"
CONTINUED = " \\"
EXAMPLE_INDENT = "    "


def _commands() -> list[str]:
    """The package's top-level modules that run as ``python -m guided_jax.X``."""
    return sorted(
        path.stem for path in PACKAGE.glob("*.py") if '__name__ == "__main__"' in path.read_text()
    )


def _module(command: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{command}.py").read_text())


def _docstring(command: str) -> str:
    """The module's ``__doc__`` exactly as Python builds it (escapes applied, not cleaned)."""
    docstring = ast.get_docstring(_module(command), clean=False)
    assert docstring, f"guided_jax/{command}.py has no module docstring for --help to print"
    return docstring


def _examples(docstring: str) -> list[list[str]]:
    """The example commands of a docstring, each as its lines (indented, comments left out)."""
    examples: list[list[str]] = []
    for line in docstring.splitlines():
        text = line.strip()
        if not line.startswith(EXAMPLE_INDENT) or text.startswith("#"):
            continue
        if examples and examples[-1][-1].endswith("\\"):
            examples[-1].append(line)
        else:
            examples.append([line])
    return examples


def _without_comment(line: str) -> str:
    return re.sub(r"\s+#.*$", "", line.strip())


def _defined_flags(command: str) -> set[str]:
    """Names given to ``flags.DEFINE_*`` / ``config_flags.DEFINE_*`` in the command module."""
    names = set()
    for node in ast.walk(_module(command)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr.startswith("DEFINE_")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(node.args[0].value)
    return names


def test_every_documented_command_is_found():
    readme = (REPO / "README.md").read_text()
    assert set(_commands()) == set(re.findall(r"python -m guided_jax\.(\w+)", readme))


@pytest.mark.parametrize("command", _commands())
def test_examples_continue_lines_as_a_shell_does(command):
    examples = _examples(_docstring(command))
    assert examples, f"guided_jax/{command}.py: no indented example command in its docstring"
    for lines in examples:
        where = f"guided_jax/{command}.py example {lines[0].strip()!r}"
        assert lines[0].strip().startswith(f"python -m guided_jax.{command} "), where
        first_indent = len(lines[0]) - len(lines[0].lstrip())
        for line in lines[1:]:
            indent = len(line) - len(line.lstrip())
            assert indent > first_indent, f"{where}: continuation {line!r} is not indented"
        for line in lines[:-1]:
            assert line.endswith(CONTINUED), f"{where}: {line!r} does not end with ' \\'"
        assert not lines[-1].endswith("\\"), f"{where}: its last line ends with a backslash"
        for line in lines:
            assert "   " not in _without_comment(line), f"{where}: run of spaces in {line!r}"


@pytest.mark.parametrize("command", _commands())
def test_examples_use_only_the_commands_own_flags(command):
    """An example with a renamed or misspelt flag would fail when pasted."""
    defined = _defined_flags(command)
    for lines in _examples(_docstring(command)):
        joined = " ".join(line.removesuffix(CONTINUED) for line in lines)
        for word in shlex.split(joined, comments=True):
            if word.startswith("--"):
                name = word[2:].split("=")[0]
                # --config.model.dtype=... overrides a key of the config flag --config.
                assert name in defined or name.split(".")[0] in defined, (command, word)


@pytest.mark.parametrize("command", ["finetune", "lower"])
def test_help_prints_the_docstring_unchanged(command):
    result = subprocess.run(
        [sys.executable, "-m", f"guided_jax.{command}", "--help"],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    docstring = _docstring(command)
    assert result.stdout.startswith(docstring), result.stdout[:2000]
    continued = [line for line in result.stdout.splitlines() if line.endswith(CONTINUED)]
    assert len(continued) >= 2, result.stdout[:2000]


def test_main_help_names_every_preset_and_config_section():
    from guided_jax.config import MODEL_PRESETS, load_config

    text = _docstring("main")
    for preset in MODEL_PRESETS:
        assert re.search(rf"\b{preset}\b", text), preset
    config = load_config(str(REPO / "configs" / "default.py"))
    listed = re.findall(r"^  (\w+): (.*(?:\n   \S.*)*)", text, flags=re.M)
    assert {section for section, _ in listed} == set(config.keys())
    for section, keys in listed:  # every key named exists
        for key in re.findall(r"\b([a-z_]+)\b(?! \()", re.sub(r"\([^)]*\)", "", keys)):
            if key not in ("or",):
                assert key in config[section], f"{section}.{key}"
    for config_file in re.findall(r"configs/\w+\.py", text):
        assert (REPO / config_file).is_file(), config_file
