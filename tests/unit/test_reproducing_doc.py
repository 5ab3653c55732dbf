"""docs/REPRODUCING.md stays true: every row of its tables names what exercises it, and every
test it names exists as a test pytest runs (a renamed or deleted test fails here instead of
leaving the page wrong; a helper or a function nested in a test of that name does not count)."""

import ast
import re

from conftest import REPO

DOC = REPO / "docs" / "REPRODUCING.md"


def _rows() -> list[list[str]]:
    """The body rows of the page's tables (a header is the row above a ``|---|`` line)."""
    lines = [line for line in DOC.read_text().splitlines() if line.startswith("|")]
    separator = [set(line) <= set("|- ") for line in lines]
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for i, line in enumerate(lines)
        if not separator[i] and not (i + 1 < len(lines) and separator[i + 1])
    ]


def test_every_row_names_what_exercises_it():
    rows = _rows()
    assert len(rows) >= 20
    for cells in rows:
        assert len(cells) == 3 and re.search(r"tests/\S+\.py", cells[2]), cells


def _tests(source: str) -> set[str]:
    """The module-level ``test_*`` functions of a test file: what ``path::name`` selects in
    pytest (a nested function or a helper of that name would keep a dead reference alive)."""
    return {
        node.name
        for node in ast.parse(source).body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test")
    }


def test_only_module_level_test_functions_count():
    source = (
        "def test_kept():\n"
        "    def test_nested():\n"
        "        pass\n"
        "def test_also_kept(tmp_path):\n"
        "    pass\n"
        "def helper():\n"
        "    pass\n"
        "class TestThing:\n"
        "    def test_method(self):\n"
        "        pass\n"
    )
    assert _tests(source) == {"test_kept", "test_also_kept"}


def test_every_named_test_exists():
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", DOC.read_text())
    assert named
    for path, function in named:
        file = REPO / path
        assert file.is_file(), path
        if function:
            assert function in _tests(file.read_text()), f"{path}::{function}"
