"""What a run's ConfigDict means: ``model.from_dir`` and tokenizer directories resolved into
the config a run records, the typed model and head spec built from it, and the rule that a
workdir belongs to one config."""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from guided_jax.data.tokenizer import Tokenizer, detect_kind, load_tokenizer
from guided_jax.guidance import Spec, parse_spec
from guided_jax.model import ModelConfig
from guided_jax.model.hf_config import DEFAULT_PAD_IDS, ModelDir, read_model_dir
from guided_jax.storage import as_path


class ConfigError(ValueError):
    """A config value that cannot work, or a workdir that belongs to another config."""


def _split_paths(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


# Keys of the model section that say where the architecture comes from, not what it is.
_MODEL_SOURCE_KEYS = ("from_dir",)
# Stands for the tokenizer's size in checks made before there is a tokenizer.
_PLACEHOLDER_VOCAB_SIZE = 512


def resolve_config(
    config: ml_collections.ConfigDict,
) -> tuple[ml_collections.ConfigDict, ModelDir | None]:
    """A copy of ``config`` with ``model.from_dir`` applied, and that directory.

    With ``model.from_dir=DIR``, ``DIR/config.json`` sets every model key but ``dtype``,
    ``remat`` and ``attention`` (the file decides the architecture; the section's own values
    are replaced), ``data.tokenizer_dir`` becomes DIR unless it names another directory, and
    ``model.vocab_size`` becomes the tokenizer's length.
    With a tokenizer directory, ``data.tokenizer_kind`` becomes the kind of the files there. The
    result is what WORKDIR/config.json records, so a resume compares what was actually built.
    Reads only."""
    config = config.copy_and_resolve_references()
    model_dir = None
    if config.model.get("from_dir"):
        try:
            model_dir = read_model_dir(config.model.from_dir)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        config.model.update(model_dir.model)
        if not config.data.tokenizer_dir:
            if not model_dir.has_tokenizer:
                raise ConfigError(
                    f"model.from_dir: {str(model_dir.path)!r} has no tokenizer files (vocab.txt "
                    f"for WordPiece, or vocab.json + merges.txt for byte-level BPE); put them "
                    f"beside its config.json, or set data.tokenizer_dir to a tokenizer directory "
                    f"(train one with python -m guided_jax.tokenizer)"
                )
            config.data.tokenizer_dir = str(model_dir.path)
    if config.data.tokenizer_dir:
        config.data.tokenizer_kind = detect_kind(config.data.tokenizer_dir)
    if model_dir is not None:
        # The reference calls resize_token_embeddings(len(tokenizer)): its oromo_config/
        # directories say 52,000 beside vocabularies of 40,000, and it trains 40,000 rows.
        config.model.vocab_size = load_tokenizer(config.data.tokenizer_dir).vocab_size
    return config, model_dir


def vocab_resize_note(config: ml_collections.ConfigDict, model_dir: ModelDir | None) -> str | None:
    """The line a run prints when its embedding rows follow the tokenizer, not config.json."""
    if model_dir is None or config.model.vocab_size == model_dir.model["vocab_size"]:
        return None
    return (
        f"model.vocab_size={config.model.vocab_size}: the tokenizer's length, not the "
        f"{model_dir.model['vocab_size']} of {str(model_dir.config_file)!r} (the reference "
        f"resizes its embeddings to the tokenizer)"
    )


def with_global_batch(
    config: ml_collections.ConfigDict, batch_devices: int
) -> ml_collections.ConfigDict:
    """``config`` with ``train.batch_size`` set from ``train.per_device_batch_size`` (when > 0)
    for ``batch_devices`` devices splitting each batch: per device x devices x accumulation."""
    per_device = config.train.get("per_device_batch_size", 0)
    if per_device <= 0:
        return config
    config = config.copy_and_resolve_references()
    config.train.batch_size = per_device * batch_devices * config.train.grad_accum_steps
    return config


def steps_for_epochs(blocks: int, batch_size: int, grad_accum_steps: int, epochs: float) -> int:
    """Optimizer steps of ``epochs`` over ``blocks`` examples, counted as the reference's
    trainer counts them: ``int(len(loader) // grad_accum_steps * epochs)``, where the loader
    yields micro-batches of ``batch_size / grad_accum_steps`` and keeps the short last one."""
    micro_batches = -(-blocks // (batch_size // grad_accum_steps))
    return int(micro_batches // grad_accum_steps * epochs)


def check_model_dir_tokenizer(model_dir: ModelDir, tokenizer: Tokenizer) -> None:
    """The tokenizer must pad where the model expects pads."""
    source = f"tokenizer in {str(tokenizer.directory)!r}"
    if tokenizer.pad_id != model_dir.pad_token_id:
        raise ConfigError(
            f"the {source} pads with id {tokenizer.pad_id}, but {str(model_dir.config_file)!r} "
            f"has pad_token_id={model_dir.pad_token_id}"
        )


def build_model_config(
    config: ml_collections.ConfigDict, vocab_size: int | None, pad_token_id: int | None = None
) -> ModelConfig:
    """The model of a resolved config, for a tokenizer of ``vocab_size`` tokens that pads with
    ``pad_token_id``. Without a tokenizer yet (None), ``model.vocab_size=-1`` stands for a
    small vocabulary and the pad is that of our own tokenizers for the model type."""
    values = {k: v for k, v in config.model.to_dict().items() if k not in _MODEL_SOURCE_KEYS}
    if pad_token_id is None:
        pad_token_id = DEFAULT_PAD_IDS.get(values.get("model_type", "roberta"), 1)
    values["pad_token_id"] = pad_token_id
    if values.get("vocab_size", -1) == -1:
        values["vocab_size"] = vocab_size or _PLACEHOLDER_VOCAB_SIZE
    elif vocab_size is not None and values["vocab_size"] < vocab_size:
        raise ConfigError(
            f"model.vocab_size={values['vocab_size']} is smaller than the "
            f"tokenizer's vocabulary ({vocab_size}); use -1 to follow the tokenizer"
        )
    model = ModelConfig.from_mapping(values)
    if config.data.block_size > model.max_block_size:
        raise ConfigError(
            f"data.block_size={config.data.block_size} exceeds what "
            f"model.max_position_embeddings={model.max_position_embeddings} allows "
            f"({model.max_block_size} tokens {model.position_note})"
        )
    return model


def head_spec(config: ml_collections.ConfigDict) -> Spec | None:
    """The parsed ``guidance.heads`` (also used to measure the baseline), or None if empty.
    Registered patterns (``guidance.register_pattern``, e.g. in the config file) may be named."""
    if not config.guidance.heads.strip():
        if config.guidance.enabled:
            raise ConfigError("guidance.enabled is true but guidance.heads is empty")
        return None
    return parse_spec(
        config.guidance.heads,
        tokens=_split_paths(config.guidance.tokens),
        start_layer=config.guidance.start_layer,
        start_layer_groups=config.guidance.get("start_layer_groups", "all"),
    )


# How a run is laid out on devices, not what it computes: these may change between restarts
# (checkpoints restore onto any mesh).
LAYOUT_KEYS = (
    "mesh.",
    "model.remat",
    "model.attention",
    "data.cache_dir",
    "data.tfds_data_dir",
    "data.prefetch",
    "data.max_inline_bytes",  # only where the corpus is tokenized
    "train.diagnostics",  # only adds metrics
)
# Keys added after runs were first written, with the value those runs had implicitly: a saved
# config without them resumes when they hold it.
ADDED_KEYS = {
    "model.model_type": "roberta",
    "model.attention": "dense",
    "model.from_dir": "",
    "data.tokenizer_kind": "bpe",
    "train.init_from": "",
    "train.keep_steps": "",
    "data.documents": "line",
    "data.text_field": "text",
    "data.tokenizer_max_documents": 1_000_000,
    "data.document_masks": False,
    "data.mlm_targets": "no_specials",
    "train.epochs": 0.0,
    "train.per_device_batch_size": 0,
    "guidance.start_layer_groups": "all",
    "data.format": "documents",
}


def check_workdir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
    """A workdir belongs to one config: resuming it with another would mix two runs."""
    saved = as_path(workdir) / "config.json"
    if not saved.exists():
        return
    previous = json.loads(saved.read_text())
    current = json.loads(config.to_json())
    diffs = [
        (key, old, new)
        for key, old, new in _config_diff(previous, current)
        if not key.startswith(LAYOUT_KEYS)
        and not (old is None and key in ADDED_KEYS and new == ADDED_KEYS[key])
        # steps counted from epochs are recorded once the corpus is read (epochs are compared)
        and not (key == "train.steps" and config.train.get("epochs", 0) > 0)
    ]
    if diffs:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:8])
        raise ConfigError(
            f"workdir {workdir} holds a run of a different config ({shown}); "
            f"use a new --workdir or the same config"
        )


def _config_diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for key in sorted(set(a) | set(b))
            for d in _config_diff(a.get(key), b.get(key), f"{prefix}{key}.")
        ]
    return [] if a == b else [(prefix.rstrip("."), a, b)]
