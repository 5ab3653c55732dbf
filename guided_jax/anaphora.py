"""The synthetic reflexive-anaphora sentences of the coreference probe, as JSON lines.

    python -m guided_jax.anaphora --count 5 --variant distractor

Only parses flags; the sentences come from :func:`guided_jax.analysis.anaphora.generate`.
"""

from __future__ import annotations

import json

from absl import flags

from guided_jax import cli
from guided_jax.analysis.anaphora import VARIANTS

_COUNT = flags.DEFINE_integer("count", 10, "How many sentences.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sentences.")
_VARIANT = flags.DEFINE_enum("variant", "both", list(VARIANTS), "Sentences with distractors?")


def main(argv: list[str]) -> None:
    from guided_jax.analysis import anaphora

    with cli.command("anaphora", argv):
        examples = anaphora.generate(_COUNT.value, seed=_SEED.value, variant=_VARIANT.value)
    for example in examples:
        print(json.dumps(example.to_json()))


if __name__ == "__main__":
    cli.run(main)
