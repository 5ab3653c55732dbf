"""A trained encoder and its tokenizer, from a pretraining workdir or a HuggingFace directory:
one :func:`load` for fine-tuning, attention maps, probes and export."""

from __future__ import annotations

import dataclasses
import os

import ml_collections
from etils import epath

from guided_jax.data.tokenizer import Tokenizer
from guided_jax.model import EncoderForMLM, ModelConfig, build_model
from guided_jax.storage import as_path
from guided_jax.weights.hf import read_hf_dir
from guided_jax.weights.workdir import is_workdir, load_params, run_architecture


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """An encoder with weights, its tokenizer, and where they came from."""

    model: EncoderForMLM
    tokenizer: Tokenizer
    source: epath.Path
    step: int | None  # the checkpoint's step; None for a HuggingFace directory
    run_config: ml_collections.ConfigDict | None  # the pretraining run's config (workdirs)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def load(source: str | os.PathLike, step: int | None = None) -> Pretrained:
    """The encoder in ``source``: a pretraining workdir (checkpoint ``step``, default the
    newest; 0 = the seeded initialisation) or a HuggingFace directory (config.json +
    model.safetensors + tokenizer files, as :func:`guided_jax.weights.hf.export` writes)."""
    path = as_path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a directory (a workdir or a model dir)")
    if is_workdir(path):
        config, tokenizer, model_config = run_architecture(path)
        step, params = load_params(path, step)
        return Pretrained(build_model(model_config, params), tokenizer, path, step, config)
    if step is not None:
        raise ValueError(f"{str(path)!r} is a HuggingFace directory: it has no steps to choose")
    model_config, params, tokenizer = read_hf_dir(path)
    return Pretrained(build_model(model_config, params), tokenizer, path, None, None)
