"""Tokenizers: byte-level BPE (RoBERTa) and WordPiece (BERT): training and loading.

The on-disk formats are the ones HuggingFace uses, so the reference implementation's
``ag_config/*`` directories load unchanged:

* byte-level BPE: ``vocab.json`` + ``merges.txt``, special tokens ``<s> <pad> </s> <unk> <mask>``;
* WordPiece: ``vocab.txt``, special tokens ``[CLS] [PAD] [SEP] [UNK] [MASK]``.

:func:`train_tokenizer` also writes ``tokenizer_config.json`` naming the tokenizer class (and,
for WordPiece, whether it lowercases), which records the kind beside the files.
:func:`load_tokenizer` finds the kind from the files (and that file, when present).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, BertWordPieceTokenizer, ByteLevelBPETokenizer

from guided_jax import storage

__all__ = [
    "KINDS",
    "SPECIAL_TOKENS",
    "WORDPIECE_SPECIAL_TOKENS",
    "Tokenizer",
    "detect_kind",
    "has_tokenizer_files",
    "load_tokenizer",
    "train_tokenizer",
]

KINDS = ("bpe", "wordpiece")
# In id order when trained: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4 (RoBERTa's ids).
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
# In id order when trained: [PAD]=0 (BERT's pad id), [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
WORDPIECE_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Which special token plays which role, per kind; blocks are ``bos … eos``.
ROLES: dict[str, dict[str, str]] = {
    "bpe": dict(bos="<s>", pad="<pad>", eos="</s>", unk="<unk>", mask="<mask>"),
    "wordpiece": dict(bos="[CLS]", pad="[PAD]", eos="[SEP]", unk="[UNK]", mask="[MASK]"),
}
# The order of Tokenizer.special_ids.
SPECIAL_ROLES = ("bos", "pad", "eos", "unk", "mask")
# data.mlm_targets -> the special roles MLM never selects. "reference": the reference's collator
# leaves out only <s>, </s> and padding, so an <unk> or <mask> in the text is masked and predicted.
MLM_TARGETS = {"no_specials": SPECIAL_ROLES, "reference": ("bos", "pad", "eos")}
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
WORDPIECE_VOCAB_FILE = "vocab.txt"
CONFIG_FILE = "tokenizer_config.json"
# tokenizer_config.json's ``tokenizer_class`` (HuggingFace's names) for each kind.
TOKENIZER_CLASSES = {"bpe": "RobertaTokenizer", "wordpiece": "BertTokenizer"}
_CLASS_KINDS = {
    "RobertaTokenizer": "bpe",
    "RobertaTokenizerFast": "bpe",
    "BertTokenizer": "wordpiece",
    "BertTokenizerFast": "wordpiece",
}
FILES_OF_KIND = {"bpe": (VOCAB_FILE, MERGES_FILE), "wordpiece": (WORDPIECE_VOCAB_FILE,)}
_EXPECTED_FILES = (
    f"{WORDPIECE_VOCAB_FILE} (WordPiece) or {VOCAB_FILE} + {MERGES_FILE} (byte-level BPE)"
)
_BYTE_ALPHABET_SIZE = 256  # byte-level BPE always starts from all 256 byte symbols

Backend = ByteLevelBPETokenizer | BertWordPieceTokenizer


def reference_pieces(text: str, specials: Sequence[str]) -> list[str]:
    """``text`` cut around the ``specials`` written in it, as the reference's tokenizer cuts it
    (transformers 2.x ``tokenize``/``split_on_token``): each stretch of text loses its trailing
    whitespace, so " <unk>" gives no space token before ``<unk>``; empty stretches are dropped
    (blank lines inside a stretch stay)."""
    if not text.strip():
        return []
    alternatives = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
    pieces = []
    for index, part in enumerate(re.split(f"({alternatives})", text)):
        part = part if index % 2 else part.rstrip()
        if part:
            pieces.append(part)
    return pieces


class Tokenizer:
    """A loaded tokenizer of either kind plus the ids of its special tokens.

    ``bos_id``/``eos_id`` are ``<s>``/``</s>`` (BPE) or ``[CLS]``/``[SEP]`` (WordPiece);
    ``special_ids`` lists bos, pad, eos, unk and mask ids in that order. ``encode_batch`` never
    adds special tokens: blocks get them when they are packed (see
    :mod:`guided_jax.data.packing`), exactly as in the reference.
    """

    def __init__(
        self,
        backend: Backend,
        directory: str | os.PathLike[str] | None,
        kind: str = "bpe",
        lowercase: bool = False,
    ):
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind must be one of {list(KINDS)}, got {kind!r}")
        self._backend = backend
        self.directory = Path(directory) if directory is not None else None
        self.kind = kind
        self.lowercase = lowercase
        roles = ROLES[kind]
        missing = [t for t in roles.values() if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(
                f"tokenizer{self._where()} lacks special tokens {missing}; "
                f"expected all of {list(roles.values())}"
            )
        ids = [int(backend.token_to_id(roles[r])) for r in SPECIAL_ROLES]
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

    def encode_reference_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text as the reference tokenizes a whole training file: special
        tokens written in the text are cut out first (:func:`reference_pieces`), the pieces
        between them encoded on their own."""
        specials = list(ROLES[self.kind].values())
        result = []
        for text in texts:
            pieces = reference_pieces(text, specials)
            words = [p for p in pieces if p not in specials]
            encoded = iter(self.encode_batch(words))
            ids: list[int] = []
            for piece in pieces:
                ids += [self.token_to_id(piece)] if piece in specials else next(encoded)
            result.append(ids)
        return result

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (no special tokens) and each token's ``(start, end)`` character
        span in it, to map words onto their subword tokens."""
        encoding = self._backend.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(span) for span in encoding.offsets]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are shown by default so masked inputs stay readable."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """Id of the vocabulary entry spelled exactly ``token``.

        Raises ValueError instead of returning the first piece when ``token`` is not a single
        entry: guiding attention towards part of a word would silently change the method.
        In byte-level BPE a leading space is part of the entry (``"Ġ."`` vs ``"."``); in
        WordPiece a piece inside a word starts with ``##``.
        """
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            pieces = self._backend.encode(token, add_special_tokens=False).tokens
            raise ValueError(
                f"token {token!r} is not a single entry of the vocabulary of tokenizer"
                f"{self._where()}; it would be split into {pieces}{self._hint(token)}"
            )
        return int(token_id)

    def _hint(self, token: str) -> str:
        """Another spelling of ``token`` that is an entry, for error messages."""
        if self.kind == "bpe":
            spellings = [("Ġ" + token, "the entry for it after a space")]
        else:
            spellings = [("##" + token, "the entry for it inside a word")]
            if self.lowercase:
                spellings.insert(0, (token.lower(), "this tokenizer lowercases; the entry"))
        for spelling, what in spellings:
            if spelling != token and self._backend.token_to_id(spelling) is not None:
                return f" ({what} is {spelling!r})"
        return ""

    def _where(self) -> str:
        """Location used in error messages."""
        return f" in {str(self.directory)!r}" if self.directory is not None else ""

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, directory={self.directory!r}, "
            f"vocab_size={self.vocab_size})"
        )


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def has_tokenizer_files(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a vocabulary file of either kind."""
    directory = storage.as_path(directory)
    return any((directory / name).is_file() for name in (WORDPIECE_VOCAB_FILE, VOCAB_FILE))


