"""docs/REPRODUCING.md stays true: every row of its tables names what exercises it, and every
test it names exists (a renamed or deleted test fails here instead of leaving the page wrong)."""

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


def test_every_named_test_exists():
    named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", DOC.read_text())
    assert named
    for path, function in named:
        file = REPO / path
        assert file.is_file(), path
        if function:
            tree = ast.parse(file.read_text())
            defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert function in defined, f"{path}::{function}"
