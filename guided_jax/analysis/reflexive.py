"""The reference's own §5.3 protocol: its sentence file, single-token filter and distractors.

Our generated sentences (:mod:`guided_jax.analysis.anaphora`) extend the paper's probe; to
compare numbers with the reference's, this reads its file format (``reflexive.txt``: words, then
the reflexive's, the determiner's and the noun's word indices), keeps only sentences whose
every word is one token, puts a seeded random clause before each (which moves every position)
and lets the probe count a hit when the reflexive's top attention is on the determiner or noun.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keeps the probe command's --help free of the tokenizers import
    from guided_jax.data.tokenizer import Tokenizer

# The probe's protocols: extended scores generated sentences (:mod:`.anaphora`), reference
# scores a file in the reference's format, read here.
PROTOCOLS = ("extended", "reference")
# The reference's distractor clauses, in its order: the seeded draws index into this list.
DISTRACTORS = (
    "The people believed .",
    "and as obama says ,",
    "the girl believes that .",
    "and that is what the boy said .",
    "and it is like they say .",
    "and as they say ,",
    "everyone believes that",
    "and",
)
DEFAULT_SEED = 42  # the reference's --seed


@dataclasses.dataclass(frozen=True)
class Sentence:
    """One line of the file; the indices count words from 0."""

    words: tuple[str, ...]
    reflexive: int
    determiner: int
    noun: int
    line: int  # 1-based line number in the file


@dataclasses.dataclass(frozen=True)
class Example:
    """A kept sentence as model input, ``<s> clause sentence </s>``, and the probed positions."""

    ids: tuple[int, ...]
    reflexive: int  # token position of the reflexive
    antecedents: tuple[int, ...]  # token positions of the determiner and the noun
    clause: str
    line: int


@dataclasses.dataclass(frozen=True)
class ReflexiveSet:
    """The scored examples of a file, how many lines it had, and the lines that passed the
    filter but whose first word splits into several tokens after the clause (not scored: the
    reference would read the wrong positions there)."""

    examples: tuple[Example, ...]
    read: int
    split_after_clause: tuple[int, ...] = ()

    @property
    def draws(self) -> tuple[tuple[int, str], ...]:
        """Line number and clause of each scored sentence."""
        return tuple((e.line, e.clause) for e in self.examples)

    def summary(self) -> str:
        """The report's last lines, ending with ``kept=K of N sentences``."""
        lines = []
        if self.split_after_clause:
            numbers = ", ".join(map(str, self.split_after_clause))
            lines.append(
                f"not scored, the first word splitting into several tokens after the distractor "
                f"clause: line{'s' if len(self.split_after_clause) > 1 else ''} {numbers}"
            )
        lines.append(f"kept={len(self.examples)} of {self.read} sentences")
        return "\n".join(lines)


def read(path: str | os.PathLike[str]) -> list[Sentence]:
    """The sentences of a file in the reference's format, one per line:
    ``words... REFLEXIVE DETERMINER NOUN`` (whitespace-separated, indices counted from 0)."""
    path = Path(path)
    sentences = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path}, line {number}"
        fields = line.split()
        if len(fields) < 4:
            raise ValueError(
                f"{where}: expected words then 3 integer word indices (reflexive, determiner, "
                f"noun), got {line!r}"
            )
        words = tuple(fields[:-3])
        try:
            reflexive, determiner, noun = (int(f) for f in fields[-3:])
        except ValueError:
            raise ValueError(
                f"{where}: the last 3 fields must be integer word indices (reflexive, "
                f"determiner, noun), got {fields[-3:]}"
            ) from None
        for name, index in (("reflexive", reflexive), ("determiner", determiner), ("noun", noun)):
            if not 0 <= index < len(words):
                raise ValueError(
                    f"{where}: {name} index {index} is out of range for {len(words)} words "
                    f"(expected 0 to {len(words) - 1})"
                )
        sentences.append(Sentence(words, reflexive, determiner, noun, number))
    if not sentences:
        raise ValueError(f"{path} has no sentences")
    return sentences


def encode(
    tokenizer: Tokenizer,
    sentences: Sequence[Sentence],
    *,
    seed: int = DEFAULT_SEED,
    source: str = "the sentences",
) -> ReflexiveSet:
    """Keeps the sentences whose words are one token each and draws a clause for each kept one
    (``random.Random(seed)``, one ``sample(DISTRACTORS, k=1)`` per kept sentence, in file order:
    the reference's draws); positions move past ``<s>`` and the clause's tokens."""
    rng = random.Random(seed)
    examples, split = [], []
    for sentence in sentences:
        text = " ".join(sentence.words)
        if len(tokenizer.encode_batch([text])[0]) != len(sentence.words):
            continue
        clause = rng.sample(DISTRACTORS, k=1)[0]
        clause_ids, ids = tokenizer.encode_batch([clause, clause + " " + text])
        if ids[: len(clause_ids)] != clause_ids or len(ids) != len(clause_ids) + len(
            sentence.words
        ):
            split.append(sentence.line)
            continue
        shift = 1 + len(clause_ids)
        examples.append(
            Example(
                (tokenizer.bos_id, *ids, tokenizer.eos_id),
                sentence.reflexive + shift,
                (sentence.determiner + shift, sentence.noun + shift),
                clause,
                sentence.line,
            )
        )
    if not examples:
        raise ValueError(
            f"none of the {len(sentences)} sentences of {source} has one token per word with "
            f"this tokenizer, so the reference protocol has nothing to score"
        )
    return ReflexiveSet(tuple(examples), len(sentences), tuple(split))
