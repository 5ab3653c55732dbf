"""Corpus text files (local or ``gs://``), split into documents by line or by paragraph, each
problem reported with the file, byte offset and line at fault."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
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
    return list(iter_text_file(path, documents))


_READ_BYTES = 1 << 23  # bytes read at a time: a file is streamed, never held whole


def iter_text_file(path: str | os.PathLike[str], documents: str = "line") -> Iterator[str]:
    """The documents of one corpus file as :func:`read_text_file` finds them, read a few MB at
    a time, so a file larger than memory streams (``documents="file"`` yields the whole file
    as one document: the reference's format reads it whole). A problem with the file raises when
    the stream reaches it, with the same message as when the file is read whole."""
    if documents not in (*DOCUMENT_MODES, WHOLE_FILE):
        raise ValueError(f"documents must be one of {list(DOCUMENT_MODES)}, got {documents!r}")
    expected = {
        "line": "expected a UTF-8 text file with one document per line",
        "paragraph": "expected a UTF-8 text file with documents separated by blank lines",
        WHOLE_FILE: "expected a UTF-8 text file",
    }[documents]
    path = epath.Path(path)
    if documents == WHOLE_FILE:
        # Python's text mode, as the reference opens the file: universal newlines
        text = "".join(_text_lines(path, expected, keep_ends=True))
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        if not text.strip():
            raise CorpusError(f"corpus file {str(path)!r} is empty or only whitespace; {expected}")
        yield text
        return
    found = 0
    # Split on "\n" only: str.splitlines() would also break on form feeds and U+2028 etc.
    lines = (line.removesuffix("\r") for line in _text_lines(path, expected))
    if documents == "line":
        for line in lines:
            if line.strip():
                found += 1
                yield line
    else:
        for nonblank, group in itertools.groupby(lines, key=lambda line: bool(line.strip())):
            if nonblank:
                found += 1
                yield "\n".join(group)
    if not found:
        raise CorpusError(f"corpus file {str(path)!r} is empty or only whitespace; {expected}")


def _text_lines(path: epath.Path, expected: str, *, keep_ends: bool = False) -> Iterator[str]:
    """The file's text cut at each ``"\n"`` (kept with ``keep_ends``), decoded as UTF-8 a few
    MB at a time; a byte-order mark is dropped. A NUL byte anywhere in the file is reported
    before an invalid UTF-8 sequence, with byte offsets and lines of the whole file."""
    try:
        if not path.exists():
            raise CorpusError(f"corpus file {str(path)!r} does not exist; {expected}")
        if path.is_dir():
            raise CorpusError(f"corpus file {str(path)!r} is a directory; {expected}")
        reader = path.open("rb")
    except (OSError, ImportError) as err:
        raise _unreadable(path, err) from err
    with reader:
        offset, line, carry, first = 0, 1, b"", True  # where ``carry`` starts in the file
        while True:
            try:
                chunk = reader.read(_READ_BYTES)
            except OSError as err:
                raise _unreadable(path, err) from err
            data = carry + chunk
            cut = len(data) if not chunk else data.rfind(b"\n") + 1
            complete, carry = data[:cut], data[cut:]
            nul = complete.find(b"\x00")
            if nul >= 0:
                raise _binary(path, offset + nul, expected)
            try:
                text = complete.decode("utf-8")
            except UnicodeDecodeError as err:
                nul = _first_nul(reader, carry)
                if nul >= 0:
                    raise _binary(path, offset + len(complete) + nul, expected) from None
                at = line + complete.count(b"\n", 0, err.start)
                raise CorpusError(
                    f"corpus file {str(path)!r} is not valid UTF-8: byte "
                    f"0x{complete[err.start]:02x} at byte offset {offset + err.start} "
                    f"(line {at}); {expected}"
                ) from None
            if first and complete:
                text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the text
                first = False
            offset += len(complete)
            line += complete.count(b"\n")
            if keep_ends:
                yield text
            elif text:
                yield from text.removesuffix("\n").split("\n") if chunk else text.split("\n")
            if not chunk:
                return


def _first_nul(reader: Any, rest: bytes) -> int:
    """Where the first NUL byte of ``rest`` and the unread part of the file is, counted from the
    start of ``rest``; -1 if there is none."""
    seen = rest.find(b"\x00")
    position = len(rest)
    while seen < 0:
        chunk = reader.read(_READ_BYTES)
        if not chunk:
            return -1
        found = chunk.find(b"\x00")
        seen = -1 if found < 0 else position + found
        position += len(chunk)
    return seen


def _binary(path: epath.Path, offset: int, expected: str) -> CorpusError:
    return CorpusError(
        f"corpus file {str(path)!r} looks binary (NUL byte at byte offset {offset}); {expected}"
    )


def _unreadable(path: epath.Path, err: BaseException) -> CorpusError:
    reason = getattr(err, "strerror", None) or err
    return CorpusError(f"cannot read corpus file {str(path)!r}: {reason}")