def _check_directory(directory: Path) -> None:
    if not directory.exists():
        raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(
            f"tokenizer path {str(directory)!r} is not a directory; expected a directory "
            f"holding {_EXPECTED_FILES}"
        )


def read_json_object(path: Path, error: type[ValueError] = ValueError) -> dict[str, Any]:
    """The JSON object in the file ``path`` (HuggingFace's config files); ``error`` names the
    file when it is not UTF-8 JSON or not an object."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise error(f"{str(path)!r} must hold a JSON object")
    return values


def _read_tokenizer_config(directory: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` if present (HuggingFace's; only a few keys matter here)."""
    path = directory / CONFIG_FILE
    return read_json_object(path) if path.is_file() else {}


def detect_kind(directory: str | os.PathLike[str]) -> str:
    """``"bpe"`` or ``"wordpiece"``: from ``tokenizer_config.json``'s ``tokenizer_class`` when
    it names one of them, otherwise from which files are there. Errors name the directory and
    the files it lacks."""
    directory = storage.as_path(directory)
    _check_directory(directory)
    declared = _CLASS_KINDS.get(str(_read_tokenizer_config(directory).get("tokenizer_class")))
    present = {
        kind: [name for name in names if (directory / name).is_file()]
        for kind, names in FILES_OF_KIND.items()
    }
    if declared is not None:
        kinds = [declared]
    else:
        kinds = [kind for kind, found in present.items() if found]
        if len(kinds) > 1:
            raise ValueError(
                f"tokenizer directory {str(directory)!r} holds the files of both a WordPiece "
                f"({WORDPIECE_VOCAB_FILE}) and a byte-level BPE ({VOCAB_FILE}, {MERGES_FILE}) "
                f"tokenizer; remove one, or name it in {CONFIG_FILE} "
                f'({{"tokenizer_class": "BertTokenizer"}} or "RobertaTokenizer")'
            )
        if not kinds:
            raise FileNotFoundError(
                f"tokenizer directory {str(directory)!r} has no tokenizer files; expected "
                f"{_EXPECTED_FILES}"
            )
    (kind,) = kinds
    missing = [name for name in FILES_OF_KIND[kind] if name not in present[kind]]
    if missing:
        raise FileNotFoundError(
            f"tokenizer directory {str(directory)!r} has no {', '.join(missing)}; expected "
            f"{' + '.join(FILES_OF_KIND[kind])} for its {kind} tokenizer (as written by "
            f"train_tokenizer)"
        )
    return kind


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
    """Load the tokenizer in ``directory`` (kind per :func:`detect_kind`); other files there
    are ignored.

    The files are checked first so that a wrong path or an incomplete vocabulary is reported
    clearly instead of as a library error (or, worse, special tokens split into pieces).
    A ``gs://`` directory is read from a local copy (the tokenizer's ``directory``).
    """
    directory = storage.local_copy(directory)
    kind = detect_kind(directory)
    if kind == "wordpiece":
        return _load_wordpiece(directory)
    vocab_path, merges_path = directory / VOCAB_FILE, directory / MERGES_FILE
    vocab = _read_vocab(vocab_path)
    _check_specials(vocab_path, vocab, SPECIAL_TOKENS)
    backend = ByteLevelBPETokenizer.from_file(str(vocab_path), str(merges_path))
    # Without registering them, "<mask>" etc. in text would be split into byte pieces.
    # <mask> absorbs the space before it, as in RoBERTa, so "a <mask>" is two tokens.
    backend.add_special_tokens(
        [AddedToken(t, lstrip=(t == "<mask>"), rstrip=False) for t in SPECIAL_TOKENS]
    )
    return Tokenizer(backend, directory, "bpe")


