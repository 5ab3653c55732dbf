r"""Fine-tuning: sequence classification or regression on a pretrained encoder, over seeds.

    python -m guided_jax.finetune --config configs/finetune.py --pretrained runs/default \
        --workdir runs/ft_hate --config.data.train_file=hate_train.csv \
        --config.data.eval_file=hate_test.csv
    python -m guided_jax.finetune --config configs/finetune.py --pretrained runs/default \
        --workdir runs/ft_cola --config.task=glue/cola
    # the reference's protocol and hyperparameters: every train row, the final model scored
    python -m guided_jax.finetune --config configs/finetune.py:reference \
        --pretrained runs/default --workdir runs/ft_cola_ref --config.task=glue/cola

Only parses flags; the work happens in :func:`guided_jax.analysis.finetune.run`.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from guided_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Fine-tuning config (configs/finetune.py)."
)
_PRETRAINED = flags.DEFINE_string(
    "pretrained", None, "Pretraining workdir or HuggingFace directory."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of the workdir (default: the newest).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results.json.")
flags.mark_flags_as_required(["config", "pretrained", "workdir"])


def main(argv: list[str]) -> None:
    from guided_jax.analysis import finetune
    from guided_jax.storage import as_path

    with cli.command("finetune", argv):
        results = finetune.run(_CONFIG.value, _PRETRAINED.value, _WORKDIR.value, step=_STEP.value)
    print(finetune.format_results(results))
    print(f"wrote {as_path(_WORKDIR.value) / 'results.json'}")


if __name__ == "__main__":
    cli.run(main)
