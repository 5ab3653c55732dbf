"""The reflexive-anaphora generator and the coreference probe on tiny checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, cli_env, write_corpus
from guided_jax import anaphora, pretrained, probe, train, visualize
from guided_jax.config import load_config
from guided_jax.tokenizer import train_tokenizer


def test_generated_sentences_are_consistent_and_reproducible() -> None:
    examples = anaphora.generate(40, seed=3)
    assert [e.text for e in examples] == [e.text for e in anaphora.generate(40, seed=3)]
    assert len({e.text for e in examples}) > 30  # varied
    for example in examples:
        for word, (start, end) in zip(example.words, example.spans, strict=True):
            assert example.text[start:end] == word
        assert example.text.endswith(" " + example.words[example.reflexive] + ".")
        (noun,) = [example.words[i] for i in example.antecedents]
        gender = "male" if noun in anaphora.NOUNS["male"] else "female"
        assert example.words[example.reflexive] == anaphora.REFLEXIVES[gender]
        if example.distractor is not None:
            assert example.words[example.distractor] not in anaphora.NOUNS[gender]
            assert example.antecedents[0] < example.distractor < example.reflexive
    assert sum(e.distractor is not None for e in examples) == 20
    linkers = {e.words[2] for e in examples if e.distractor is not None}
    assert "who" in linkers and linkers & set(anaphora.PREPOSITIONS)
    assert all(e.distractor is None for e in anaphora.generate(5, variant="simple"))
    assert all(e.distractor is not None for e in anaphora.generate(5, variant="distractor"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"variant": "odd"}, "variant must be one of"), ({"count": 0}, "positive")],
)
def test_generator_errors(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        anaphora.generate(kwargs.pop("count", 3), **kwargs)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_words_map_to_their_subword_tokens(tmp_path, kind) -> None:
    # A vocabulary from text without the probe's words: they split into several tokens.
    letters = "abcdefghijklmnopqrstuvwxyz"
    texts = ["a cat sat on the mat and her dog ran to himself", letters, letters.upper()] * 20
    tokenizer = train_tokenizer(texts, 300, tmp_path / kind, kind=kind)
    example = anaphora.make_example(np.random.default_rng(0), distractor=True)
    encoded = probe.encode(tokenizer, example)
    assert encoded.ids[0] == tokenizer.bos_id and encoded.ids[-1] == tokenizer.eos_id
    tokens = [tokenizer.decode([i]).replace("Ġ", " ").replace("##", "") for i in encoded.ids]
    noun = example.words[example.antecedents[0]]
    assert "".join(tokens[i] for i in encoded.antecedents).strip().lower() == noun
    assert len(encoded.antecedents) > 1  # split into subwords here
    reflexive = example.words[example.reflexive]
    assert reflexive.startswith(tokens[encoded.reflexive].strip().lower())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A guided and a baseline tiny run on the same corpus (4 steps each)."""
    root = tmp_path_factory.mktemp("probe")
    corpus = write_corpus(root / "corpus.txt")
    runs = []
    for name, guided in (("ag", True), ("baseline", False)):
        config = load_config(str(REPO / "configs" / "tiny.py"))
        config.data.train_files = str(corpus)
        config.train.steps = 4
        config.guidance.enabled = guided
        train.train_and_evaluate(config, root / name, devices=jax.devices()[:1])
        runs.append(root / name)
    return runs


def test_probe_counts_the_top_attention_of_each_head(two_runs) -> None:
    loaded = pretrained.load(two_runs[0])
    examples = anaphora.generate(12, seed=1)
    result = probe.probe(loaded.model, loaded.tokenizer, examples, batch_size=5, name="ag")
    assert result.accuracy.shape == (2, 4) and result.sentences == 12
    # The same count from each sentence's own, unpadded maps.
    want = np.zeros((2, 4))
    for example in examples:
        encoded = probe.encode(loaded.tokenizer, example)
        maps = visualize.attention_maps(loaded.model, list(encoded.ids))  # [L, H, n, n]
        top = maps[:, :, encoded.reflexive].argmax(-1)
        want += np.isin(top, encoded.antecedents)
    np.testing.assert_allclose(result.accuracy, want / len(examples))
    np.testing.assert_allclose(result.layer_max, result.accuracy.max(1))
    table = probe.format_table(result)
    assert "h3" in table and "best head: layer" in table and "12 sentences" in table


def test_cli_prints_per_head_tables_and_comparison(two_runs, tmp_path) -> None:
    out = tmp_path / "probe.json"
    command = [
        sys.executable, "-m", "guided_jax.probe", f"--workdir={two_runs[0]}",
        f"--compare={two_runs[1]}", "--count=16", f"--json={out}",
    ]  # fmt: skip
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ag@4: reflexive -> antecedent")
    assert any(line.startswith("baseline@4: reflexive") for line in lines)
    header = next(line for line in lines if line.split()[:2] == ["layer", "h0"])
    assert header.split() == ["layer", "h0", "h1", "h2", "h3", "max", "mean"]
    assert "comparison (%): A = ag@4, B = baseline@4" in result.stdout
    assert lines[-1].split()[0] == "all"
    saved = json.loads(out.read_text())
    assert saved["probe"]["sentences"] == 16 and len(saved["compare"]["accuracy"]) == 2
    missing = subprocess.run(
        [sys.executable, "-m", "guided_jax.probe", f"--workdir={tmp_path / 'none'}"],
        env=cli_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode != 0 and "is not a directory" in missing.stderr