def _load_wordpiece(directory: Path) -> Tokenizer:
    """``vocab.txt`` with HuggingFace's BertTokenizer settings from ``tokenizer_config.json``
    (``do_lower_case`` defaults to true there, so a bare vocab.txt lowercases, as HF would)."""
    path = directory / WORDPIECE_VOCAB_FILE
    settings = _read_tokenizer_config(directory)
    lowercase = settings.get("do_lower_case", True)
    strip_accents = settings.get("strip_accents")
    if not isinstance(lowercase, bool) or not isinstance(strip_accents, bool | None):
        raise ValueError(
            f"{str(directory / CONFIG_FILE)!r}: do_lower_case must be true or false and "
            f"strip_accents true, false or null"
        )
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as err:
        raise ValueError(f"{str(path)!r} is not UTF-8 text: {err}") from None
    vocab = {line.rstrip("\r"): i for i, line in enumerate(lines) if line.rstrip("\r")}
    if not vocab:
        raise ValueError(f"{str(path)!r} is empty; expected one WordPiece token per line")
    _check_specials(path, vocab, WORDPIECE_SPECIAL_TOKENS)
    # The constructor registers [CLS], [SEP], [PAD], [UNK], [MASK] as special tokens.
    backend = BertWordPieceTokenizer.from_file(
        str(path), lowercase=lowercase, strip_accents=strip_accents
    )
    return Tokenizer(backend, directory, "wordpiece", lowercase=lowercase)


