"""What every ``python -m guided_jax.X`` command shares: quiet library logs unless
``--verbosity`` is given, bad input (a flag, a config key, a file) reported in one line, no
stray arguments."""

from __future__ import annotations

import contextlib
import difflib
import functools
import glob
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

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
    except Exception as error:
        if not _is_credentials_error(error):
            raise
        sys.exit(
            f"guided_jax.{name}: error: gs:// needs Google Cloud credentials: {_last_line(error)} "
            "(on a workstation: gcloud auth application-default login; on a Cloud VM: a "
            "service account with storage access)"
        )


def _is_credentials_error(error: BaseException) -> bool:
    """Whether Google's auth library raised ``error`` (no credentials, or none that work)."""
    auth = sys.modules.get("google.auth.exceptions")  # loaded by whatever raised it
    return auth is not None and isinstance(error, auth.GoogleAuthError)


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


def define_print_config() -> flags.FlagHolder[bool]:
    """``--print_config``: the dry run of the commands that start a run."""
    return flags.DEFINE_bool(
        "print_config",
        False,
        "Print the resolved config and what it derives (steps counted from epochs, global "
        "batch, vocabulary rows, mesh, head spec), then exit without writing anything.",
    )


def run(main: Callable[[list[str]], None], *, other_flags: bool = False) -> None:
    """``app.run(main)``, but a bad flag, config file or config key stops the command before
    anything runs with one line that names it (``guided_jax.NAME: error: ...``, exit status 2).
    ``other_flags``: flags the command does not define reach ``main`` in ``argv`` (for a
    library that parses its own, such as Beam's pipeline options)."""
    app.run(main, flags_parser=functools.partial(_parse_flags, known_only=other_flags))


def _parse_flags(argv: list[str], known_only: bool = False) -> list[str]:
    try:
        rest = flags.FLAGS(argv, known_only=known_only)
        for name in _config_file_flags():  # a file that failed to load raises on first use
            if flags.FLAGS[name].value is not None:
                flags.FLAGS[name].value.keys()
        return rest
    except (flags.Error, AttributeError, KeyError, ValueError, OSError) as error:
        problem = _config_key_problem(argv) or _last_line(error)
        sys.stderr.write(f"{_command_name(argv)}: error: {problem}\n")
        sys.exit(2)


def _command_name(argv: Sequence[str]) -> str:
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    return name or os.path.basename(argv[0])


def _last_line(error: BaseException) -> str:
    """An exception's message as one line: a config file's error arrives as the traceback of
    its loading, whose last line names it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
    if len(lines) > 1 and lines[0].startswith("flag --"):  # which flag, then its error
        return f"{lines[0].split(': ', 1)[0]}: {last}"
    return last


def _config_key_problem(argv: Sequence[str]) -> str | None:
    """``unknown config key train.stepz; did you mean train.steps?`` for the first override
    (``--NAME.path=value``) of a config-file flag NAME whose path the config does not hold,
    or the config file's own loading error."""
    from guided_jax.config import load_config

    for name in _config_file_flags():
        overrides = _config_overrides(argv, name)
        spec = _flag_value(argv, name)
        if spec is None:
            continue
        if not os.path.isfile(spec.partition(":")[0]):
            return f"--{name}={spec}: no such config file {spec.partition(':')[0]!r}"
        try:
            config = load_config(spec)
        except Exception as error:  # the config file's own error, as --NAME reports it
            return f"--{name}={spec}: {_last_line(error)}"
        keys = _dotted_keys(config)
        for path in overrides:
            if path not in keys:
                close = difflib.get_close_matches(path, sorted(keys), n=1, cutoff=0.6)
                hint = (
                    f"did you mean {close[0]}?"
                    if close
                    else (
                        f"python -m {_command_name(argv)} --{name}={spec} --print_config lists the "
                        f"keys"
                    )
                )
                return f"unknown {name} key {path}; {hint}"
    return None


def _config_file_flags() -> list[str]:
    """The names of the flags that load a config file (``--config``, ``--finetune_config``)."""
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    return [
        name for name in flags.FLAGS if isinstance(flags.FLAGS[name].parser, ConfigFileFlagParser)
    ]


def _config_overrides(argv: Sequence[str], name: str) -> list[str]:
    """The paths of every ``--NAME.path[=value]`` (or ``--noNAME.path``) in ``argv``."""
    pattern = re.compile(rf"^--?(?:no)?{name}\.([\w.]+)(=|$)")
    return [match[1] for arg in argv[1:] if (match := pattern.match(arg))]


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value argv gives ``--name`` (``--name=V`` or ``--name V``), the last one winning."""
    value = None
    for i, arg in enumerate(argv):
        if re.match(rf"^--?{name}=", arg):
            value = arg.split("=", 1)[1]
        elif re.match(rf"^--?{name}$", arg) and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _dotted_keys(config: Any, prefix: str = "") -> set[str]:
    """Every key of a ConfigDict, nested ones as ``a.b.c``."""
    keys: set[str] = set()
    for key, value in config.items():
        path = f"{prefix}{key}"
        keys.add(path)
        if hasattr(value, "items") and not isinstance(value, str):
            keys |= _dotted_keys(value, f"{path}.")
    return keys
