"""Tests for guided_jax.data.text, .default_corpus and .packing: reading corpora, the default
corpus, packing documents into blocks (also tokenized, through the token cache's builder), splits
and eval batches."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from guided_jax.data import sources, token_cache
from guided_jax.data.default_corpus import default_corpus
from guided_jax.data.packing import BlockPacker, eval_batches, split_blocks
from guided_jax.data.text import CorpusError, read_text_files
from guided_jax.data.tokenizer import train_tokenizer

BOS, EOS = 0, 2

# ---------------------------------------------------------------------------------------------
# read_text_files
# ---------------------------------------------------------------------------------------------


def test_read_text_files_lines_in_order(tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_bytes("\ufefffirst line\r\n\n   \nsecond  line \n".encode())
    b.write_text("third: café ✓\n\nfourth\fwith form feed", encoding="utf-8")
    assert read_text_files([a, str(b)]) == [
        "first line",
        "second  line ",
        "third: café ✓",
        "fourth\fwith form feed",
    ]
    assert read_text_files([b, a])[0] == "third: café ✓"


def test_read_text_files_paragraph_documents(tmp_path: Path) -> None:
    path = tmp_path / "paragraphs.txt"
    path.write_text("first line\nsame document\n\n \nsecond document\n\n\nthird\n")
    assert read_text_files([path], documents="paragraph") == [
        "first line\nsame document",
        "second document",
        "third",
    ]
    assert read_text_files([path]) == ["first line", "same document", "second document", "third"]
    with pytest.raises(ValueError, match="documents must be one of"):
        read_text_files([path], documents="page")


def test_read_text_files_no_paths() -> None:
    with pytest.raises(CorpusError, match="no corpus files"):
        read_text_files([])


def test_read_text_files_missing(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("text\n", encoding="utf-8")
    missing = tmp_path / "missing.txt"
    with pytest.raises(ValueError, match="does not exist") as err:
        read_text_files([good, missing])
    assert str(missing) in str(err.value)


def test_read_text_files_directory(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="is a directory") as err:
        read_text_files([tmp_path])
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"\n\n", b"  \t\n \r\n"])
def test_read_text_files_empty(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match="empty or only whitespace") as err:
        read_text_files([path])
    assert str(path) in str(err.value)


def test_read_text_files_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"fine\nna\xefve\n")
    with pytest.raises(CorpusError, match="not valid UTF-8") as err:
        read_text_files([path])
    message = str(err.value)
    assert str(path) in message
    assert "byte offset 7" in message and "line 2" in message and "0xef" in message


def test_read_text_files_binary(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(CorpusError, match="binary") as err:
        read_text_files([path])
    assert str(path) in str(err.value) and "offset 3" in str(err.value)


def test_text_files_and_the_default_corpus_as_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.txt"
    path.write_text("one\ntwo\n", encoding="utf-8")
    assert list(sources.TextFiles((str(path),)).documents()) == ["one", "two"]
    monkeypatch.setattr(sources, "default_corpus", lambda: ["from the default corpus"])
    assert list(sources.DefaultCorpus().documents()) == ["from the default corpus"]


# ---------------------------------------------------------------------------------------------
# default_corpus
# ---------------------------------------------------------------------------------------------


def _write(path: Path, source: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source), encoding="utf-8")


def _fake_stdlib(root: Path) -> None:
    # Written in reverse order so the directory listing is unlikely to be sorted already.
    _write(root / "zeta.py", '"""Zeta module is the last file in sorted order."""\n')
    _write(
        root / "pkg" / "inner.py",
        '''
        """Inner module docstring, first paragraph
        continues on a second line.

            Second paragraph, indented, kept as well.

        Tiny.
        """

        class Widget:
            """Widget class docstring with enough words."""

            def method(self):
                """Method docstring has several words."""

                def nested():
                    """Nested function docstring counts too."""

        if True:
            try:
                pass
            except Exception:
                def handler():
                    """Defined inside an except clause body."""
        match 1:
            case 1:
                def in_case():
                    """Defined inside a match case body."""

        async def coroutine():
            """Inner module docstring, first paragraph continues on a second line."""
        ''',
    )
    _write(
        root / "alpha.py", '"""Alpha module docstring with words."""\nx = "not a docstring here"\n'
    )
    _write(root / "broken.py", '"""Broken file is skipped entirely."""\ndef (:\n')
    for skipped in ("test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"):
        _write(root / skipped / "mod.py", f'"""Skipped {skipped} docstring text."""\n')
    _write(root / "test_thing.py", '"""A test module docstring, skipped."""\n')
    _write(
        root / "pydoc_data" / "topics.py",
        '"""Autogenerated by the documentation build."""\n'
        "topics = {'zz': 'Zed topic text comes last.\\n\\nToo short.', "
        "'aa': 'Alpha topic text comes first.\\nSame paragraph.'}\n",
    )


def test_default_corpus_from_sources(tmp_path: Path) -> None:
    _fake_stdlib(tmp_path)
    expected = [
        "Alpha module docstring with words.",
        "Inner module docstring, first paragraph continues on a second line.",
        "Second paragraph, indented, kept as well.",
        "Widget class docstring with enough words.",
        "Method docstring has several words.",
        "Nested function docstring counts too.",
        "Defined inside an except clause body.",
        "Defined inside a match case body.",
        # coroutine's docstring repeats the first paragraph above: kept once.
        "Autogenerated by the documentation build.",  # pydoc_data/topics.py's own docstring
        "Zeta module is the last file in sorted order.",
        "Alpha topic text comes first. Same paragraph.",
        "Zed topic text comes last.",
    ]
    assert default_corpus(tmp_path) == expected


def test_default_corpus_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        default_corpus(tmp_path / "nowhere")
    with pytest.raises(CorpusError, match="no docstrings"):
        default_corpus(tmp_path)


def test_default_corpus_real_stdlib() -> None:
    corpus = default_corpus()
    assert len(corpus) > 5000
    assert sum(len(doc) for doc in corpus) > 1_000_000
    assert all("\n" not in doc and len(doc.split()) >= 4 for doc in corpus)
    assert len(set(corpus)) == len(corpus)


# ---------------------------------------------------------------------------------------------
# BlockPacker / token_cache.build
# ---------------------------------------------------------------------------------------------


def test_block_packer_exact() -> None:
    docs = [[10, 11, 12], [13, 14], np.array([15, 16, 17, 18]), [19]]
    packer = BlockPacker(block_size=5, bos_id=BOS, eos_id=EOS)
    blocks, starts = packer.add(docs)
    assert blocks.dtype == np.int32 and starts is None
    np.testing.assert_array_equal(
        blocks,
        [
            [BOS, 10, 11, 12, EOS],
            [BOS, 13, 14, 15, EOS],
            [BOS, 16, 17, 18, EOS],
        ],  # 19 is the remainder, carried over
    )
    assert (packer.tokens, packer.blocks) == (10, 3)
    # The carried remainder opens the next call's first block; exactly one block's worth of
    # tokens gives one block.
    np.testing.assert_array_equal(packer.add([[20], [21]])[0], [[BOS, 19, 20, 21, EOS]])
    one, _ = BlockPacker(block_size=5, bos_id=5, eos_id=6).add([[7], [8, 9]])
    np.testing.assert_array_equal(one, [[5, 7, 8, 9, 6]])


def test_block_packer_records_where_documents_start() -> None:
    packer = BlockPacker(block_size=5, bos_id=BOS, eos_id=EOS, starts=True)
    blocks, starts = packer.add([[10, 11], [], [12, 13, 14, 15], [16]])
    np.testing.assert_array_equal(blocks, [[BOS, 10, 11, 12, EOS], [BOS, 13, 14, 15, EOS]])
    assert starts.dtype == np.uint8
    # 1 at each document's first token, 0 in the bos and eos columns; the empty one starts
    # nowhere; the flags of the carried token 16 come with the next call's block.
    np.testing.assert_array_equal(starts, [[0, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
    blocks, starts = packer.add([[17, 18]])
    np.testing.assert_array_equal(blocks, [[BOS, 16, 17, 18, EOS]])
    np.testing.assert_array_equal(starts, [[0, 1, 1, 0, 0]])


def test_block_packer_errors() -> None:
    packer = BlockPacker(block_size=8, bos_id=BOS, eos_id=EOS)
    packer.add([[1, 2], [3, 4, 5]])
    with pytest.raises(CorpusError, match=r"only 5 tokens.*block_size 8"):
        packer.check_not_empty()
    empty = BlockPacker(block_size=8, bos_id=BOS, eos_id=EOS)
    empty.add([])
    with pytest.raises(CorpusError, match="only 0 tokens"):
        empty.check_not_empty()
    with pytest.raises(ValueError, match="at least 3"):
        BlockPacker(block_size=2, bos_id=BOS, eos_id=EOS)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        BlockPacker(block_size=True, bos_id=BOS, eos_id=EOS)


class _CharTokenizer:
    """Stand-in tokenizer: one id per character, so packed content is easy to predict."""

    bos_id, eos_id = 1, 2

    def __init__(self) -> None:
        self.calls = 0

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        self.calls += 1
        return [[ord(c) for c in text] for text in texts]


def _build(texts, tokenizer, block_size: int, out: Path, **kwargs) -> np.ndarray:
    return np.asarray(token_cache.build(texts, tokenizer, block_size, out, {}, **kwargs))


def test_tokenized_packing_keeps_order_across_chunks(tmp_path: Path) -> None:
    texts = [chr(ord("a") + i % 26) for i in range(5000)]  # spans two encoding chunks
    tok = _CharTokenizer()
    blocks = _build(texts, tok, 12, tmp_path / "entry", separator="")
    assert tok.calls == 2
    assert blocks.shape == (500, 12)
    assert (blocks[:, 0] == 1).all() and (blocks[:, -1] == 2).all()
    np.testing.assert_array_equal(blocks[:, 1:-1].reshape(-1), [ord(t) for t in texts])


def test_tokenized_packing_separates_documents_with_newline(tmp_path: Path) -> None:
    blocks = _build(["ab", "c", "de"], _CharTokenizer(), 5, tmp_path / "entry")
    # Stream "ab\nc\nde\n" (8 tokens) -> two chunks of 3; the last two tokens are dropped.
    np.testing.assert_array_equal(blocks, [[1, *map(ord, "ab\n"), 2], [1, *map(ord, "c\nd"), 2]])


def test_tokenized_packing_with_real_tokenizer(tmp_path: Path) -> None:
    texts = [f"document number {i} talks about attention heads." for i in range(200)]
    tok = train_tokenizer(texts, vocab_size=300, out_dir=tmp_path / "tok")
    blocks = _build(texts, tok, 32, tmp_path / "entry")
    assert blocks.shape[1] == 32 and len(blocks) > 10
    assert (blocks[:, 0] == tok.bos_id).all() and (blocks[:, -1] == tok.eos_id).all()
    assert not np.isin(blocks[:, 1:-1], [tok.pad_id, tok.mask_id, tok.bos_id]).any()
    text = tok.decode(blocks[:, 1:-1].reshape(-1).tolist())
    assert text.startswith("document number 0 talks about attention heads.\ndocument number 1")


# ---------------------------------------------------------------------------------------------
# split_blocks
# ---------------------------------------------------------------------------------------------


def _numbered(n: int, length: int = 4) -> np.ndarray:
    """Blocks whose every entry is the block's index, so rows are identifiable."""
    return np.repeat(np.arange(n, dtype=np.int32)[:, None], length, axis=1)