def _check_specials(path: Path, vocab: dict[str, int], specials: Sequence[str]) -> None:
    missing = [t for t in specials if t not in vocab]
    if missing:
        raise ValueError(
            f"{str(path)!r} lacks special tokens {missing}; expected all of "
            f"{list(specials)} in the vocabulary"
        )


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


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike[str],
    min_frequency: int = 2,
    kind: str = "bpe",
    lowercase: bool = False,
) -> Tokenizer:
    """Train a tokenizer of ``kind`` on ``texts``, write it to ``out_dir`` and return it
    reloaded.

    Special tokens get ids 0..4 in the order of :data:`SPECIAL_TOKENS` (BPE) or
    :data:`WORDPIECE_SPECIAL_TOKENS` (WordPiece). ``lowercase`` applies to WordPiece only (BPE
    is lossless). Returning the reloaded tokenizer guarantees that training and later runs use
    exactly what is on disk.
    """
    if kind not in KINDS:
        raise ValueError(f"tokenizer kind must be one of {list(KINDS)}, got {kind!r}")
    if kind == "bpe":
        minimum = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
        why = f"256 byte symbols + {len(SPECIAL_TOKENS)} special tokens"
    else:
        minimum = len(WORDPIECE_SPECIAL_TOKENS)
        why = f"{minimum} special tokens"
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= minimum:
        raise ValueError(
            f"vocab_size must be an integer greater than {minimum} ({why}), got {vocab_size!r}"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be a positive integer, got {min_frequency!r}")
    if lowercase and kind == "bpe":
        raise ValueError("lowercase applies to WordPiece only (byte-level BPE is lossless)")
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of documents, not a single string")
    counter = _Counted(texts)
    if kind == "bpe":
        backend: Backend = ByteLevelBPETokenizer()
        specials = list(SPECIAL_TOKENS)
    else:
        backend = BertWordPieceTokenizer(lowercase=lowercase)
        specials = list(WORDPIECE_SPECIAL_TOKENS)
    backend.train_from_iterator(
        counter,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        show_progress=False,
    )
    if counter.nonblank == 0:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    settings: dict[str, Any] = {"tokenizer_class": TOKENIZER_CLASSES[kind]}
    if kind == "wordpiece":
        settings["do_lower_case"] = lowercase
    if storage.is_remote(out_dir):  # written here, then copied with its settings file last
        with tempfile.TemporaryDirectory(prefix="guided_jax_tokenizer_") as local:
            _save(backend, settings, Path(local))
            storage.copy_tree(local, out_dir, last=CONFIG_FILE)
    else:
        _save(backend, settings, Path(out_dir))
    return load_tokenizer(out_dir)


def _save(backend: Backend, settings: dict[str, Any], out: Path) -> None:
    """The vocabulary files, then ``tokenizer_config.json``: a directory holding the latter
    is complete."""
    out.mkdir(parents=True, exist_ok=True)
    backend.save_model(str(out))
    (out / CONFIG_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


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
