"""data.format=reference_text: the blocks the reference's TextDataset makes of a training file.

CI compares with the committed fixture (tests/fixtures/reference_text, made by its script with
transformers' slow RobertaTokenizer); where transformers is installed, the same comparison is
also made live, on a text generated here with another seed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from guided_jax.config import ConfigError, check_config, load_config
from guided_jax.data.text import CorpusError
from guided_jax.data.tokenizer import reference_pieces
from guided_jax.train.inputs import prepare

FIXTURE = REPO / "tests" / "fixtures" / "reference_text"
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def _config(train_files: Path | str, block_size: int):
    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.data.update(
        format="reference_text",
        train_files=str(train_files),
        tokenizer_dir=str(FIXTURE),
        block_size=block_size,
    )
    config.model.max_position_embeddings = block_size + 2
    return config


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        # the space before a special token goes; the one after it stays
        (" a <unk> b", [" a", "<unk>", " b"]),
        # a text piece keeps its blank lines and leading space; the file's end is stripped
        ("x\n\n y \n\n", ["x\n\n y"]),
        ("<unk> <mask>\n", ["<unk>", "<mask>"]),
        ("a<s></s>b", ["a", "<s>", "</s>", "b"]),
        ("  \n ", []),
    ],
)
def test_text_is_cut_around_special_tokens_as_the_reference_cuts_it(text, pieces):
    assert reference_pieces(text, SPECIALS) == pieces


def test_blocks_equal_the_reference_tokenization_of_the_fixture(tmp_path):
    expected = json.loads((FIXTURE / "expected.json").read_text())
    config = _config(FIXTURE / "sample.txt", expected["block_size"])
    check_config(config)
    inputs = prepare(config, tmp_path / "run", write=False)
    np.testing.assert_array_equal(inputs.train_blocks, np.asarray(expected["blocks"]))
    assert len(inputs.eval_blocks) == 0  # every block is trained on: nothing held out


@pytest.mark.parametrize("newline", ["\r\n", "\r"], ids=["crlf", "cr"])
def test_files_are_read_with_universal_newlines_as_python_text_mode_reads_them(tmp_path, newline):
    """The reference opens the file in text mode: CRLF and a lone CR read as LF."""
    sample = (FIXTURE / "sample.txt").read_text(encoding="utf-8")
    assert "\r" not in sample and sample.count("\n") > 10
    converted = tmp_path / "converted.txt"
    converted.write_bytes(sample.replace("\n", newline).encode())
    with open(converted, encoding="utf-8") as handle:  # what the reference's TextDataset reads
        assert handle.read() == sample
    expected = json.loads((FIXTURE / "expected.json").read_text())
    inputs = prepare(_config(converted, expected["block_size"]), tmp_path / "run", write=False)
    np.testing.assert_array_equal(inputs.train_blocks, np.asarray(expected["blocks"]))


def test_eval_comes_from_eval_files_only(tmp_path):
    """Trained on another text, evaluated on the fixture's: the eval blocks are the fixture's
    (read from data.eval_files, not data.train_files), the train blocks are not."""
    expected = json.loads((FIXTURE / "expected.json").read_text())
    lines = (FIXTURE / "sample.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    other = tmp_path / "other.txt"
    other.write_text("".join(reversed(lines)), encoding="utf-8")
    config = _config(other, expected["block_size"])
    config.data.eval_files = str(FIXTURE / "sample.txt")
    inputs = prepare(config, tmp_path / "run", write=False)
    np.testing.assert_array_equal(inputs.eval_blocks, np.asarray(expected["blocks"]))
    assert len(inputs.train_blocks) > 0
    assert not np.array_equal(inputs.train_blocks, np.asarray(expected["blocks"]))


def test_reference_text_refuses_other_sources(tmp_path):
    config = _config("", 34)
    with pytest.raises(ConfigError, match=r"data\.format='reference_text'.*data\.train_files"):
        prepare(config, tmp_path / "run", write=False)
    config = _config("tfds:wikitext/wikitext-2-raw-v1:train", 34)
    with pytest.raises(CorpusError, match=r"data\.train_files.*reads text files whole"):
        prepare(config, tmp_path / "run", write=False)
    config = _config(FIXTURE / "sample.txt", 34)
    config.data.format = "lines"
    with pytest.raises(ConfigError, match=r"data\.format must be one of"):
        check_config(config)


def _fixture_script():
    path = FIXTURE / "make_reference_text_fixture.py"
    spec = importlib.util.spec_from_file_location("make_reference_text_fixture", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_blocks_equal_transformers_live_on_another_text(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed (live check)")
    script = _fixture_script()
    text_file = tmp_path / "other.txt"
    text_file.write_text(script.sample_text(seed=1), encoding="utf-8")
    expected = script.reference_blocks(text_file, FIXTURE, 30)
    inputs = prepare(_config(text_file, 30), tmp_path / "run", write=False)
    np.testing.assert_array_equal(inputs.train_blocks, np.asarray(expected))
