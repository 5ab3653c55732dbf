"""Tests for guided_jax.data.tokenizer (byte-level BPE and WordPiece): training, save/load round
trip, lookups, kind detection and errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from guided_jax.data.tokenizer import (
    SPECIAL_TOKENS,
    WORDPIECE_SPECIAL_TOKENS,
    Tokenizer,
    detect_kind,
    load_tokenizer,
    train_tokenizer,
)

_FUNCTION_WORDS = ("the", "a", "of", "to", "and", "in", "is", "was", "for", "on", "with", "as")
_CONTENT_WORDS = ("model", "attention", "head", "token", "layer", "mask", "guide", "pattern")
_WORDS = _FUNCTION_WORDS + _CONTENT_WORDS + ("sentence", "period", "word", "by", "at", "from")


def _corpus(n: int = 300) -> list[str]:
    """A small deterministic corpus with enough repetition for a few hundred merges."""
    texts = []
    for i in range(n):
        words = [_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(6 + i % 5)]
        texts.append(" ".join(words).capitalize() + ".")
    return texts


SAMPLE_TEXTS = [
    "The model has an attention head.",
    "A word, then another word; and the period.",
    "Unicode too: café — naïve ünïcödé ✓",
    "  leading and trailing spaces  ",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Path]:
    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(_corpus(), vocab_size=400, out_dir=out), out


def test_train_writes_files_and_specials_first(trained: tuple[Tokenizer, Path]) -> None:
    tok, out = trained
    assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
    assert tok.directory == out
    assert tok.special_ids == (0, 1, 2, 3, 4)
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    # 256 byte symbols + 5 specials + learned merges, never above the requested size.
    assert 261 < tok.vocab_size <= 400
    assert tok.vocab_size == len(vocab)


def test_round_trip_save_load_same_ids(trained: tuple[Tokenizer, Path]) -> None:
    tok, out = trained
    reloaded = load_tokenizer(out)
    ids = tok.encode_batch(SAMPLE_TEXTS)
    assert reloaded.encode_batch(SAMPLE_TEXTS) == ids
    assert reloaded.vocab_size == tok.vocab_size
    assert reloaded.special_ids == tok.special_ids
    # Byte-level BPE is lossless, and encode_batch adds no special tokens.
    for text, seq in zip(SAMPLE_TEXTS, ids, strict=True):
        assert reloaded.decode(seq) == text
        assert not set(seq) & set(tok.special_ids)
    # Learned merges are used: common words are fewer tokens than bytes.
    assert len(ids[0]) < len(SAMPLE_TEXTS[0].encode())


def test_special_tokens_in_text_are_single_tokens(trained: tuple[Tokenizer, Path]) -> None:
    tok, _ = trained
    (ids,) = tok.encode_batch(["the <mask> head.<s>x</s>"])
    assert ids.count(tok.mask_id) == 1
    assert ids.count(tok.bos_id) == 1 and ids.count(tok.eos_id) == 1
    # "<mask>" must not also show up as byte pieces such as "<" or "mask".
    assert tok.token_to_id("<") not in ids
    plain = tok.encode_batch(["the"])[0]
    assert ids[: len(plain)] == plain


def test_token_to_id_exact_entries(trained: tuple[Tokenizer, Path]) -> None:
    tok, out = trained
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert tok.token_to_id("</s>") == 2
    assert tok.token_to_id("<s>") == 0
    assert tok.token_to_id("<mask>") == tok.mask_id
    assert tok.token_to_id(".") == vocab["."]
    # A learned multi-byte entry: the space-prefixed word as the model sees it mid-sentence.
    assert "Ġattention" in vocab
    assert tok.token_to_id("Ġattention") == vocab["Ġattention"]
    # And that id is what encoding the word after a space gives.
    assert tok.encode_batch(["a attention"])[0][-1] == vocab["Ġattention"]


def test_token_to_id_rejects_non_entries(trained: tuple[Tokenizer, Path]) -> None:
    tok, out = trained
    # Would be split into several pieces: must be an error, not the first piece.
    assert len(tok.encode_batch(["zebra"])[0]) > 1
    with pytest.raises(ValueError, match="'zebra'") as err:
        tok.token_to_id("zebra")
    assert str(out) in str(err.value)
    # Only the space-prefixed spelling is an entry; the message points to it.
    assert "attention" not in json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="Ġattention"):
        tok.token_to_id("attention")
    with pytest.raises(ValueError, match="'<cls>'"):
        tok.token_to_id("<cls>")


def test_train_validates_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="greater than 261"):
        train_tokenizer(_corpus(), vocab_size=261, out_dir=tmp_path)
    with pytest.raises(ValueError, match="min_frequency"):
        train_tokenizer(_corpus(), vocab_size=300, out_dir=tmp_path, min_frequency=0)
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer(["", "  "], vocab_size=300, out_dir=tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_load_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        load_tokenizer(missing)
    assert str(missing) in str(err.value)


def test_load_path_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "vocab.json"
    path.write_text("{}", encoding="utf-8")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        load_tokenizer(path)


@pytest.mark.parametrize("missing", ["merges.txt", "vocab.json"])
def test_load_missing_file(trained: tuple[Tokenizer, Path], tmp_path: Path, missing: str) -> None:
    _, out = trained
    for name in ("vocab.json", "merges.txt"):
        if name != missing:
            shutil.copy(out / name, tmp_path / name)
    with pytest.raises(FileNotFoundError, match=missing) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_load_ignores_extra_files(trained: tuple[Tokenizer, Path], tmp_path: Path) -> None:
    tok, out = trained
    shutil.copytree(out, tmp_path / "ag_config")
    (tmp_path / "ag_config" / "config.json").write_text('{"model_type": "roberta"}')
    (tmp_path / "ag_config" / "tokenizer_config.json").write_text('{"max_len": 128}')
    loaded = load_tokenizer(tmp_path / "ag_config")
    assert loaded.encode_batch(SAMPLE_TEXTS) == tok.encode_batch(SAMPLE_TEXTS)


def test_load_vocab_without_specials(trained: tuple[Tokenizer, Path], tmp_path: Path) -> None:
    _, out = trained
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    del vocab["<mask>"], vocab["<pad>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copy(out / "merges.txt", tmp_path / "merges.txt")
    with pytest.raises(ValueError, match="lacks special tokens") as err:
        load_tokenizer(tmp_path)
    message = str(err.value)
    assert "'<pad>'" in message and "'<mask>'" in message
    assert "'</s>'" in message  # the expected list is spelled out
    assert str(tmp_path / "vocab.json") in message


def test_load_invalid_vocab_json(trained: tuple[Tokenizer, Path], tmp_path: Path) -> None:
    _, out = trained
    shutil.copy(out / "merges.txt", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text('["<s>"]', encoding="utf-8")
    with pytest.raises(ValueError, match="mapping tokens to integer ids"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------- kinds on disk


def test_bpe_records_its_kind(trained: tuple[Tokenizer, Path]) -> None:
    tok, out = trained
    assert tok.kind == "bpe" and detect_kind(out) == "bpe"
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config == {"tokenizer_class": "RobertaTokenizer"}


# ----------------------------------------------------------------------------- WordPiece


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, Path]:
    out = tmp_path_factory.mktemp("wordpiece")
    return train_tokenizer(_corpus(), vocab_size=200, out_dir=out, kind="wordpiece"), out


def test_wordpiece_train_writes_vocab_txt_and_bert_special_ids(
    wordpiece: tuple[Tokenizer, Path],
) -> None:
    tok, out = wordpiece
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer_config.json", "vocab.txt"]
    lines = (out / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert lines[:5] == list(WORDPIECE_SPECIAL_TOKENS)  # [PAD] = 0, as in BERT
    assert tok.kind == "wordpiece" and tok.vocab_size == len(lines) <= 200
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.special_ids == (2, 0, 3, 1, 4)  # bos, pad, eos, unk, mask
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config == {"tokenizer_class": "BertTokenizer", "do_lower_case": False}
    assert any(line.startswith("##") for line in lines)  # pieces inside words


def test_wordpiece_round_trip_and_special_tokens(wordpiece: tuple[Tokenizer, Path]) -> None:
    tok, out = wordpiece
    reloaded = load_tokenizer(out)
    assert reloaded.kind == "wordpiece" and not reloaded.lowercase
    texts = ["The model has an attention head.", "A word, then another word; and the period."]
    ids = tok.encode_batch(texts)
    assert reloaded.encode_batch(texts) == ids
    assert not set(ids[0]) & set(tok.special_ids)  # no [CLS]/[SEP] added
    assert reloaded.decode(ids[0]) == texts[0]  # cased, and every piece was seen in training
    (marked,) = tok.encode_batch(["the [MASK] head. [SEP] x"])
    assert marked.count(tok.mask_id) == 1 and marked.count(tok.eos_id) == 1
    assert "[MASK]" in tok.decode(marked)
    assert tok.encode_batch(["zebra"])[0] == [tok.unk_id]  # no 'z' in the corpus


def test_wordpiece_guidance_tokens_are_entries(wordpiece: tuple[Tokenizer, Path]) -> None:
    tok, _ = wordpiece
    assert tok.token_to_id("[SEP]") == tok.eos_id and tok.token_to_id("[CLS]") == tok.bos_id
    assert tok.encode_batch(["head."])[0][-1] == tok.token_to_id(".")
    with pytest.raises(ValueError, match=r"'\[sep\]' is not a single entry"):
        tok.token_to_id("[sep]")
    # a piece that only occurs inside words: the message names its ## spelling
    lines = _vocab_lines(tok)
    inner = next(t for t in lines if t.startswith("##") and t[2:] not in lines)
    with pytest.raises(ValueError, match=re.escape(f"is {inner!r}")):
        tok.token_to_id(inner[2:])


def _vocab_lines(tok: Tokenizer) -> list[str]:
    assert tok.directory is not None
    return (tok.directory / "vocab.txt").read_text(encoding="utf-8").splitlines()


def test_wordpiece_lowercasing_follows_tokenizer_config(
    wordpiece: tuple[Tokenizer, Path], tmp_path: Path
) -> None:
    _, out = wordpiece
    shutil.copy(out / "vocab.txt", tmp_path / "vocab.txt")  # a bare vocab.txt, as HF's BERTs
    bare = load_tokenizer(tmp_path)
    assert bare.lowercase  # BertTokenizer's default do_lower_case
    assert bare.encode_batch(["THE"]) == bare.encode_batch(["the"])
    with pytest.raises(ValueError, match="lowercases; the entry is 'the'"):
        bare.token_to_id("THE")
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": "yes"}')
    with pytest.raises(ValueError, match="do_lower_case must be true or false"):
        load_tokenizer(tmp_path)


def test_wordpiece_lowercase_training(tmp_path: Path) -> None:
    tok = train_tokenizer(_corpus(100), 150, tmp_path, kind="wordpiece", lowercase=True)
    assert tok.lowercase and load_tokenizer(tmp_path).lowercase
    assert "The" not in _vocab_lines(tok) and "the" in _vocab_lines(tok)


def test_wordpiece_vocab_without_specials(
    wordpiece: tuple[Tokenizer, Path], tmp_path: Path
) -> None:
    _, out = wordpiece
    lines = (out / "vocab.txt").read_text(encoding="utf-8").splitlines()
    kept = [t for t in lines if t not in ("[MASK]", "[CLS]")]
    (tmp_path / "vocab.txt").write_text("\n".join(kept) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"lacks special tokens \['\[CLS\]', '\[MASK\]'\]") as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "vocab.txt") in str(err.value)


def test_train_validates_kind_and_wordpiece_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        train_tokenizer(_corpus(), 300, tmp_path, kind="unigram")
    with pytest.raises(ValueError, match="greater than 5"):
        train_tokenizer(_corpus(), 5, tmp_path, kind="wordpiece")
    with pytest.raises(ValueError, match="WordPiece only"):
        train_tokenizer(_corpus(), 300, tmp_path, lowercase=True)
    assert not list(tmp_path.iterdir())


def test_detect_kind_errors(
    trained: tuple[Tokenizer, Path], wordpiece: tuple[Tokenizer, Path], tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("not a tokenizer")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer files; expected vocab\.txt") as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)
    # both kinds' files: ambiguous unless tokenizer_config.json names the class
    for out in (trained[1], wordpiece[1]):
        for path in out.iterdir():
            if path.name != "tokenizer_config.json":
                shutil.copy(path, tmp_path / path.name)
    with pytest.raises(ValueError, match="both a WordPiece"):
        detect_kind(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizerFast"}')
    assert load_tokenizer(tmp_path).kind == "wordpiece"
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "RobertaTokenizer"}')
    assert load_tokenizer(tmp_path).encode_batch(SAMPLE_TEXTS) == trained[0].encode_batch(
        SAMPLE_TEXTS
    )
    # a declared class needs its own files
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no merges\.txt; expected vocab\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json' is not valid JSON"):
        load_tokenizer(tmp_path)
