"""Pointers in the repository's text stay true: every citation of the design document names
``docs/DESIGN.md`` and a section it has, every ``guided_jax`` module path or dotted name that the
docs, configs and package mention resolves to a module (or a name defined in one), and every
``tests/`` path mentioned exists. A renamed module, test or section fails here instead of
leaving a pointer to nothing.

Names are resolved from the source files (a module's top-level definitions and imports, a
class's members), without importing them: the commands define absl flags on import."""

from __future__ import annotations

import ast
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO

DESIGN = REPO / "docs" / "DESIGN.md"
THIS = Path(__file__).resolve()  # its examples of stale pointers are deliberate
TEXT_SUFFIXES = (".py", ".md", ".toml", ".sh")
# Not the project's text: run outputs, builds, data kept beside a checkout (shared/); hidden
# directories (environments, caches) and *.egg-info are skipped too.
SKIPPED_DIRS = ("__pycache__", "runs", "build", "shared")

HEADING = re.compile(r"^#{2,}\s+(\d+(?:\.\d+)*)\.?\s", re.M)
CITATION = re.compile(r"([\w./-]*)DESIGN\.md\s*(?:§\s*|section\s+)(\d+(?:\.\d+)*)")
MODULE_PATH = re.compile(r"(?<![\w./-])guided_jax/(?:\w+/)*(?:\w+\.py\b)?")
DOTTED_NAME = re.compile(r"(?<![\w./-])guided_jax(?:\.[A-Za-z_]\w*)+")
# Sphinx roles relative to the module's own package: :mod:`.dense`, :func:`~.flash.f`.
RELATIVE_ROLE = re.compile(r":(?:mod|func|class|data|attr|meth|exc):`~?(\.+[A-Za-z_][\w.]*)`")
TEST_PATH = re.compile(r"(?<![\w./-])tests/(?:[\w.-]+/)*\w+\.py\b")


def _text_files() -> Iterator[Path]:
    """Every .py, .md, .toml and .sh file of the repository (not environments or caches)."""
    for root, dirs, files in os.walk(REPO):
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(".") and d not in SKIPPED_DIRS and not d.endswith(".egg-info")
        )
        for name in sorted(files):
            path = Path(root, name)
            if path.suffix in TEXT_SUFFIXES and path.resolve() != THIS:
                yield path


def _module_reference_files() -> list[Path]:
    """Where module paths and names are checked: the docs, configs and the package."""
    return [
        REPO / "README.md",
        REPO / "pyproject.toml",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "configs").glob("*.py")),
        *sorted((REPO / "guided_jax").rglob("*.py")),
    ]


def _line(text: str, match: re.Match) -> int:
    return text.count("\n", 0, match.start()) + 1


def design_sections(text: str) -> set[str]:
    """The numbers of the document's numbered headings (``## 2. ...`` gives ``2``)."""
    return set(HEADING.findall(text))


def citation_errors(text: str, sections: set[str]) -> list[str]:
    """Citations that do not name ``docs/DESIGN.md`` or a section it has."""
    errors = []
    for match in CITATION.finditer(text):
        prefix, section = match.groups()
        cited = match.group(0)
        if prefix != "docs/":
            errors.append(f"line {_line(text, match)}: {cited!r} should cite docs/DESIGN.md")
        elif section not in sections:
            errors.append(
                f"line {_line(text, match)}: {cited!r} names no section of docs/DESIGN.md "
                f"(it has {sorted(sections)})"
            )
    return errors


