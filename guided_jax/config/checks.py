"""Every value check of a run's config in one place: the values themselves, the mesh they must
fit, the weights of ``train.init_from`` and the steps of ``train.keep_steps``; each error names
the key and what was expected, before anything is written."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from guided_jax import sharding
from guided_jax.config.resolve import ConfigError, build_model_config, head_spec, resolve_config
from guided_jax.data.tables import PROTOCOLS, FinetuneError
from guided_jax.data.text import DOCUMENT_MODES, FORMATS
from guided_jax.data.tokenizer import KINDS, MLM_TARGETS
from guided_jax.model.hf_config import WEIGHTS_FILE, architecture_differences, model_config_of
from guided_jax.storage import as_path


def _value(config: ml_collections.ConfigDict, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = value[part]
    return value


def require_positive(
    config: ml_collections.ConfigDict, *keys: str, error: type[ValueError] = ConfigError
) -> None:
    """Raises ``error`` naming the first of the dotted ``keys`` whose value is not positive."""
    for key in keys:
        if not _value(config, key) > 0:
            raise error(f"config {key} must be positive, got {_value(config, key)}")


def _require_non_negative(
    config: ml_collections.ConfigDict, *keys: str, error: type[ValueError] = ConfigError
) -> None:
    for key in keys:
        if not _value(config, key) >= 0:
            raise error(f"config {key} must be >= 0, got {_value(config, key)}")


def _require_fraction(
    config: ml_collections.ConfigDict, *keys: str, error: type[ValueError] = ConfigError
) -> None:
    """Each of ``keys`` in [0, 1)."""
    for key in keys:
        if not 0.0 <= _value(config, key) < 1.0:
            raise error(f"config {key} must be in [0, 1), got {_value(config, key)}")


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> None:
    """Every check that needs no tokenizer or corpus (``model.from_dir`` and the weights of
    ``train.init_from`` are read), and, given the run's ``mesh``, that the batch fits it."""
    check_resolved_config(resolve_config(config)[0])
    parse_keep_steps(config.train.keep_steps, max(1, config.train.steps))
    check_init_from(config)
    if mesh is not None:
        check_mesh_fits(config, mesh)


def check_resolved_config(config: ml_collections.ConfigDict) -> None:
    """Every check of a resolved config that needs no tokenizer, corpus or devices."""
    require_positive(
        config,
        "train.batch_size",
        "train.learning_rate",
        "train.log_every",
        "train.grad_accum_steps",
        "train.keep_checkpoints",
        "train.adam_eps",
        "data.block_size",
        "data.tokenizer_vocab_size",
        "model.initializer_range",
    )
    if not 0 <= config.train.seed < 2**32:
        raise ConfigError(f"config train.seed must be in [0, 2**32), got {config.train.seed}")
    _require_non_negative(
        config,
        "train.eval_every",
        "train.eval_batches",
        "train.checkpoint_every",
        "train.weight_decay",
        "train.grad_clip_norm",
        "guidance.scale",
        "guidance.stagnant_steps",
        "data.tokenizer_max_documents",
        "data.prefetch",
        "data.max_inline_bytes",
    )
    _require_fraction(config, "train.adam_b1", "train.adam_b2", "data.eval_fraction")
    if config.train.batch_size % config.train.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} is not a multiple of "
            f"train.grad_accum_steps={config.train.grad_accum_steps}"
        )
    try:
        sharding.parse_rules(config.mesh.rules)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _require_non_negative(config, "train.epochs", "train.per_device_batch_size")
    if config.train.epochs > 0 and config.train.steps > 0:
        raise ConfigError(
            f"train.steps={config.train.steps} and train.epochs={config.train.epochs:g} are both "
            f"set, and a run has one length: set train.epochs=0 to train {config.train.steps} "
            f"steps, or train.steps=0 to count the steps from {config.train.epochs:g} epochs"
        )
    if config.train.epochs == 0:  # else checked once the steps are counted
        check_schedule(config)
    if config.data.block_size < 3:
        raise ConfigError(
            f"data.block_size={config.data.block_size} leaves no room for text between <s> and </s>"
        )
    if config.data.tokenizer_kind not in KINDS:
        raise ConfigError(
            f"data.tokenizer_kind must be one of {list(KINDS)}, got {config.data.tokenizer_kind!r}"
        )
    if config.data.documents not in DOCUMENT_MODES:
        raise ConfigError(
            f"data.documents must be one of {list(DOCUMENT_MODES)}, got {config.data.documents!r}"
        )
    if config.data.format not in FORMATS:
        raise ConfigError(f"data.format must be one of {list(FORMATS)}, got {config.data.format!r}")
    if config.data.mlm_targets not in MLM_TARGETS:
        raise ConfigError(
            f"data.mlm_targets must be one of {list(MLM_TARGETS)}, got {config.data.mlm_targets!r}"
        )
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


def check_schedule(config: ml_collections.ConfigDict) -> None:
    """Warm-up must fit in the run's steps."""
    require_positive(config, "train.steps")
    if config.train.warmup_steps < 0 or config.train.warmup_steps > config.train.steps:
        raise ConfigError(
            f"train.warmup_steps={config.train.warmup_steps} must be in "
            f"[0, train.steps={config.train.steps}]"
        )


