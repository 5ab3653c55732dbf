"""Everything a run needs before its first step, checked before a file is written.

:func:`prepare` resolves the config (:func:`resolve_config`: a ``model.from_dir`` directory's
model and tokenizer, the tokenizer kind), validates it, refuses a workdir that holds another
config's run, loads or trains the tokenizer, reads and packs the corpus, and only then writes
``WORKDIR/config.json`` (the resolved config) and ``WORKDIR/tokenizer/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from guided_jax import data, pipeline, sharding, sources, token_cache
from guided_jax.guidance import Spec, parse_spec
from guided_jax.model import ModelConfig
from guided_jax.model_dir import DEFAULT_PAD_IDS, ModelDir, read_model_dir
from guided_jax.tokenizer import (
    KINDS,
    Tokenizer,
    detect_kind,
    has_tokenizer_files,
    load_tokenizer,
    train_tokenizer,
)


class ConfigError(ValueError):
    """A config value that cannot work, or a workdir that belongs to another config."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything resolved from the config and the corpus before a file is written."""

    config: ml_collections.ConfigDict
    model: ModelConfig
    spec: Spec | None  # a HeadSpec, or a LayeredSpec for "layers=..." specs
    token_ids: tuple[int, ...]
    tokenizer: Tokenizer
    train_blocks: np.ndarray  # [N, block_size] int32; a read-only memmap of the token cache
    eval_blocks: np.ndarray
    # [N, block_size] uint8, 1 where a document starts; only with data.document_masks.
    train_starts: np.ndarray | None = None
    eval_starts: np.ndarray | None = None


def _split_paths(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def corpus_sources(config: ml_collections.ConfigDict, key: str) -> list[sources.Source]:
    """The sources of ``data.<key>`` (see :mod:`guided_jax.sources`); an empty train value is
    the embedded default corpus, an empty eval value none."""
    found = sources.parse_sources(config.data[key], f"data.{key}", config.data)
    if not found and key == "train_files":
        return [sources.DefaultCorpus()]
    return found


def _check_positive(config: ml_collections.ConfigDict, *keys: str) -> None:
    for key in keys:
        section, name = key.split(".")
        value = config[section][name]
        if value <= 0:
            raise ConfigError(f"config {key} must be positive, got {value}")


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
    are replaced), and ``data.tokenizer_dir`` becomes DIR unless it names another directory.
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
    return config, model_dir


def check_model_dir_tokenizer(model_dir: ModelDir, tokenizer: Tokenizer) -> None:
    """The tokenizer must fit the embedding table and pad where the model expects pads."""
    source = f"tokenizer in {str(tokenizer.directory)!r}"
    if tokenizer.vocab_size > model_dir.model["vocab_size"]:
        raise ConfigError(
            f"the {source} has {tokenizer.vocab_size} tokens, more than vocab_size="
            f"{model_dir.model['vocab_size']} in {str(model_dir.config_file)!r}; use the "
            f"tokenizer the model was configured for"
        )
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
    )


def check_config(config: ml_collections.ConfigDict) -> None:
    """Value checks that need no tokenizer or corpus (``model.from_dir`` is read)."""
    _check_resolved_config(resolve_config(config)[0])


def _check_resolved_config(config: ml_collections.ConfigDict) -> None:
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
    if config.data.tokenizer_kind not in KINDS:
        raise ConfigError(
            f"data.tokenizer_kind must be one of {list(KINDS)}, got {config.data.tokenizer_kind!r}"
        )
    if config.data.documents not in data.DOCUMENT_MODES:
        raise ConfigError(
            f"data.documents must be one of {list(data.DOCUMENT_MODES)}, got "
            f"{config.data.documents!r}"
        )
    for key in ("tokenizer_max_documents", "prefetch"):
        if config.data[key] < 0:
            raise ConfigError(f"config data.{key} must be >= 0, got {config.data[key]}")
    if not 0.0 < config.data.mlm_probability < 1.0:
        raise ConfigError(
            f"data.mlm_probability must be in (0, 1), got {config.data.mlm_probability}"
        )
    model = build_model_config(config, vocab_size=None)  # shape checks; vocab checked later
    if config.data.get("document_masks", False) and model.attention == "pallas":
        raise ConfigError(
            "data.document_masks=true needs per-document attention masks, which "
            "model.attention='pallas' does not apply; use 'dense' or 'flash'"
        )
    spec = head_spec(config)
    if spec is not None:
        spec.validate(num_heads=model.num_heads, num_layers=model.num_layers)
        if spec.user_patterns and model.attention not in ("dense", "flash"):
            raise ConfigError(
                f"guidance.heads uses registered patterns {list(spec.user_patterns)}, which "
                f"model.attention={model.attention!r} cannot score; use 'dense' or 'flash'"
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
}


