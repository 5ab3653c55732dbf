"""Text files, the embedded default corpus, packing into fixed-length blocks, eval batches.

Packing mirrors the reference implementation (HuggingFace's old ``TextDataset``): all
documents are tokenized, concatenated into one token stream and cut into blocks of
``block_size`` tokens that start with ``<s>`` and end with ``</s>`` (``[CLS]`` and ``[SEP]`` with a
WordPiece tokenizer), so no block is ever padded. Large corpora are packed the same way, streamed
into the token cache (:mod:`guided_jax.token_cache`); training batches come from
:mod:`guided_jax.pipeline`.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import math
import os
import re
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from etils import epath

if TYPE_CHECKING:
    from guided_jax.tokenizer import Tokenizer

__all__ = [
    "CorpusError",
    "default_corpus",
    "eval_batches",
    "load_corpus",
    "pack_blocks",
    "pack_starts",
    "read_text_file",
    "read_text_files",
    "split_blocks",
    "tokenize_and_pack",
]


class CorpusError(ValueError):
    """A corpus file or the corpus as a whole cannot be used; the message names the culprit."""


# ---------------------------------------------------------------------------------------------
# Reading text files
# ---------------------------------------------------------------------------------------------


def read_text_files(paths: Sequence[str | os.PathLike[str]], documents: str = "line") -> list[str]:
    """Return the documents of UTF-8 text files (local or ``gs://``), in order.

    ``documents="line"``: each non-blank line is one document; ``"paragraph"``: runs of lines
    separated by blank lines are (joined with newlines into) one document.
    Every problem is reported as a :class:`CorpusError` naming the file, so a typo in a config
    fails at start-up instead of silently training on garbage.
    """
    if isinstance(paths, str | os.PathLike):
        # A bare string would otherwise be iterated character by character.
        paths = [paths]
    if len(paths) == 0:
        raise CorpusError("no corpus files given; expected at least one UTF-8 text file")
    found: list[str] = []
    for path in paths:
        found.extend(read_text_file(path, documents))
    return found


DOCUMENT_MODES = ("line", "paragraph")


def read_text_file(path: str | os.PathLike[str], documents: str = "line") -> list[str]:
    """Read, validate and split one corpus file (a local path or a ``gs://`` URL) into its
    documents (see :func:`read_text_files`)."""
    if documents not in DOCUMENT_MODES:
        raise ValueError(f"documents must be one of {list(DOCUMENT_MODES)}, got {documents!r}")
    expected = (
        "expected a UTF-8 text file with one document per line"
        if documents == "line"
        else "expected a UTF-8 text file with documents separated by blank lines"
    )
    path = epath.Path(path)
    try:
        if not path.exists():
            raise CorpusError(f"corpus file {str(path)!r} does not exist; {expected}")
        if path.is_dir():
            raise CorpusError(f"corpus file {str(path)!r} is a directory; {expected}")
        raw = path.read_bytes()
    except (OSError, ImportError) as err:
        reason = getattr(err, "strerror", None) or err
        raise CorpusError(f"cannot read corpus file {str(path)!r}: {reason}") from err
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise CorpusError(
            f"corpus file {str(path)!r} looks binary (NUL byte at byte offset {nul}); {expected}"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise CorpusError(
            f"corpus file {str(path)!r} is not valid UTF-8: byte 0x{raw[err.start]:02x} at byte "
            f"offset {err.start} (line {line}); {expected}"
        ) from None
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the text
    # Split on "\n" only: str.splitlines() would also break on form feeds and U+2028 etc.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    if documents == "line":
        found = [line for line in lines if line.strip()]
    else:
        paragraphs = itertools.groupby(lines, key=lambda line: bool(line.strip()))
        found = ["\n".join(group) for nonblank, group in paragraphs if nonblank]
    if not found:
        raise CorpusError(f"corpus file {str(path)!r} is empty or only whitespace; {expected}")
    return found


def load_corpus(files: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Return the documents of ``files``, or the embedded default corpus when none are given."""
    if isinstance(files, str | os.PathLike):
        files = [files]
    if len(files) == 0:
        return default_corpus()
    return read_text_files(files)


# ---------------------------------------------------------------------------------------------
# Embedded default corpus: the standard library's documentation
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Packing and splitting
# ---------------------------------------------------------------------------------------------


def pack_blocks(
    token_ids: Iterable[Sequence[int]], block_size: int, bos_id: int, eos_id: int
) -> np.ndarray:
    """Concatenate documents and cut them into ``[bos] + chunk + [eos]`` blocks of block_size.

    ``bos``/``eos`` are the tokenizer's (``<s>``/``</s>`` for RoBERTa's BPE, ``[CLS]``/``[SEP]``
    for BERT's WordPiece), as the reference's ``build_inputs_with_special_tokens`` adds them.
    As in the reference, chunks hold ``block_size - 2`` consecutive tokens of the stream and the
    remainder that does not fill a chunk is dropped, so blocks never need padding.
    Returns an int32 array of shape ``[num_blocks, block_size]``.
    """
    block_size = _positive_int(block_size, "block_size")
    if block_size < 3:
        raise ValueError(f"block_size must be at least 3 (bos, one token, eos), got {block_size}")
    arrays = [np.asarray(ids, dtype=np.int64).reshape(-1) for ids in token_ids]
    stream = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    vocab_limit = np.iinfo(np.int32).max
    if stream.size and (stream.min() < 0 or stream.max() > vocab_limit):
        raise ValueError("token ids must be non-negative and fit in int32")
    chunk = block_size - 2
    num_blocks = stream.size // chunk
    if num_blocks == 0:
        raise CorpusError(
            f"corpus has only {stream.size} tokens, fewer than one block of block_size "
            f"{block_size} ({chunk} text tokens + bos + eos); use more text or a smaller "
            "data.block_size"
        )
    blocks = np.empty((num_blocks, block_size), dtype=np.int32)
    blocks[:, 0] = bos_id
    blocks[:, -1] = eos_id
    blocks[:, 1:-1] = stream[: num_blocks * chunk].reshape(num_blocks, chunk)
    return blocks


def start_flags(lengths: Sequence[int]) -> np.ndarray:
    """The uint8 flag stream of documents of these token ``lengths`` run together: 1 at each
    document's first token (documents without tokens start nowhere)."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    flags = np.zeros(int(lengths.sum()), dtype=np.uint8)
    firsts = np.cumsum(lengths) - lengths
    flags[firsts[lengths > 0]] = 1
    return flags


def pack_starts(lengths: Sequence[int], block_size: int) -> np.ndarray:
    """``[num_blocks, block_size]`` uint8: 1 where a document starts, in the blocks that
    :func:`pack_blocks` cuts from documents of these token ``lengths`` (0 in the bos and eos
    columns). ``data.document_masks`` turns these into attention masks
    (:mod:`guided_jax.documents`)."""
    block_size = _positive_int(block_size, "block_size")
    if block_size < 3:
        raise ValueError(f"block_size must be at least 3 (bos, one token, eos), got {block_size}")
    stream = start_flags(lengths)
    chunk = block_size - 2
    num_blocks = stream.size // chunk
    starts = np.zeros((num_blocks, block_size), dtype=np.uint8)
    starts[:, 1:-1] = stream[: num_blocks * chunk].reshape(num_blocks, chunk)
    return starts


def split_blocks(blocks: np.ndarray, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Split blocks into (train, eval), holding out the last ``ceil(eval_fraction * N)`` blocks.

    The held-out blocks are the contiguous tail of the token stream, so no text is shared
    between the two parts (apart from what the corpus itself repeats).
    """
    blocks = _as_blocks(blocks)
    if not 0.0 <= eval_fraction < 1.0 or math.isnan(eval_fraction):
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(blocks)
    # Rounding first keeps e.g. 0.3 * 10 = 3.0000000000000004 from becoming 4 blocks.
    n_eval = math.ceil(round(eval_fraction * n, 9))
    if n - n_eval < 1:
        raise CorpusError(
            f"eval_fraction {eval_fraction} of {n} blocks leaves no training block; use more text "
            "or a smaller eval fraction"
        )
    return blocks[: n - n_eval], blocks[n - n_eval :]


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def eval_batches(
    blocks: np.ndarray, batch_size: int, max_batches: int | None = None
) -> list[np.ndarray]:
    """Return fixed, in-order evaluation batches so every evaluation sees the same data.

    Only full batches are used (the last partial batch is dropped) so that every batch has the
    same shape; if there are fewer blocks than one batch, they form a single smaller batch.
    ``max_batches=None`` means no limit.
    """
    blocks = _as_blocks(blocks, allow_empty=True)
    batch_size = _positive_int(batch_size, "batch_size")
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 0):
        raise ValueError(f"max_batches must be None or a non-negative integer, got {max_batches}")
    n = len(blocks)
    if n == 0 or max_batches == 0:
        return []
    if n < batch_size:
        return [blocks.copy()]
    num = n // batch_size
    if max_batches is not None:
        num = min(num, max_batches)
    return [blocks[i * batch_size : (i + 1) * batch_size].copy() for i in range(num)]


def tokenize_and_pack(
    texts: Sequence[str], tokenizer: Tokenizer, block_size: int, separator: str = "\n"
) -> np.ndarray:
    """Tokenize documents with ``tokenizer`` and pack them into training blocks.

    Each document is encoded followed by ``separator``. The default newline restores the line
    break that :func:`read_text_files` removed, so the token stream equals the reference's
    tokenization of the whole file and documents do not run into each other ("end.Next").
    """
    if isinstance(texts, str):
        texts = [texts]
    if separator:
        texts = [text + separator for text in texts]
    return pack_blocks(
        _encode_in_chunks(texts, tokenizer), block_size, tokenizer.bos_id, tokenizer.eos_id
    )


def _encode_in_chunks(
    texts: Sequence[str], tokenizer: Tokenizer, chunk: int = 4096
) -> Iterator[list[int]]:
    """Batch-encode in chunks, keeping the library's parallelism with bounded peak memory."""
    for start in range(0, len(texts), chunk):
        yield from tokenizer.encode_batch(texts[start : start + chunk])


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def _positive_int(value: int, name: str) -> int:
    """Return ``value`` as int, rejecting bools, non-integers and values below 1."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _as_blocks(blocks: np.ndarray, allow_empty: bool = False) -> np.ndarray:
    """Check that ``blocks`` is a 2-D ``[num_blocks, block_size]`` array."""
    blocks = np.asarray(blocks)
    if blocks.ndim != 2:
        raise ValueError(f"blocks must be a 2-D [num_blocks, block_size] array, got {blocks.shape}")
    if len(blocks) == 0 and not allow_empty:
        raise CorpusError("there are no blocks; use more text or a smaller data.block_size")
    return blocks
