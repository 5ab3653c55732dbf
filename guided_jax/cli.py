"""What every ``python -m guided_jax.X`` command shares: quiet library logs unless
``--verbosity`` is given, bad input reported in one line, no stray arguments."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence

from absl import app, flags, logging

# Errors of input a user can fix (a file, a flag, a config value, a diverged run): one line,
# no traceback. Anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ValueError, OSError, FloatingPointError)


@contextlib.contextmanager
def command(name: str, argv: Sequence[str], *, positional: bool = False) -> Iterator[None]:
    """Runs the body of command ``name``: refuses positional arguments (unless ``positional``),
    keeps absl and orbax INFO lines off the screen unless ``--verbosity`` was given, and turns
    an input error into ``guided_jax.NAME: error: ...`` with exit status 1."""
    if len(argv) > 1 and not positional:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    _skip_an_absent_tpu()
    try:
        yield
    except INPUT_ERRORS as error:
        sys.exit(f"guided_jax.{name}: error: {error}")


def _skip_an_absent_tpu() -> None:
    """With libtpu installed (the ``tpu`` and ``test`` extras, for compiling for TPU slices) on
    a host without a TPU, jax's first start would have libtpu probe for one and print its
    failures; such a host starts only the CPU backend (a GPU host, or an explicit
    ``JAX_PLATFORMS``, is left to jax)."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia[0-9]*"):
        return
    import jax

    jax.config.update("jax_platforms", "cpu")
