"""Byte-level BPE tokenizer (RoBERTa style): training, loading and a small command-line tool.

The on-disk format is the ``vocab.json`` + ``merges.txt`` pair that RoBERTa uses, so the
reference implementation's ``ag_config/*`` tokenizer directories load unchanged.

Command line::

    python -m guided_jax.tokenizer --files a.txt b.txt --vocab-size 8000 --out DIR
    python -m guided_jax.tokenizer --default-corpus --vocab-size 8000 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import AddedToken, ByteLevelBPETokenizer

from guided_jax import data

__all__ = ["SPECIAL_TOKENS", "Tokenizer", "load_tokenizer", "main", "train_tokenizer"]

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
_BYTE_ALPHABET_SIZE = 256  # byte-level BPE always starts from all 256 byte symbols


class Tokenizer:
    """A loaded byte-level BPE tokenizer plus the ids of its special tokens.

    ``encode_batch`` never adds special tokens: blocks get ``<s>``/``</s>`` when they are packed
    (see :func:`guided_jax.data.pack_blocks`), exactly as in the reference.
    """

    def __init__(self, backend: ByteLevelBPETokenizer, directory: str | os.PathLike[str] | None):
        self._backend = backend
        self.directory = Path(directory) if directory is not None else None
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(
                f"tokenizer{self._where()} lacks special tokens {missing}; "
                f"expected all of {list(SPECIAL_TOKENS)}"
            )
        ids = [int(backend.token_to_id(t)) for t in SPECIAL_TOKENS]
        self.bos_id, self.pad_id, self.eos_id, self.unk_id, self.mask_id = ids
        self.special_ids: tuple[int, ...] = tuple(ids)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (the embedding table's row count)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens; encodes in parallel in the library."""
        if isinstance(texts, str):
            raise TypeError("encode_batch expects a sequence of texts, not a single string")
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are shown by default so masked inputs stay readable."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """Id of the vocabulary entry spelled exactly ``token``.

        Raises ValueError instead of returning the first piece when ``token`` is not a single
        entry: guiding attention towards part of a word would silently change the method.
        In byte-level BPE a leading space is part of the entry (``"Ġ."`` vs ``"."``).
        """
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            hint = ""
            if not token.startswith("Ġ") and self._backend.token_to_id("Ġ" + token) is not None:
                hint = f" (the entry for it after a space is {'Ġ' + token!r})"
            pieces = self._backend.encode(token, add_special_tokens=False).tokens
            raise ValueError(
                f"token {token!r} is not a single entry of the vocabulary of tokenizer"
                f"{self._where()}; it would be split into {pieces}{hint}"
            )
        return int(token_id)

    def _where(self) -> str:
        """Location used in error messages."""
        return f" in {str(self.directory)!r}" if self.directory is not None else ""

    def __repr__(self) -> str:
        return f"Tokenizer(directory={self.directory!r}, vocab_size={self.vocab_size})"


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
    """Load ``vocab.json`` + ``merges.txt`` from ``directory``; other files there are ignored.

    The files are checked first so that a wrong path or an incomplete vocabulary is reported
    clearly instead of as a library error (or, worse, special tokens split into bytes).
    """
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(
            f"tokenizer path {str(directory)!r} is not a directory; expected a directory "
            f"holding {VOCAB_FILE} and {MERGES_FILE}"
        )
    vocab_path, merges_path = directory / VOCAB_FILE, directory / MERGES_FILE
    for path in (vocab_path, merges_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer directory {str(directory)!r} has no {path.name}; expected "
                f"{VOCAB_FILE} and {MERGES_FILE} (as written by train_tokenizer)"
            )
    vocab = _read_vocab(vocab_path)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(
            f"{str(vocab_path)!r} lacks special tokens {missing}; expected all of "
            f"{list(SPECIAL_TOKENS)} in the vocabulary"
        )
    backend = ByteLevelBPETokenizer.from_file(str(vocab_path), str(merges_path))
    # Without registering them, "<mask>" etc. in text would be split into byte pieces.
    # <mask> absorbs the space before it, as in RoBERTa, so "a <mask>" is two tokens.
    backend.add_special_tokens(
        [AddedToken(t, lstrip=(t == "<mask>"), rstrip=False) for t in SPECIAL_TOKENS]
    )
    return Tokenizer(backend, directory)


def _read_vocab(path: Path) -> dict[str, int]:
    """Read and sanity-check a ``vocab.json`` mapping token strings to ids."""
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not a valid JSON vocabulary: {err}") from None
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()
    ):
        raise ValueError(f"{str(path)!r} must be a JSON object mapping tokens to integer ids")
    return vocab


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike[str],
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a byte-level BPE on ``texts``, write it to ``out_dir`` and return it reloaded.

    Special tokens get ids 0..4 in the order of :data:`SPECIAL_TOKENS`. Returning the reloaded
    tokenizer guarantees that training and later runs use exactly what is on disk.
    """
    minimum = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= minimum:
        raise ValueError(
            f"vocab_size must be an integer greater than {minimum} (256 byte symbols + "
            f"{len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be a positive integer, got {min_frequency!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of documents, not a single string")
    counter = _Counted(texts)
    backend = ByteLevelBPETokenizer()
    backend.train_from_iterator(
        counter,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    if counter.nonblank == 0:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend.save_model(str(out))
    return load_tokenizer(out)


class _Counted:
    """Iterable wrapper that counts non-blank texts, to reject an empty corpus."""

    def __init__(self, texts: Iterable[str]):
        self._texts = texts
        self.nonblank = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            if text.strip():
                self.nonblank += 1
            yield text


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m guided_jax.tokenizer",
        description="Train a RoBERTa-style byte-level BPE tokenizer (writes vocab.json and "
        "merges.txt).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--files", nargs="+", metavar="FILE", help="UTF-8 text files, one document per line"
    )
    source.add_argument(
        "--default-corpus",
        action="store_true",
        help="train on the embedded default corpus (Python standard library documentation)",
    )
    parser.add_argument("--vocab-size", type=int, required=True, help="vocabulary size")
    parser.add_argument("--out", required=True, help="output directory (created if needed)")
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="minimum pair count for a merge (default 2)"
    )
    args = parser.parse_args(argv)
    try:
        texts = data.default_corpus() if args.default_corpus else data.read_text_files(args.files)
        tokenizer = train_tokenizer(texts, args.vocab_size, args.out, args.min_frequency)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {VOCAB_FILE} and {MERGES_FILE} to {args.out} "
        f"(vocab size {tokenizer.vocab_size}, trained on {len(texts)} documents)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