def _bindings(body: list[ast.stmt]) -> dict[str, tuple[ast.AST, str]]:
    """What a module or class body binds at its own level: name → (node, imported name)."""
    names: dict[str, tuple[ast.AST, str]] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = (node, node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        names[leaf.id] = (node, leaf.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (node, alias.name)
    return names


def _module_file(parts: list[str]) -> Path | None:
    path = REPO.joinpath(*parts)
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def resolves(dotted: str) -> bool:
    """Whether ``guided_jax.a.b`` is a module of the package, or ``guided_jax.a.b.name[.attr]``
    a name that module defines or imports (followed through re-exports) and a member of it when
    it is a class."""
    parts = dotted.split(".")
    stop = next((i for i in range(len(parts), 0, -1) if _module_file(parts[:i])), 0)
    if stop == 0:
        return False
    module = _module_file(parts[:stop])
    assert module is not None
    body = _parsed(module).body
    rest = parts[stop:]
    for index, name in enumerate(rest):
        bound = _bindings(body).get(name)
        if bound is None:
            return False
        node, imported = bound
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("guided_jax"):
            return resolves(".".join([node.module, imported, *rest[index + 1 :]]))
        if isinstance(node, ast.Import | ast.ImportFrom):
            return True  # another library's names are not looked into
        if isinstance(node, ast.ClassDef):
            body = node.body
        elif index < len(rest) - 1:
            return False  # a function or a value: its attributes are not names we define
    return True


def _package_of(path: Path) -> list[str]:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return parts[:-1]  # a module's package; an __init__'s package is its own directory


def module_errors(text: str, package: list[str] | None = None) -> list[str]:
    """Module paths and dotted names of ``text`` that resolve to nothing; ``package`` (the
    text's own package, for ``guided_jax`` sources) resolves relative roles like :mod:`.x`."""
    errors = []
    for match in MODULE_PATH.finditer(text):
        if not (REPO / match.group(0)).exists():
            errors.append(f"line {_line(text, match)}: no file {match.group(0)}")
    for match in DOTTED_NAME.finditer(text):
        name = match.group(0)
        if name.split(".")[1].isupper():  # a placeholder: python -m guided_jax.NAME
            continue
        if not resolves(name):
            errors.append(f"line {_line(text, match)}: no module or name {name}")
    if package is not None:
        for match in RELATIVE_ROLE.finditer(text):
            relative = match.group(1)
            dots = len(relative) - len(relative.lstrip("."))
            base = package[: len(package) - (dots - 1)]
            name = ".".join([*base, relative.lstrip(".")])
            if dots > len(package) or not resolves(name):
                errors.append(f"line {_line(text, match)}: {relative} ({name}) resolves to nothing")
    return errors


def missing_test_paths(text: str) -> list[str]:
    """``tests/...py`` paths of ``text`` that do not exist."""
    return [
        f"line {_line(text, match)}: no file {match.group(0)}"
        for match in TEST_PATH.finditer(text)
        if not (REPO / match.group(0)).is_file()
    ]


def _relative(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_design_document_has_numbered_sections():
    sections = design_sections(DESIGN.read_text())
    assert {"1", "2", "3", "4", "5", "6"} <= sections, sorted(sections)


def test_every_design_citation_names_the_document_and_an_existing_section():
    sections = design_sections(DESIGN.read_text())
    errors, cited = [], 0
    for path in _text_files():
        text = path.read_text()
        cited += len(CITATION.findall(text))
        errors += [f"{_relative(path)} {e}" for e in citation_errors(text, sections)]
    assert cited >= 5  # README, pyproject.toml, the flash kernel and two tests cite it
    assert errors == [], "\n".join(errors)


def test_every_module_path_and_name_mentioned_resolves():
    errors, checked = [], 0
    for path in _module_reference_files():
        text = path.read_text()
        inside = path.is_relative_to(REPO / "guided_jax")
        checked += len(DOTTED_NAME.findall(text)) + len(MODULE_PATH.findall(text))
        package = _package_of(path) if inside else None
        errors += [f"{_relative(path)} {e}" for e in module_errors(text, package)]
    assert checked >= 100
    assert errors == [], "\n".join(errors)


def test_every_tests_path_mentioned_exists():
    errors, checked = [], 0
    for path in _text_files():
        text = path.read_text()
        checked += len(TEST_PATH.findall(text))
        errors += [f"{_relative(path)} {e}" for e in missing_test_paths(text)]
    assert checked >= 20
    assert errors == [], "\n".join(errors)


def test_the_checks_catch_stale_pointers():
    """Each kind of stale pointer is reported, and the forms that are right are not."""
    sections = {"1", "2"}
    assert citation_errors("see docs/DESIGN.md §2 and (docs/DESIGN.md section 1)", sections) == []
    assert len(citation_errors("see docs/DESIGN.md §3", sections)) == 1
    assert len(citation_errors("see DESIGN.md §2", sections)) == 1
    assert len(citation_errors("see shared/DESIGN.md §2", sections)) == 1
    assert design_sections("# Title\n## 1. One\ntext 3. no\n### 1.2 Sub\n## Appendix\n") == {
        "1",
        "1.2",
    }

    good = (
        "guided_jax/data/sources.py, guided_jax/kernels/, guided_jax.data.sources, "
        "guided_jax.guidance.register_pattern, guided_jax.guidance.HeadSpec.parse, "
        "guided_jax.config.resolve.LAYOUT_KEYS, python -m guided_jax.NAME, :mod:`.dense`"
    )
    assert module_errors(good, ["guided_jax", "kernels"]) == []
    for stale in (
        "guided_jax/sources.py",
        "guided_jax/nowhere/",
        "guided_jax.sources",
        "guided_jax.guidance.no_such_function",
        "guided_jax.guidance.HeadSpec.no_such_method",
        ":func:`.flash.no_such_function`",
    ):
        assert len(module_errors(stale, ["guided_jax", "kernels"])) == 1, stale

    assert missing_test_paths("tests/e2e/test_layers.py, tests/conftest.py") == []
    assert len(missing_test_paths("run by tests/unit/test_layers.py")) == 1
