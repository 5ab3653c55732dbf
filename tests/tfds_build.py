"""Runs ``tfds build ARGS`` (``python tests/tfds_build.py build ARGS``) with or without TensorFlow.

The ``tfds`` script cannot start without TensorFlow and Apache Beam: it imports all of its
commands, and the ``convert_format`` one needs both at import. Its ``build`` command needs
neither to write ``array_record`` (writing TFRecord, the default format, needs TensorFlow). So
where both are installed this runs the ``tfds`` script itself; elsewhere it hands the same
arguments to the ``build`` command through TFDS's own parser for it."""

from __future__ import annotations

import importlib.util
import sys


def main(argv: list[str]) -> None:
    if argv[:1] != ["build"]:
        sys.exit(f"tfds_build.py: expected 'build' and its arguments, got {argv}")
    if all(importlib.util.find_spec(name) for name in ("tensorflow", "apache_beam")):
        from tensorflow_datasets.scripts.cli.main import launch_cli

        sys.argv = ["tfds", *argv]
        launch_cli()
        return
    from tensorflow_datasets.scripts.cli import build, cli_utils

    parse = cli_utils.make_flags_parser(build.Args, description="tfds build")
    parse(["tfds build", *argv[1:]]).execute()


if __name__ == "__main__":
    main(sys.argv[1:])
