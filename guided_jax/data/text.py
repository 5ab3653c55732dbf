"""Corpus text files (local or ``gs://``), split into documents by line or by paragraph, each
problem reported with the file, byte offset and line at fault."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

from etils import epath


class CorpusError(ValueError):
    """A corpus file or the corpus as a whole cannot be used; the message names the culprit."""


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
# data.format: "documents" splits files by data.documents; "reference_text" reads each file
# whole, blank lines and all, as the reference's TextDataset does (f.read(); only a byte-order
# mark is removed), and tokenizes it with the reference's rule for special tokens.
REFERENCE_TEXT = "reference_text"
FORMATS = ("documents", REFERENCE_TEXT)
WHOLE_FILE = "file"


def reads_whole_files(data_config: Any) -> bool:
    """Whether a config's ``data`` section asks for the reference's token stream
    (``data.format=reference_text``; configs written before the key read documents)."""
    return data_config.get("format", "documents") == REFERENCE_TEXT


def read_text_file(path: str | os.PathLike[str], documents: str = "line") -> list[str]:
    """Read, validate and split one corpus file (a local path or a ``gs://`` URL) into its
    documents (see :func:`read_text_files`)."""
    if documents not in (*DOCUMENT_MODES, WHOLE_FILE):
        raise ValueError(f"documents must be one of {list(DOCUMENT_MODES)}, got {documents!r}")
    expected = {
        "line": "expected a UTF-8 text file with one document per line",
        "paragraph": "expected a UTF-8 text file with documents separated by blank lines",
        WHOLE_FILE: "expected a UTF-8 text file",
    }[documents]
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
    if documents == WHOLE_FILE:
        # Python's text mode, as the reference opens the file: universal newlines
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.strip():
            raise CorpusError(f"corpus file {str(path)!r} is empty or only whitespace; {expected}")
        return [text]
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
