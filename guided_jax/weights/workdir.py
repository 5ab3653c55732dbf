"""A pretraining workdir (a local directory or ``gs://``): the run's resolved ``config.json``,
its tokenizer and the orbax checkpoints of the whole train state under ``checkpoints/<step>/``.

Training writes the checkpoints (:mod:`guided_jax.train.checkpoints`, through
:func:`checkpoint_dir`); here only the parameters are read back, onto one device whatever mesh
wrote them. Step 0 is the seeded initialisation the run started from, which training never
saves but recreates exactly from ``train.seed``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from guided_jax.config.resolve import build_model_config
from guided_jax.data.tokenizer import Tokenizer, load_tokenizer
from guided_jax.guidance import Spec, pattern_source, registered_patterns
from guided_jax.model import ModelConfig, Params, init_params
from guided_jax.storage import as_path, is_remote

PATTERNS_DIR = "patterns"  # copies of the files that registered the run's patterns
PATTERNS_INDEX = "patterns.json"  # pattern name -> its file's copy


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a pretraining workdir (vs. a HuggingFace directory)."""
    path = as_path(path)
    # metrics/: the records of a gs:// workdir (train/metrics.py)
    return (
        any((path / name).is_dir() for name in ("checkpoints", "metrics"))
        or (path / "metrics.jsonl").is_file()
    )


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run recorded in ``WORKDIR/config.json``, with the patterns its
    head spec names registered again (:func:`register_run_patterns`)."""
    path = as_path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: {str(workdir)!r} is not a pretraining workdir "
            f"(python -m guided_jax.main --config ... --workdir DIR writes one)"
        )
    register_run_patterns(workdir)
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def keep_run_patterns(spec: Spec | None, workdir: str | os.PathLike) -> None:
    """Copies the file that registered each pattern the run's spec names (its config file,
    usually) to ``WORKDIR/patterns/``: what reads the run back (visualize, probe, diagnostics,
    the report) registers them from there, as the config file did for training."""
    sources = {name: pattern_source(name) for name in (spec.user_patterns if spec else ())}
    sources = {name: file for name, file in sources.items() if file}
    if not sources:
        return
    directory = as_path(workdir) / PATTERNS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        file: f"{i}_{epath.Path(file).name}" for i, file in enumerate(sorted(set(sources.values())))
    }
    for file, copy in files.items():
        (directory / copy).write_text(epath.Path(file).read_text())
    index = {name: {"file": files[file], "registered_in": file} for name, file in sources.items()}
    (directory / PATTERNS_INDEX).write_text(json.dumps(index, indent=2))


def register_run_patterns(workdir: str | os.PathLike) -> None:
    """Registers the patterns a run kept (:func:`keep_run_patterns`) that this process lacks,
    by running the kept copy of the file that registered them."""
    directory = as_path(workdir) / PATTERNS_DIR
    if not (directory / PATTERNS_INDEX).is_file():
        return
    index = json.loads((directory / PATTERNS_INDEX).read_text())
    missing = sorted({e["file"] for name, e in index.items() if name not in registered_patterns()})
    for copy in missing:
        source = (directory / copy).read_text()
        try:
            exec(
                compile(source, str(directory / copy), "exec"), {"__name__": f"run_patterns_{copy}"}
            )
        except Exception as error:
            names = sorted(name for name, e in index.items() if e["file"] == copy)
            raise ValueError(
                f"{str(directory / copy)!r}, kept from the file that registered the run's "
                f"patterns {names}, fails to run here: {type(error).__name__}: {error}; import "
                f"the file that registers them before reading the run"
            ) from None


def run_tokenizer(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> Tokenizer:
    """The run's tokenizer: ``data.tokenizer_dir`` if it named one, else ``WORKDIR/tokenizer``."""
    directory = config.data.tokenizer_dir or as_path(workdir) / "tokenizer"
    return load_tokenizer(directory)


def run_architecture(
    workdir: str | os.PathLike,
) -> tuple[ml_collections.ConfigDict, Tokenizer, ModelConfig]:
    """The run's config, tokenizer and model architecture, as training built them."""
    config = read_run_config(workdir)
    tokenizer = run_tokenizer(workdir, config)
    return config, tokenizer, build_model_config(config, tokenizer.vocab_size, tokenizer.pad_id)


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    """Where a run's orbax checkpoints live: ``WORKDIR/checkpoints/<step>/`` (absolute)."""
    path = as_path(workdir)
    return (path if is_remote(path) else path.absolute()) / "checkpoints"


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints in ``WORKDIR/checkpoints``, ascending (a save cut
    short leaves a temporary directory, which is not one)."""
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"{str(directory)!r} does not exist: the run saved no checkpoint")
    return sorted(ocp.path.step.checkpoint_steps(directory))


def _pure(tree: Any) -> Any:
    """A checkpointed nnx.State (``{"value": x}`` leaves, string layer indices) as a pure dict."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return _pure(tree["value"])
        return {int(k) if k.isdigit() else k: _pure(v) for k, v in tree.items()}
    return np.asarray(tree)


def load_params(workdir: str | os.PathLike, step: int | None = None) -> tuple[int, Params]:
    """``(step, parameters)`` of the checkpoint at ``step`` (default: the newest); ``step=0``
    gives the seeded initialisation."""
    steps = checkpoint_steps(workdir) if step != 0 else []
    if step == 0:
        config, _, model = run_architecture(workdir)
        return 0, init_params(model, config.train.seed)
    if not steps:
        raise FileNotFoundError(f"{str(workdir)!r} holds no complete checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"{str(workdir)!r} has no checkpoint at step {step}; it has {steps}")
    path = checkpoint_dir(workdir) / str(step) / "state"
    tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {
        "params": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), tree["params"]
        )
    }
    restored = ocp.PyTreeCheckpointer().restore(
        path,
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        ),
    )
    return step, _pure(restored["params"])
