r"""AG against the plain MLM baseline in one command: both arms trained with identical data,
seeds and steps, optionally fine-tuned, then ``WORKDIR/report.md`` with a table and plots.

    python -m guided_jax.reproduce --config configs/default.py --workdir runs/compare \
        --config.train.steps=1500
    # both arms also fine-tuned on a labelled CSV
    python -m guided_jax.reproduce --config configs/default.py --workdir runs/compare \
        --config.train.steps=1500 --finetune_config configs/finetune.py \
        --finetune_config.data.train_file=hate_train.csv \
        --finetune_config.data.eval_file=hate_test.csv

Only parses flags; the work happens in :func:`guided_jax.analysis.reproduce.reproduce`.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from guided_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining config (configs/*.py).")
_FINETUNE_CONFIG = config_flags.DEFINE_config_file(
    "finetune_config", None, "Optional fine-tuning config (configs/finetune.py)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for both arms, the plots and report.md.")
_TEXT = flags.DEFINE_string(
    "text", "The cat sat on the mat because it was tired.", "Sentence whose attention is drawn."
)
_PRINT_CONFIG = cli.define_print_config()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    from guided_jax.analysis import reproduce

    with cli.command("reproduce", argv):
        if _PRINT_CONFIG.value:  # the AG arm; the baseline differs in guidance.enabled only
            from guided_jax.storage import as_path
            from guided_jax.train.plan import plan_run

            arm = reproduce.arm_config(_CONFIG.value, "ag")
            print("\n".join(plan_run(arm, as_path(_WORKDIR.value) / "ag").lines()))
            print("baseline arm: the same with guidance.enabled=False")
            return
        report = reproduce.reproduce(
            _CONFIG.value,
            _WORKDIR.value,
            text=_TEXT.value,
            finetune_config=_FINETUNE_CONFIG.value,  # None unless given
            command=" ".join(["python -m guided_jax.reproduce", *sys.argv[1:]]),
        )
    print(f"wrote {report}")


if __name__ == "__main__":
    cli.run(main)
