"""Coreference probe (the AG paper's §5.3): per layer and head, how often a reflexive's top
attention lands on its antecedent, for one checkpoint or two side by side.

    python -m guided_jax.probe --workdir runs/ag --compare runs/baseline
    python -m guided_jax.probe --workdir runs/ag --step 0 --count 500 --variant distractor
    python -m guided_jax.probe --workdir runs/ag --protocol reference --sentences reflexive.txt

The extended protocol (default) probes our generated sentences; the reference protocol reads the
reference's sentence file (one token per word, a seeded distractor clause before each) and ends
with ``kept=K of N sentences``.

Only parses flags; the work happens in :func:`guided_jax.analysis.probe.run`.
"""

from __future__ import annotations

from absl import flags

from guided_jax import cli
from guided_jax.analysis.anaphora import VARIANTS
from guided_jax.analysis.reflexive import PROTOCOLS

_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining workdir (or a HuggingFace directory).")
_COMPARE = flags.DEFINE_string("compare", None, "A second workdir to compare with.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of both (default: the newest).")
_PROTOCOL = flags.DEFINE_enum(
    "protocol", "extended", list(PROTOCOLS), "Generated sentences or the reference's file?"
)
_SENTENCES = flags.DEFINE_string("sentences", None, "Reference protocol: the sentence file.")
_COUNT = flags.DEFINE_integer("count", None, "Extended: how many sentences (default 200).")
_SEED = flags.DEFINE_integer("seed", None, "Seed of the sentences (extended: 0) or draws (42).")
_VARIANT = flags.DEFINE_enum("variant", None, list(VARIANTS), "Extended: distractors? (both)")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    from guided_jax.analysis import probe

    with cli.command("probe", argv):
        _, _, report = probe.run(
            _WORKDIR.value,
            compare=_COMPARE.value,
            step=_STEP.value,
            protocol=_PROTOCOL.value,
            sentences=_SENTENCES.value,
            count=_COUNT.value,
            seed=_SEED.value,
            variant=_VARIANT.value,
            json_path=_JSON.value,
        )
    print(report)


if __name__ == "__main__":
    cli.run(main)
