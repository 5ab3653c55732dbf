"""The reference's §5.3 protocol: its file format, single-token filter, distractor draws and
hit rule (determiner or noun)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from guided_jax import weights
from guided_jax.analysis import probe, reflexive

# With the tiny run's tokenizer (400 entries from conftest's corpus): lines 1, 3, 5 and 6 have
# one token per word; "the", "girl", "herself" and "my" split. Line 5's "he" is one token
# alone but not after a space, so after the clause it splits and the line is not scored.
LINES = [
    "a cat sees her\t3\t0 1\t",
    "the girl would kick herself\t4\t0 1\t",
    "her friend calls her\t3\t0 1\t",
    "my teacher likes her\t3\t0 1",
    "he dog finds her\t3\t0 1",
    "a dog finds her   3 0 1",
]
# The clauses of the reference's run_coreference.py, in its order.
CLAUSES = [
    "The people believed .",
    "and as obama says ,",
    "the girl believes that .",
    "and that is what the boy said .",
    "and it is like they say .",
    "and as they say ,",
    "everyone believes that",
    "and",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_run):
    return weights.load(tiny_run).tokenizer


def _write(tmp_path, lines: list[str], name: str = "reflexive.txt"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _pieces(tokenizer, ids) -> list[str]:
    return [tokenizer.decode([i]).replace("Ġ", " ").strip() for i in ids]


def test_file_lines_are_read_as_words_and_indices(tmp_path) -> None:
    sentences = reflexive.read(_write(tmp_path, LINES))
    assert [s.line for s in sentences] == [1, 2, 3, 4, 5, 6]
    first, second = sentences[0], sentences[1]
    assert first.words == ("a", "cat", "sees", "her")
    assert (first.reflexive, first.determiner, first.noun) == (3, 0, 1)
    assert second.words[second.reflexive] == "herself" and second.words[second.noun] == "girl"


def test_kept_sentences_are_single_token_with_the_reference_draws_and_positions(
    tmp_path, tokenizer
) -> None:
    sentences = reflexive.read(_write(tmp_path, LINES))
    encoded = reflexive.encode(tokenizer, sentences)
    assert encoded.read == 6 and len(encoded.examples) == 3
    assert [e.line for e in encoded.examples] == [1, 3, 6]
    assert encoded.split_after_clause == (5,)
    assert encoded.summary().splitlines()[-1] == "kept=3 of 6 sentences"
    assert encoded.summary().splitlines()[0].endswith("clause: line 5")
    # One draw per sentence that passes the filter (lines 1, 3, 5, 6), as the reference's
    # random.seed(42) then random.sample(distractors, k=1) per kept sentence.
    assert tuple(CLAUSES) == reflexive.DISTRACTORS
    rng = random.Random(42)
    draws = [rng.sample(CLAUSES, k=1)[0] for _ in range(4)]
    state = random.getstate()
    try:
        random.seed(42)
        assert draws == [random.sample(CLAUSES, k=1)[0] for _ in range(4)]
    finally:
        random.setstate(state)
    assert [e.clause for e in encoded.examples] == [draws[0], draws[1], draws[3]]
    assert [e.clause for e in reflexive.encode(tokenizer, sentences, seed=7).examples] != [
        e.clause for e in encoded.examples
    ]
    for example in encoded.examples:
        words = sentences[example.line - 1].words
        clause_ids = tokenizer.encode_offsets(example.clause)[0]
        shift = 1 + len(clause_ids)
        assert example.ids[0] == tokenizer.bos_id and example.ids[-1] == tokenizer.eos_id
        assert list(example.ids[1:shift]) == clause_ids
        assert _pieces(tokenizer, example.ids[shift:-1]) == list(words)
        assert _pieces(tokenizer, [example.ids[example.reflexive]]) == [words[3]]
        assert _pieces(tokenizer, [example.ids[a] for a in example.antecedents]) == list(words[:2])


def test_hit_rule_is_top_attention_on_determiner_or_noun() -> None:
    # Two sentences (reflexive at 4, determiner and noun at 1, 2; reflexive at 3, them at 0, 2)
    # and, per [layer][sentence][head], the key of the reflexive's row with the largest weight.
    examples = [
        reflexive.Example((0,) * 7, 4, (1, 2), "and", 1),
        reflexive.Example((0,) * 6, 3, (0, 2), "and", 2),
    ]
    targets = [
        [[1, 2, 4], [0, 2, 1]],  # layer 0: det, noun, self | det, noun, elsewhere
        [[3, 0, 2], [5, 1, 3]],  # layer 1: elsewhere x2, noun | elsewhere x2, self
    ]
    attentions = np.random.default_rng(0).uniform(0, 0.1, (2, 2, 3, 7, 7))
    for layer, sentence, head in np.ndindex(2, 2, 3):
        row = examples[sentence].reflexive
        attentions[layer, sentence, head, row, targets[layer][sentence][head]] = 1.0
        attentions[layer, sentence, head, row + 1, (row + 2) % 7] = 2.0  # other rows: ignored
    top = np.asarray(probe.top_keys(attentions, np.array([e.reflexive for e in examples])))
    np.testing.assert_array_equal(top, np.array(targets))
    hits = probe.count_hits(top, examples)
    np.testing.assert_array_equal(hits, [[2, 2, 0], [0, 0, 1]])


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (["a cat sees her 3 0 1", "her 1 0"], r"line 2: expected words then 3 integer"),
        (["a cat sees her 3 0 one"], r"line 1: the last 3 fields must be integer.*'one'"),
        (["a cat sees her 4 0 1"], r"line 1: reflexive index 4 is out of range for 4 words"),
        (["a cat sees her 3 0 1", "", "a cat sees her 3 0 1"], r"line 2: expected words"),
        (["a cat sees her 3 -1 1"], r"line 1: determiner index -1 is out of range"),
        ([], r"has no sentences"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, lines, match) -> None:
    path = _write(tmp_path, lines, "bad.txt")
    with pytest.raises(ValueError, match=match) as caught:
        reflexive.read(path)
    assert str(path) in str(caught.value)


def test_no_single_token_sentence_and_misused_options_are_errors(tmp_path, tokenizer) -> None:
    path = _write(tmp_path, [LINES[1], LINES[3]])
    with pytest.raises(ValueError, match=r"none of the 2 sentences of .*bad has one token"):
        reflexive.encode(tokenizer, reflexive.read(path), source=f"{path} bad")
    for kwargs, match in [
        ({"protocol": "reference"}, "reads its sentences from a file"),
        ({"protocol": "reference", "sentences": str(path), "count": 5}, "extended protocol only"),
        ({"sentences": str(path)}, "is for --protocol reference only"),
        ({"protocol": "other"}, "protocol must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            probe.run("unused", **kwargs)
