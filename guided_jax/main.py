"""Command line: ``python -m guided_jax.main --config configs/default.py --workdir DIR``.

Only parses flags; the work happens in :func:`guided_jax.train.train_and_evaluate`. Any config
key can be overridden, e.g. ``--config.train.steps=200 --config.guidance.enabled=false``.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints, tokenizer.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Join a multi-process run: jax.distributed.initialize() finds the coordinator on Cloud TPU "
    "VMs and under SLURM by itself.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for clusters JAX cannot detect."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, N).")
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
    """Must run before any other JAX call."""
    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if not _DISTRIBUTED.value and all(v is None for v in explicit):
        return
    import jax

    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    _initialize_distributed()
    import jax

    from guided_jax import train

    if not flags.FLAGS["verbosity"].present:  # keep orbax's INFO lines out of the progress bar
        logging.set_verbosity(logging.WARNING)
    try:
        last = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ValueError, OSError, FloatingPointError) as error:  # say what is wrong, no traceback
        sys.exit(f"guided_jax: error: {error}")
    except train.Interrupted as stop:
        sys.exit(f"guided_jax: {stop}")
    if jax.process_index() != 0:  # one report per run, not one per host
        return
    if not last:
        print(f"{_WORKDIR.value} already holds a finished run of this config")
        return
    # Head diagnostics (diag/...) are one value per layer and head: metrics.jsonl holds them.
    shown = {k: v for k, v in last.items() if k != "step" and not k.startswith("diag/")}
    summary = " ".join(f"{k}={v:.4g}" for k, v in shown.items())
    print(f"finished at step {last['step']}: {summary}")


if __name__ == "__main__":
    app.run(main)
