"""Attention maps of a checkpoint for one sentence, drawn as a layers x heads grid (the AG
paper's Fig. 1), guided heads titled with their pattern.

    python -m guided_jax.visualize --workdir runs/default --text "The cat sat on the mat."
    python -m guided_jax.visualize --workdir runs/default --step 0 --text "..."  # the init

Only parses flags; the work happens in :func:`guided_jax.analysis.attention_maps.draw`.
"""

from __future__ import annotations

from absl import flags

from guided_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining workdir (or a HuggingFace directory).")
_TEXT = flags.DEFINE_string("text", None, "The sentence whose attention maps to draw.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest; 0: the init).")
_OUT = flags.DEFINE_string("out", None, "PNG to write (default: WORKDIR/attention_stepN.png).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 32, "Cut the sentence to this many tokens.")
flags.mark_flags_as_required(["workdir", "text"])


def main(argv: list[str]) -> None:
    from guided_jax.analysis import attention_maps

    with cli.command("visualize", argv):
        path = attention_maps.draw(
            _WORKDIR.value, _TEXT.value, _OUT.value, step=_STEP.value, max_tokens=_MAX_TOKENS.value
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    cli.run(main)
