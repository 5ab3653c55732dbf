"""A trained encoder and its tokenizer, read back from a pretraining workdir or a HuggingFace
directory, for fine-tuning, attention plots and export.

A workdir holds the run's resolved ``config.json``, its tokenizer and orbax checkpoints of the
whole train state; only the parameters are restored here (onto one device, whatever mesh
wrote them). Step 0 is the seeded initialisation the run started from, which training never
saves but recreates exactly from ``train.seed``. Parameters travel as "pure" nested dicts of
numpy arrays (``nnx.State.to_pure_dict`` with integer layer indices), the one form every
consumer here (export, fine-tuning, plots) needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from guided_jax.experiment import build_model_config
from guided_jax.model import EncoderForMLM, ModelConfig
from guided_jax.tokenizer import Tokenizer, load_tokenizer

Params = dict[str, Any]  # nested dict of numpy arrays, as nnx.State.to_pure_dict gives


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """An encoder with weights, its tokenizer, and where they came from."""

    model: EncoderForMLM
    tokenizer: Tokenizer
    source: Path
    step: int | None  # the checkpoint's step; None for a HuggingFace directory
    run_config: ml_collections.ConfigDict | None  # the pretraining run's config (workdirs)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a pretraining workdir (vs. a HuggingFace directory)."""
    return (Path(path) / "checkpoints").is_dir() or (Path(path) / "metrics.jsonl").is_file()


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run recorded in ``WORKDIR/config.json``."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist: {str(workdir)!r} is not a pretraining workdir "
            f"(python -m guided_jax.main --config ... --workdir DIR writes one)"
        )
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def run_tokenizer(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> Tokenizer:
    """The run's tokenizer: ``data.tokenizer_dir`` if it named one, else ``WORKDIR/tokenizer``."""
    directory = config.data.tokenizer_dir or Path(workdir) / "tokenizer"
    return load_tokenizer(directory)


def run_model(
    workdir: str | os.PathLike,
) -> tuple[ml_collections.ConfigDict, Tokenizer, ModelConfig]:
    """The run's config, tokenizer and model architecture, as training built them."""
    config = read_run_config(workdir)
    tokenizer = run_tokenizer(workdir, config)
    return config, tokenizer, build_model_config(config, tokenizer.vocab_size, tokenizer.pad_id)


def _read_only_manager(workdir: str | os.PathLike) -> ocp.CheckpointManager:
    directory = Path(workdir).absolute() / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{str(directory)!r} does not exist: the run saved no checkpoint")
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints in ``WORKDIR/checkpoints``, ascending."""
    manager = _read_only_manager(workdir)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


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
        config, _, model = run_model(workdir)
        return 0, init_params(model, config.train.seed)
    if not steps:
        raise FileNotFoundError(f"{str(workdir)!r} holds no complete checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(f"{str(workdir)!r} has no checkpoint at step {step}; it has {steps}")
    path = Path(workdir).absolute() / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {
        "params": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here), tree["params"]
        )
    }
    restored = checkpointer.restore(
        path,
        args=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        ),
    )
    return step, _pure(restored["params"])


def init_params(model: ModelConfig, seed: int) -> Params:
    """The parameters a run with ``train.seed=seed`` starts from (its step 0)."""
    return _to_numpy(nnx.state(EncoderForMLM(model, rngs=nnx.Rngs(params=seed)), nnx.Param))


def model_params(model: EncoderForMLM) -> Params:
    """A model's parameters as a pure dict of numpy arrays."""
    return _to_numpy(nnx.state(model, nnx.Param))


def _to_numpy(state: nnx.State) -> Params:
    return jax.tree.map(np.array, nnx.to_pure_dict(state))  # writable copies


def build_model(config: ModelConfig, params: Params) -> EncoderForMLM:
    """An encoder of ``config`` holding ``params``; shapes must match exactly."""
    abstract = nnx.eval_shape(lambda: EncoderForMLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(state))
    given = jax.tree.map(lambda x: tuple(np.shape(x)), params)
    if expected != given:
        raise ValueError(
            f"parameters do not fit the model {config}: {_first_difference(expected, given)}"
        )
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jax.numpy.asarray(x), params))
    return nnx.merge(graphdef, state)


def _first_difference(expected: Any, given: Any, path: str = "") -> str:
    if isinstance(expected, dict) and isinstance(given, dict):
        for key in sorted(set(expected) | set(given), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in given:
                return f"{where} is missing"
            if key not in expected:
                return f"{where} is not a parameter of this model"
            found = _first_difference(expected[key], given[key], where)
            if found:
                return found
        return ""
    if expected != given:
        return f"{path} has shape {given}, expected {expected}"
    return ""


def load(source: str | os.PathLike, step: int | None = None) -> Pretrained:
    """The encoder in ``source``: a pretraining workdir (checkpoint ``step``, default the
    newest; 0 = the seeded initialisation) or a HuggingFace directory (config.json +
    model.safetensors + tokenizer files, as ``guided_jax.hf_interop`` exports)."""
    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a directory (a workdir or a model dir)")
    if is_workdir(path):
        config, tokenizer, model_config = run_model(path)
        step, params = load_params(path, step)
        return Pretrained(build_model(model_config, params), tokenizer, path, step, config)
    from guided_jax import hf_interop  # hf_interop builds on this module

    if step is not None:
        raise ValueError(f"{str(path)!r} is a HuggingFace directory: it has no steps to choose")
    model_config, params, tokenizer = hf_interop.read_hf_dir(path)
    return Pretrained(build_model(model_config, params), tokenizer, path, None, None)