def check_mesh_fits(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """The global batch must split evenly over the mesh's batch axes and the micro-batches."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.train.batch_size % (shards * config.train.grad_accum_steps):
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} must be a multiple of mesh data x fsdp "
            f"({shards}) x train.grad_accum_steps ({config.train.grad_accum_steps})"
        )


def step_at_fraction(fraction: float, total: int) -> int:
    """The step at ``fraction`` of ``total`` training steps: rounded, and at least step 1."""
    return max(1, round(fraction * total))


def parse_keep_steps(text: str, total: int) -> tuple[int, ...]:
    """The steps of ``train.keep_steps``: comma-separated step numbers or percentages of the
    run's ``total`` steps ("1%,100%"), which follow the steps counted from ``train.epochs``."""
    steps = set()
    for item in filter(None, (s.strip() for s in text.split(","))):
        number = item.removesuffix("%")
        try:
            value = float(number) if item.endswith("%") else int(number)
        except ValueError:
            raise ConfigError(
                f"train.keep_steps must be comma-separated step numbers or percentages of "
                f"train.steps (like 500 or 1%), got {text!r}"
            ) from None
        if item.endswith("%") and not 0 < value <= 100:
            raise ConfigError(
                f"train.keep_steps percentages must be in (0%, 100%], got {item!r} in {text!r}"
            )
        steps.add(step_at_fraction(value / 100, total) if item.endswith("%") else value)
    if any(s <= 0 for s in steps):
        raise ConfigError(f"train.keep_steps must hold positive steps, got {text!r}")
    return tuple(sorted(steps))


def check_init_from(config: ml_collections.ConfigDict) -> None:
    """``train.init_from`` must name a readable weights directory whose architecture is the
    run's (vocabulary size aside when ``model.vocab_size=-1``: it is known only with the
    tokenizer, and checked again when the weights are loaded). Reads only."""
    directory = config.train.get("init_from", "")
    if not directory:
        return
    try:
        weights = model_config_of(directory)
    except ValueError as error:
        raise ConfigError(f"train.init_from: {error}") from None
    if not (as_path(directory) / WEIGHTS_FILE).is_file():
        raise ConfigError(
            f"train.init_from: {str(as_path(directory) / WEIGHTS_FILE)!r} does not exist"
        )
    resolved, _ = resolve_config(config)
    vocab = weights.vocab_size if resolved.model.vocab_size == -1 else None
    run = build_model_config(resolved, vocab, weights.pad_token_id)
    differences = architecture_differences(run, weights)
    if differences:
        raise ConfigError(
            f"train.init_from: the weights in {str(directory)!r} are of another architecture "
            f"({'; '.join(differences)}); set --config.model.from_dir={directory} to build "
            f"the model they describe"
        )


def parse_seeds(text: str) -> list[int]:
    """The fine-tuning ``seeds``: comma-separated integers, each once."""
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise FinetuneError(f"seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise FinetuneError(f"seeds must name at least one seed, each once; got {text!r}")
    return seeds


def learning_rates(config: ml_collections.ConfigDict) -> list[float]:
    """The fine-tuning learning rates: the ``selected`` protocol's candidates
    (``learning_rates``, comma-separated; one value is used as it is), or the ``reference``
    protocol's fixed ``learning_rate``. Each protocol takes its own key only, so a rate set
    under the other name is an error rather than silently unused."""
    if config.get("protocol") == "reference":
        if "learning_rates" in config:
            raise FinetuneError(
                "config learning_rates: protocol='reference' trains at its fixed learning_rate "
                "(candidates are for protocol='selected')"
            )
        require_positive(config, "learning_rate", error=FinetuneError)
        return [float(config.learning_rate)]
    if "learning_rate" in config:
        raise FinetuneError(
            f"config learning_rate: protocol='selected' picks its rate on validation from "
            f"learning_rates; give one value to use it alone "
            f"(--config.learning_rates={config.learning_rate})"
        )
    text = str(config.get("learning_rates", ""))
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        rates = []
    if not rates or any(not 0.0 < r < float("inf") for r in rates) or len(set(rates)) != len(rates):
        raise FinetuneError(
            f"config learning_rates must be comma-separated positive rates, each once "
            f"(e.g. 1e-5,3e-5,1e-4,3e-4), got {text!r}"
        )
    return rates


def check_finetune_config(config: ml_collections.ConfigDict) -> None:
    """The values of a fine-tuning config (``configs/finetune.py``)."""
    error = FinetuneError
    require_positive(config, "batch_size", "epochs", "max_length", error=error)
    if config.max_length < 3:
        raise FinetuneError(f"max_length must be at least 3, got {config.max_length}")
    # eval_every 0: each epoch; patience 0: never stop early.
    keys = ("eval_every", "patience", "weight_decay", "split_seed")
    _require_non_negative(config, *keys, error=error)
    require_positive(config, "adam_eps", error=error)
    _require_non_negative(config, "grad_clip_norm", error=error)
    if config.protocol not in PROTOCOLS:
        raise FinetuneError(
            f"config protocol must be one of {list(PROTOCOLS)}, got {config.protocol!r}"
        )
    if config.protocol == "reference" and config.data.validation_file:
        raise FinetuneError(
            f"config data.validation_file must be empty with protocol='reference' (it trains "
            f"on the whole train split and validates nothing), got "
            f"{config.data.validation_file!r}"
        )
    learning_rates(config)
    _require_fraction(config, "warmup_fraction", "classifier_dropout", error=error)
    fraction = config.data.validation_fraction
    if not 0.0 < fraction < 1.0:
        raise FinetuneError(f"config data.validation_fraction must be in (0, 1), got {fraction}")
    parse_seeds(config.seeds)
