"""The embedded default corpus: documentation paragraphs of the Python standard library, so the
README's first command trains on real English prose with no download and no files of its own."""

from __future__ import annotations

import ast
import inspect
import itertools
import os
import re
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from guided_jax.data.text import CorpusError

# Directories that hold tests, tools or third-party code rather than library documentation.
# Directory names that are not Python identifiers (site-packages, lib-dynload, config-3.x-...)
# are skipped as well, since they cannot be packages.
_SKIPPED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"})
_MIN_WORDS = 4  # shorter paragraphs are mostly headings or stray fragments
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def default_corpus(stdlib_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Return documentation paragraphs of the Python standard library, one document each.

    This gives about 2 MB of English prose (Python 3.11) with no download and no files beyond the
    Python installation. Sources, both read with :mod:`ast` (nothing is imported):

    * module, class and function docstrings of every ``.py`` file under ``stdlib_dir``
      (default: this interpreter's stdlib), in sorted path order;
    * the language-reference topics that ``pydoc`` ships in ``pydoc_data/topics.py``.

    Each text is normalised with :func:`inspect.cleandoc` and split at blank lines; each
    paragraph becomes one line of text. Paragraphs with fewer than a few words are dropped, and
    repeated paragraphs are kept only once so the held-out split does not overlap training text.
    """
    root = Path(stdlib_dir if stdlib_dir is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CorpusError(f"standard library directory {str(root)!r} does not exist")
    paragraphs: dict[str, None] = {}  # ordered set
    for text in itertools.chain(_stdlib_docstrings(root), _pydoc_topics(root)):
        for paragraph in _PARAGRAPH_BREAK.split(inspect.cleandoc(text)):
            line = " ".join(paragraph.split())
            if len(line.split(" ")) >= _MIN_WORDS:
                paragraphs.setdefault(line, None)
    if not paragraphs:
        raise CorpusError(f"found no docstrings under {str(root)!r}")
    return list(paragraphs)


def _stdlib_sources(root: Path) -> list[Path]:
    """Return the importable ``.py`` files under ``root``, sorted by their relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d.isidentifier() and d not in _SKIPPED_DIRS]
        for name in filenames:
            stem, ext = os.path.splitext(name)
            if ext == ".py" and stem.isidentifier() and not stem.startswith("test_"):
                found.append(Path(dirpath, name))
    return sorted(found, key=lambda path: path.relative_to(root).parts)


def _parse(path: Path) -> ast.Module | None:
    """Parse a source file, or return None if it is unreadable or not valid for this Python."""
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            # Invalid escape sequences in old sources warn; they are irrelevant here.
            warnings.simplefilter("ignore")
            return ast.parse(source, filename=str(path))
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _stdlib_docstrings(root: Path) -> Iterator[str]:
    """Yield docstrings of all modules, classes and functions under ``root`` in source order."""
    for path in _stdlib_sources(root):
        tree = _parse(path)
        if tree is not None:
            yield from _docstrings_in(tree)


def _docstrings_in(tree: ast.Module) -> Iterator[str]:
    """Yield the docstrings of a module and of its (nested) definitions, in source order."""
    module_doc = ast.get_docstring(tree, clean=False)
    if module_doc:
        yield module_doc
    yield from _docstrings_in_block(tree.body)


def _docstrings_in_block(body: list[ast.stmt]) -> Iterator[str]:
    """Walk statement blocks only, not expressions: much faster than ``ast.walk``, and it still
    reaches definitions nested in ``if``/``try``/``with`` blocks, classes and functions."""
    for node in body:
        if isinstance(node, _DEFINITIONS):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield doc
        for block in _child_statement_lists(node):
            yield from _docstrings_in_block(block)


def _child_statement_lists(node: ast.stmt) -> list[list[ast.stmt]]:
    """Return the nested statement blocks of a compound statement, in source order."""
    blocks: list[list[ast.stmt]] = []
    for field in ("body", "handlers", "cases", "orelse", "finalbody"):
        value = getattr(node, field, None)
        if not isinstance(value, list):
            continue
        if field in ("handlers", "cases"):  # except clauses and match cases hold bodies
            blocks.extend(part.body for part in value)
        else:
            blocks.append(value)
    return blocks


def _pydoc_topics(root: Path) -> Iterator[str]:
    """Yield the language-reference topic texts from ``pydoc_data/topics.py``, sorted by topic."""
    tree = _parse(root / "pydoc_data" / "topics.py")
    if tree is None:
        return
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            entries = {
                key.value: value.value
                for key, value in zip(node.value.keys, node.value.values, strict=True)
                if isinstance(key, ast.Constant)
                and isinstance(key.value, str)
                and isinstance(value, ast.Constant)
                and isinstance(value.value, str)
            }
            for name in sorted(entries):
                yield entries[name]