def test_split_blocks_tail_is_eval() -> None:
    train, held = split_blocks(_numbered(10), 0.3)
    assert train[:, 0].tolist() == list(range(7)) and held[:, 0].tolist() == [7, 8, 9]
    train, held = split_blocks(_numbered(10), 0.25)  # ceil(2.5) = 3
    assert len(train) == 7 and len(held) == 3
    train, held = split_blocks(_numbered(10), 0.01)  # any positive fraction holds out a block
    assert held[:, 0].tolist() == [9]
    train, held = split_blocks(_numbered(10), 0.0)
    assert len(train) == 10 and held.shape == (0, 4)


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5, float("nan")])
def test_split_blocks_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="eval_fraction"):
        split_blocks(_numbered(10), fraction)


def test_split_blocks_no_training_left() -> None:
    with pytest.raises(ValueError, match="no training block"):
        split_blocks(_numbered(10), 0.95)
    with pytest.raises(ValueError, match="no training block"):
        split_blocks(_numbered(1), 0.5)


# ---------------------------------------------------------------------------------------------
# eval_batches
# ---------------------------------------------------------------------------------------------


def test_eval_batches_in_order_full_batches() -> None:
    batches = eval_batches(_numbered(10), batch_size=4, max_batches=None)
    assert [b[:, 0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    batches = eval_batches(_numbered(10), batch_size=4, max_batches=1)
    assert [b[:, 0].tolist() for b in batches] == [[0, 1, 2, 3]]
    batches = eval_batches(_numbered(10), batch_size=5, max_batches=10)
    assert [b[:, 0].tolist() for b in batches] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_eval_batches_small_and_empty() -> None:
    (only,) = eval_batches(_numbered(3), batch_size=4, max_batches=5)
    assert only[:, 0].tolist() == [0, 1, 2]
    assert eval_batches(_numbered(0), batch_size=4, max_batches=5) == []
    assert eval_batches(_numbered(10), batch_size=4, max_batches=0) == []
    with pytest.raises(ValueError, match="max_batches"):
        eval_batches(_numbered(10), batch_size=4, max_batches=-1)