def check_workdir(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """A workdir belongs to one config: resuming it with another would mix two runs."""
    saved = workdir / "config.json"
    if not saved.exists():
        return
    previous = json.loads(saved.read_text())
    current = json.loads(config.to_json())
    diffs = [
        (key, old, new)
        for key, old, new in _config_diff(previous, current)
        if not key.startswith(LAYOUT_KEYS)
        and not (old is None and key in ADDED_KEYS and new == ADDED_KEYS[key])
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


def _tokenizer(
    config: ml_collections.ConfigDict, workdir: Path, train_sources: list[sources.Source]
) -> tuple[Tokenizer, str | None]:
    """The configured tokenizer, the one of a previous run in WORKDIR, or a new one trained on
    (a sample of ``data.tokenizer_max_documents`` documents of) the training sources into a
    temporary directory (moved into WORKDIR once every check passed)."""
    if config.data.tokenizer_dir:
        return load_tokenizer(config.data.tokenizer_dir), None
    if has_tokenizer_files(workdir / "tokenizer"):
        tokenizer = load_tokenizer(workdir / "tokenizer")
        if tokenizer.kind != config.data.tokenizer_kind:
            raise ConfigError(
                f"workdir {workdir} holds a {tokenizer.kind} tokenizer, but data.tokenizer_kind="
                f"{config.data.tokenizer_kind!r}; use a new --workdir or the same kind"
            )
        return tokenizer, None
    texts = sources.sample_documents(
        train_sources, config.data.tokenizer_max_documents, config.train.seed
    )
    scratch = tempfile.mkdtemp(prefix="guided_jax_tokenizer_")
    kind = config.data.tokenizer_kind
    return train_tokenizer(texts, config.data.tokenizer_vocab_size, scratch, kind=kind), scratch


def cache_dir(config: ml_collections.ConfigDict, workdir: Path) -> Path:
    """Where token cache entries live: ``data.cache_dir``, by default ``WORKDIR/token_cache``."""
    return Path(config.data.cache_dir) if config.data.cache_dir else workdir / "token_cache"


class _Blocks:
    """The packed blocks of some sources: found in the token cache, or built into a scratch
    directory that :meth:`keep` moves into the cache once every check passed."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: Path,
        tokenizer: Tokenizer,
        found: list[sources.Source],
        what: str,
    ) -> None:
        self.scratch: Path | None = None
        self.with_starts = bool(config.data.get("document_masks", False))
        self.starts: np.ndarray | None = None
        block_size = config.data.block_size
        if len(found) == 1 and isinstance(found[0], sources.CachedBlocks):
            path = found[0].path
            self.blocks = _cached_source_blocks(path, tokenizer, block_size)
            if self.with_starts:
                self.starts = token_cache.load_starts(path)
                if self.starts is None:
                    raise ConfigError(
                        f"token cache {path!r} records no document starts, which "
                        f"data.document_masks=true needs; use the text sources themselves (the "
                        f"run builds a cache entry with them) or set data.document_masks=false"
                    )
            return
        self.key, meta = token_cache.cache_key(
            tokenizer,
            sources.fingerprint(found),
            block_size,
            separator="\n",
            document_starts=self.with_starts,
        )
        self.final = cache_dir(config, workdir) / self.key
        blocks = token_cache.load(self.final)
        if blocks is not None:
            self.blocks = blocks
            self.starts = self._load_starts()
            return
        parent = self.final.parent if self.final.parent.is_dir() else None
        self.scratch = Path(tempfile.mkdtemp(prefix="guided_jax_tokens_", dir=parent))
        try:
            self.blocks = token_cache.build(
                sources.documents(found),
                tokenizer,
                block_size,
                self.scratch / self.key,
                {**meta, "what": what, "described": [s.describe() for s in found]},
                total=sources.count_documents(found),
                description=f"tokenize {what}",
                document_starts=self.with_starts,
            )
            if self.with_starts:
                self.starts = token_cache.load_starts(self.scratch / self.key)
        except BaseException:
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise

    def keep(self) -> np.ndarray:
        """Moves a freshly built entry into the cache and returns its blocks from there."""
        if self.scratch is not None:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            if token_cache.load(self.final) is None:
                shutil.rmtree(self.final, ignore_errors=True)
                shutil.move(self.scratch / self.key, self.final)
            self.discard()
            loaded = token_cache.load(self.final)
            assert loaded is not None
            self.blocks = loaded
            self.starts = self._load_starts()
        return self.blocks

    def _load_starts(self) -> np.ndarray | None:
        """The entry's document-start flags when the config asks for them."""
        if not self.with_starts:
            return None
        starts = token_cache.load_starts(self.final)
        assert starts is not None  # the key of an entry with starts differs from one without
        return starts

    def discard(self) -> None:
        """Removes the scratch directory (its blocks are copied into memory first)."""
        if self.scratch is not None:
            self.blocks = np.array(self.blocks)
            self.starts = None if self.starts is None else np.array(self.starts)
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def _cached_source_blocks(path: str, tokenizer: Tokenizer, block_size: int) -> np.ndarray:
    """The blocks of a ``cache:DIR`` source, checked against the tokenizer and block size."""
    meta = token_cache.read_meta(path)
    if meta.get("block_size") != block_size:
        raise ConfigError(
            f"token cache {path!r} holds blocks of {meta.get('block_size')}, but "
            f"data.block_size={block_size}"
        )
    if meta.get("tokenizer") != token_cache.tokenizer_fingerprint(tokenizer):
        raise ConfigError(
            f"token cache {path!r} was made with another tokenizer than the one in "
            f"{str(tokenizer.directory)!r}; set data.tokenizer_dir to the tokenizer that built it"
        )
    blocks = token_cache.load(path)
    assert blocks is not None
    return blocks


def prepare(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, write: bool = True
) -> Experiment:
    """Resolves config, tokenizer and data; raises before writing anything on bad input.

    The corpus is tokenized once into the token cache (:func:`cache_dir`); a rerun finds it
    there and reads nothing else. ``write=False`` (every process but the first of a multi-host
    run) only reads WORKDIR and the cache."""
    workdir = Path(workdir)
    config, model_dir = resolve_config(config)
    _check_resolved_config(config)
    check_workdir(config, workdir)
    train_sources = corpus_sources(config, "train_files")
    eval_sources = corpus_sources(config, "eval_files")
    tokenizer, scratch = _tokenizer(config, workdir, train_sources)
    built: list[_Blocks] = []
    try:
        if model_dir is not None:
            check_model_dir_tokenizer(model_dir, tokenizer)
        model = build_model_config(config, tokenizer.vocab_size, tokenizer.pad_id)
        spec = head_spec(config)
        token_ids = spec.token_ids(tokenizer) if spec is not None else ()
        built.append(_Blocks(config, workdir, tokenizer, train_sources, "train"))
        if eval_sources:
            built.append(_Blocks(config, workdir, tokenizer, eval_sources, "eval"))
        # A corpus smaller than one batch fails here, before anything is written.
        _split(config, [b.blocks for b in built])
        if write:
            workdir.mkdir(parents=True, exist_ok=True)
            if scratch is not None:
                shutil.copytree(scratch, workdir / "tokenizer", dirs_exist_ok=True)
                tokenizer = load_tokenizer(workdir / "tokenizer")
            for part in built:
                part.keep()
            (workdir / "config.json").write_text(config.to_json(indent=2))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        for part in built:
            part.discard()
    train_blocks, eval_blocks = _split(config, [b.blocks for b in built])
    starts: tuple[np.ndarray | None, np.ndarray | None] = (None, None)
    if config.data.get("document_masks", False):
        starts = _split(config, [b.starts for b in built])
    return Experiment(config, model, spec, token_ids, tokenizer, train_blocks, eval_blocks, *starts)


def _split(
    config: ml_collections.ConfigDict, parts: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) blocks: a separate eval corpus, or the tail of the training blocks."""
    if len(parts) == 2:
        train_blocks, eval_blocks = parts
    else:
        train_blocks, eval_blocks = data.split_blocks(parts[0], config.data.eval_fraction)
    pipeline.batch_dataset(train_blocks, config.train.batch_size, config.train.seed)
    return train_blocks, eval_blocks
