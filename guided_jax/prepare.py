r"""Tokenize and pack a run's corpus once, with Apache Beam, into sharded ArrayRecord files that
each host of the run reads its own rows from (``pip install -e '.[prepare]'``).

    python -m guided_jax.prepare --config configs/reference.py --out prepared/ \
        --config.data.train_files='corpus/*.txt' --runner=DirectRunner --direct_num_workers=2 \
        --direct_running_mode=multi_processing

Then train with the same config and data flags plus --config.data.cache_dir=prepared/ (for
example python -m guided_jax.main ... --config.data.cache_dir=prepared/): the run finds the
tokenizer and the blocks there and tokenizes nothing. The last lines give each entry's shards,
blocks and tokens.

Flags the command does not define go to Beam as pipeline options (Dataflow's
--max_num_workers, --setup_file, ...); --out may be gs://bucket/path. Only parses flags; the
work happens in :func:`guided_jax.train.offline.prepare_offline`.
"""

from __future__ import annotations

import logging

from absl import flags
from ml_collections import config_flags

from guided_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_OUT = flags.DEFINE_string(
    "out", None, "Directory (local or gs://) that becomes the run's data.cache_dir."
)
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", 0, "ArrayRecord files per entry; 0: one per 128 MiB of records."
)
# Beam's own options, forwarded as given (defined here so that --help lists them).
_RUNNER = flags.DEFINE_string(
    "runner", None, "Beam runner: DirectRunner (default), DataflowRunner, FlinkRunner, ..."
)
_DIRECT_NUM_WORKERS = flags.DEFINE_integer(
    "direct_num_workers", None, "DirectRunner: workers (0: one per CPU)."
)
_DIRECT_RUNNING_MODE = flags.DEFINE_enum(
    "direct_running_mode",
    None,
    ["in_memory", "multi_threading", "multi_processing"],
    "DirectRunner: how its workers run.",
)
_PROJECT = flags.DEFINE_string("project", None, "Dataflow: the Google Cloud project.")
_REGION = flags.DEFINE_string("region", None, "Dataflow: the region its workers run in.")
_TEMP_LOCATION = flags.DEFINE_string(
    "temp_location", None, "Dataflow: a gs:// path for the job's temporary files."
)
flags.mark_flags_as_required(["config", "out"])
_BEAM_FLAGS = (
    _RUNNER,
    _DIRECT_NUM_WORKERS,
    _DIRECT_RUNNING_MODE,
    _PROJECT,
    _REGION,
    _TEMP_LOCATION,
)


def main(argv: list[str]) -> None:
    with cli.command("prepare", argv, positional=True):
        _refuse_positional(argv[1:])
        pipeline_args = [
            f"--{holder.name}={holder.value}" for holder in _BEAM_FLAGS if holder.present
        ] + argv[1:]
        quiet = not flags.FLAGS["verbosity"].present
        if quiet:
            _quiet_beam()
            pipeline_args.append("--default_sdk_harness_log_level=ERROR")
        from guided_jax.train.offline import prepare_offline

        tokenizer, entries = prepare_offline(
            _CONFIG.value,
            _OUT.value,
            pipeline_args,
            num_shards=_NUM_SHARDS.value,
            worker_output=not quiet,
        )
        print(f"tokenizer: {tokenizer}")
        for entry in entries:
            print(entry.line())


def _refuse_positional(rest: list[str]) -> None:
    """Only flags may follow: a word is the value of the flag before it (``--name value``)."""
    for before, word in zip(["--", *rest], rest, strict=False):
        taken = before.startswith("--") and "=" not in before and before != "--"
        if not word.startswith("-") and not taken:
            raise ValueError(f"unexpected argument {word!r}: only flags follow the command")


def _quiet_beam() -> None:
    """Keeps Beam's INFO and WARNING lines off the screen, those it logs on import too."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        import apache_beam  # noqa: F401
    except ImportError:  # the command says what to install
        pass
    finally:
        root.setLevel(level)
    logging.getLogger("apache_beam").setLevel(logging.ERROR)


if __name__ == "__main__":
    cli.run(main, other_flags=True)
