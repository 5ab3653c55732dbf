"""A synthetic reflexive-anaphora set for the coreference probe: "the girl would kick herself".

Each sentence has one reflexive (``himself``/``herself``) whose antecedent is the subject noun,
with varied determiners, gendered nouns, modals and verbs. The distractor variants put a noun of
the other gender between them ("the girl near the king would kick herself", "the girl who saw
the king would kick herself"), so a head that attends to the nearest noun, or to any noun, is not
counted as resolving the reflexive. Examples record word indices and character spans, so a probe
can find the subword tokens of each word with any tokenizer's offsets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

DETERMINERS = ("the", "a", "this", "that", "every", "my", "our", "your", "one")
NOUNS = {
    "male": (
        "boy", "man", "king", "father", "brother", "uncle", "son", "prince", "husband",
        "gentleman", "monk", "nephew",
    ),
    "female": (
        "girl", "woman", "queen", "mother", "sister", "aunt", "daughter", "princess", "wife",
        "lady", "nun", "niece",
    ),
}  # fmt: skip
REFLEXIVES = {"male": "himself", "female": "herself"}
MODALS = ("would", "could", "should", "might", "will", "can", "must", "may")
VERBS = (
    "kick", "hurt", "see", "help", "blame", "praise", "defend", "trust", "admire", "describe",
    "protect", "forgive", "teach", "remind", "introduce", "criticize",
)  # fmt: skip
PREPOSITIONS = ("near", "behind", "beside", "with")
CLAUSE_VERBS = ("saw", "met", "called", "helped", "liked", "visited")
VARIANTS = ("simple", "distractor", "both")


@dataclasses.dataclass(frozen=True)
class AnaphoraExample:
    """One sentence: ``words`` joined as ``text``; ``spans[i]`` is word i's ``(start, end)``."""

    text: str
    words: tuple[str, ...]
    spans: tuple[tuple[int, int], ...]
    reflexive: int  # word index of himself/herself
    antecedents: tuple[int, ...]  # word indices the reflexive refers to (the subject noun)
    distractor: int | None = None  # word index of the other-gender noun, if any

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _sentence(words: Sequence[str]) -> tuple[str, tuple[tuple[int, int], ...]]:
    """Words joined by spaces, the final "." attached; each word's character span."""
    text, spans = "", []
    for index, word in enumerate(words):
        if index and word != ".":
            text += " "
        spans.append((len(text), len(text) + len(word)))
        text += word
    return text, tuple(spans)


def make_example(
    rng: np.random.Generator, distractor: bool, kind: str = "preposition"
) -> AnaphoraExample:
    """One random sentence; ``kind`` (preposition | clause) shapes the distractor phrase."""
    gender = ("male", "female")[rng.integers(2)]
    other = "female" if gender == "male" else "male"
    determiner = str(rng.choice(DETERMINERS))
    words = [determiner.capitalize(), str(rng.choice(NOUNS[gender]))]
    antecedent = 1
    distractor_index = None
    if distractor:
        linker = rng.choice(PREPOSITIONS if kind == "preposition" else ("who",))
        words.append(str(linker))
        if kind == "clause":
            words.append(str(rng.choice(CLAUSE_VERBS)))
        words += [str(rng.choice(DETERMINERS)), str(rng.choice(NOUNS[other]))]
        distractor_index = len(words) - 1
    words += [str(rng.choice(MODALS)), str(rng.choice(VERBS)), REFLEXIVES[gender], "."]
    text, spans = _sentence(words)
    return AnaphoraExample(
        text, tuple(words), spans, len(words) - 2, (antecedent,), distractor_index
    )


def generate(count: int, *, seed: int = 0, variant: str = "both") -> list[AnaphoraExample]:
    """``count`` sentences, reproducible from ``seed``; ``variant`` is simple (no distractor),
    distractor (every sentence has one, half prepositional, half relative clauses) or both
    (alternating)."""
    if variant not in VARIANTS:
        raise ValueError(f"anaphora variant must be one of {list(VARIANTS)}, got {variant!r}")
    if count <= 0:
        raise ValueError(f"the number of anaphora sentences must be positive, got {count}")
    rng = np.random.default_rng(seed)
    examples = []
    for index in range(count):
        with_distractor = variant == "distractor" or (variant == "both" and index % 2 == 1)
        kind = "clause" if (index // 2) % 2 else "preposition"
        examples.append(make_example(rng, with_distractor, kind))
    return examples
