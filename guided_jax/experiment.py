"""Everything a run needs before its first step, checked before a file is written.

:func:`prepare` validates the config, refuses a workdir that holds another config's run,
loads or trains the tokenizer, reads and packs the corpus, and only then writes
``WORKDIR/config.json`` and ``WORKDIR/tokenizer/``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from guided_jax import data, sharding
from guided_jax.guidance import HeadSpec
from guided_jax.model import ModelConfig
from guided_jax.tokenizer import Tokenizer, load_tokenizer, train_tokenizer


class ConfigError(ValueError):
    """A config value that cannot work, or a workdir that belongs to another config."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything resolved from the config and the corpus before a file is written."""

    config: ml_collections.ConfigDict
    model: ModelConfig
    spec: HeadSpec | None
    token_ids: tuple[int, ...]
    tokenizer: Tokenizer
    train_blocks: np.ndarray
    sampler: data.BatchSampler
    eval_blocks: np.ndarray


def _split_paths(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def corpus_files(value: str, key: str) -> list[str]:
    """Comma-separated paths or globs → files; a glob that matches nothing is an error."""
    files: list[str] = []
    for item in _split_paths(value):
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise ConfigError(f"{key}: the pattern {item!r} matches no file")
            files.extend(matches)
        else:
            files.append(item)
    return files


def _check_positive(config: ml_collections.ConfigDict, *keys: str) -> None:
    for key in keys:
        section, name = key.split(".")
        value = config[section][name]
        if value <= 0:
            raise ConfigError(f"config {key} must be positive, got {value}")


def build_model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    values = config.model.to_dict()
    if values.get("vocab_size", -1) == -1:
        values["vocab_size"] = vocab_size
    elif values["vocab_size"] < vocab_size:
        raise ConfigError(
            f"model.vocab_size={values['vocab_size']} is smaller than the "
            f"tokenizer's vocabulary ({vocab_size}); use -1 to follow the tokenizer"
        )
    model = ModelConfig.from_mapping(values)
    if config.data.block_size > model.max_block_size:
        raise ConfigError(
            f"data.block_size={config.data.block_size} exceeds what "
            f"model.max_position_embeddings={model.max_position_embeddings} allows "
            f"({model.max_block_size} tokens with RoBERTa's padding offset)"
        )
    return model


def head_spec(config: ml_collections.ConfigDict) -> HeadSpec | None:
    """The parsed ``guidance.heads`` (also used to measure the baseline), or None if empty."""
    if not config.guidance.heads.strip():
        if config.guidance.enabled:
            raise ConfigError("guidance.enabled is true but guidance.heads is empty")
        return None
    return HeadSpec.parse(
        config.guidance.heads,
        tokens=_split_paths(config.guidance.tokens),
        start_layer=config.guidance.start_layer,
    )


def check_config(config: ml_collections.ConfigDict) -> None:
    """Value checks that need no tokenizer or corpus."""
    _check_positive(
        config,
        "train.steps",
        "train.batch_size",
        "train.learning_rate",
        "train.log_every",
        "train.grad_accum_steps",
        "data.block_size",
    )
    if config.train.batch_size % config.train.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} is not a multiple of "
            f"train.grad_accum_steps={config.train.grad_accum_steps}"
        )
    try:
        sharding.parse_rules(config.mesh.rules)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if config.train.warmup_steps < 0 or config.train.warmup_steps > config.train.steps:
        raise ConfigError(
            f"train.warmup_steps={config.train.warmup_steps} must be in "
            f"[0, train.steps={config.train.steps}]"
        )
    if config.data.block_size < 3:
        raise ConfigError(
            f"data.block_size={config.data.block_size} leaves no room for text between <s> and </s>"
        )
    if not 0.0 < config.data.mlm_probability < 1.0:
        raise ConfigError(
            f"data.mlm_probability must be in (0, 1), got {config.data.mlm_probability}"
        )
    model = build_model_config(config, vocab_size=512)  # shape checks; vocab resolved later
    spec = head_spec(config)
    if spec is not None:
        spec.validate(num_heads=model.num_heads, num_layers=model.num_layers)


# How a run is laid out on devices, not what it computes: these may change between restarts
# (checkpoints restore onto any mesh).
LAYOUT_KEYS = ("mesh.", "model.remat")


def check_workdir(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """A workdir belongs to one config: resuming it with another would mix two runs."""
    saved = workdir / "config.json"
    if not saved.exists():
        return
    previous = json.loads(saved.read_text())
    current = json.loads(config.to_json())
    diffs = [d for d in _config_diff(previous, current) if not d[0].startswith(LAYOUT_KEYS)]
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


def _tokenizer(
    config: ml_collections.ConfigDict, workdir: Path, texts: list[str]
) -> tuple[Tokenizer, str | None]:
    """The configured tokenizer, the one of a previous run in WORKDIR, or a new one trained on
    the corpus into a temporary directory (moved into WORKDIR once every check passed)."""
    if config.data.tokenizer_dir:
        return load_tokenizer(config.data.tokenizer_dir), None
    if (workdir / "tokenizer" / "vocab.json").exists():
        return load_tokenizer(workdir / "tokenizer"), None
    scratch = tempfile.mkdtemp(prefix="guided_jax_tokenizer_")
    return train_tokenizer(texts, config.data.tokenizer_vocab_size, scratch), scratch


def prepare(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, write: bool = True
) -> Experiment:
    """Resolves config, tokenizer and data; raises before writing anything on bad input.

    ``write=False`` (every process but the first of a multi-host run) only reads WORKDIR."""
    workdir = Path(workdir)
    check_config(config)
    check_workdir(config, workdir)
    train_texts = data.load_corpus(corpus_files(config.data.train_files, "data.train_files"))
    tokenizer, scratch = _tokenizer(config, workdir, train_texts)
    try:
        model = build_model_config(config, tokenizer.vocab_size)
        spec = head_spec(config)
        token_ids = spec.token_ids(tokenizer) if spec is not None else ()
        blocks = data.tokenize_and_pack(train_texts, tokenizer, config.data.block_size)
        if config.data.eval_files:
            eval_texts = data.read_text_files(
                corpus_files(config.data.eval_files, "data.eval_files")
            )
            train_blocks = blocks
            eval_blocks = data.tokenize_and_pack(eval_texts, tokenizer, config.data.block_size)
        else:
            train_blocks, eval_blocks = data.split_blocks(blocks, config.data.eval_fraction)
        # A corpus smaller than one batch fails here, before anything is written.
        sampler = data.BatchSampler(train_blocks, config.train.batch_size, config.train.seed)
        if write:
            workdir.mkdir(parents=True, exist_ok=True)
            if scratch is not None:
                shutil.copytree(scratch, workdir / "tokenizer", dirs_exist_ok=True)
                tokenizer = load_tokenizer(workdir / "tokenizer")
            (workdir / "config.json").write_text(config.to_json(indent=2))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return Experiment(config, model, spec, token_ids, tokenizer, train_blocks, sampler, eval_blocks)
