"""The reflexive-anaphora generator and the coreference probe on tiny checkpoints."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from guided_jax import weights
from guided_jax.analysis import anaphora, probe
from guided_jax.data.tokenizer import train_tokenizer
from guided_jax.weights.hf import export


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


def test_probe_counts_the_top_attention_of_each_head(tiny_run) -> None:
    loaded = weights.load(tiny_run)
    examples = anaphora.generate(12, seed=1)
    result = probe.probe(loaded.model, loaded.tokenizer, examples, batch_size=5, name="ag")
    assert result.accuracy.shape == (2, 4) and result.sentences == 12
    # The same count from each sentence's own, unpadded maps.
    graphdef, state = nnx.split(loaded.model)

    @jax.jit
    def maps_of(state, ids):  # [L, H, n, n] of one sentence
        _, aux = nnx.merge(graphdef, state)(ids[None], return_attentions=True)
        return jnp.stack(aux["attentions"])[:, 0]

    want = np.zeros((2, 4))
    for example in examples:
        encoded = probe.encode(loaded.tokenizer, example)
        maps = np.asarray(maps_of(state, jnp.asarray(encoded.ids, jnp.int32)))
        top = maps[:, :, encoded.reflexive].argmax(-1)
        want += np.isin(top, encoded.antecedents)
    np.testing.assert_allclose(result.accuracy, want / len(examples))
    np.testing.assert_allclose(result.layer_max, result.accuracy.max(1))
    table = probe.format_table(result)
    assert "h3" in table and "best head: layer" in table and "12 sentences" in table


def test_run_prints_per_head_tables_and_comparison_and_writes_json(tiny_run, tmp_path) -> None:
    loaded = weights.load(tiny_run)
    other = export(
        loaded.model, loaded.tokenizer, tmp_path / "exported"
    )  # no step: named "exported"
    out = tmp_path / "probe.json"
    first, second, report = probe.run(str(tiny_run), compare=str(other), count=16, json_path=out)
    lines = report.splitlines()
    assert lines[0].startswith("run@6: reflexive -> antecedent")
    assert any(line.startswith("exported: reflexive") for line in lines)
    header = next(line for line in lines if line.split()[:2] == ["layer", "h0"])
    assert header.split() == ["layer", "h0", "h1", "h2", "h3", "max", "mean"]
    assert "comparison (%): A = run@6, B = exported" in report
    assert lines[-1].split()[0] == "all"
    # The same weights give the same accuracies, so the differences are zero.
    np.testing.assert_array_equal(first.accuracy, second.accuracy)
    assert lines[-1].split()[3] == lines[-1].split()[6] == "0.0"
    saved = json.loads(out.read_text())
    assert saved["probe"] == first.to_json() and saved["compare"] == second.to_json()
    assert saved["probe"]["sentences"] == 16 and len(saved["compare"]["accuracy"]) == 2
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        probe.run(str(tmp_path / "none"))
