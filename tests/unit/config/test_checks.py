"""Every value check of guided_jax.config (checks.py and resolve.py) on configs/tiny.py and
configs/finetune.py with one value changed: each is triggered and its message names the key.
No tokenizer, corpus or training is needed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import pytest

from conftest import REPO
from guided_jax.config import ConfigError, check_config, load_config
from guided_jax.config.checks import (
    check_finetune_config,
    check_mesh_fits,
    check_resolved_config,
    parse_keep_steps,
    parse_seeds,
)
from guided_jax.config.resolve import build_model_config, check_workdir, head_spec, resolve_config
from guided_jax.data.tables import FinetuneError
from guided_jax.guidance import SpecError

TINY = load_config(str(REPO / "configs" / "tiny.py"))
FINETUNE = load_config(str(REPO / "configs" / "finetune.py"))
HF_ROBERTA = REPO / "tests" / "fixtures" / "hf" / "roberta"  # config.json, weights, tokenizer


def _changed(base, changes: dict[str, Any]):
    """A copy of ``base`` with ``{"section.key": value}`` applied."""
    config = base.copy_and_resolve_references()
    for key, value in changes.items():
        *sections, leaf = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[leaf] = value
    return config


def test_the_unchanged_configs_pass() -> None:
    check_config(TINY)
    check_resolved_config(resolve_config(TINY)[0])
    check_finetune_config(FINETUNE)
    assert head_spec(_changed(TINY, {"guidance.heads": " ", "guidance.enabled": False})) is None


POSITIVE_KEYS = [
    ("train.steps", 0),
    ("train.batch_size", 0),
    ("train.learning_rate", 0.0),
    ("train.log_every", -1),
    ("train.grad_accum_steps", 0),
    ("train.keep_checkpoints", 0),
    ("train.adam_eps", 0.0),
    ("data.block_size", 0),
    ("data.tokenizer_vocab_size", 0),
    ("model.initializer_range", 0.0),
]
NON_NEGATIVE_KEYS = [
    ("train.eval_every", -1),
    ("train.eval_batches", -1),
    ("train.checkpoint_every", -1),
    ("train.weight_decay", -0.1),
    ("train.grad_clip_norm", -1.0),
    ("guidance.scale", -1.0),
    ("guidance.stagnant_steps", -1),
    ("data.tokenizer_max_documents", -1),
    ("data.prefetch", -1),
    ("train.epochs", -1.0),
    ("train.per_device_batch_size", -2),
]
FRACTION_KEYS = [
    ("train.adam_b1", 1.0),
    ("train.adam_b2", -0.1),
    ("data.eval_fraction", 1.0),
    ("data.eval_fraction", float("nan")),
]
RANGE_CHECKS = (
    [(key, value, "must be positive") for key, value in POSITIVE_KEYS]
    + [(key, value, "must be >= 0") for key, value in NON_NEGATIVE_KEYS]
    + [(key, value, r"must be in \[0, 1\)") for key, value in FRACTION_KEYS]
)


@pytest.mark.parametrize(
    ("key", "value", "rule"), RANGE_CHECKS, ids=[f"{k}={v}" for k, v, _ in RANGE_CHECKS]
)
def test_values_out_of_range_are_refused(key: str, value, rule: str) -> None:
    config = _changed(TINY, {key: value})
    message = rf"^config {re.escape(key)} {rule}, got {re.escape(str(value))}$"
    with pytest.raises(ConfigError, match=message):
        check_resolved_config(config)
    with pytest.raises(ConfigError, match=message):
        check_config(config)


PALLAS = {"model.attention": "pallas", "model.attention_dropout": 0.0}
# (id, changes, error, message): every other check of check_resolved_config (and what it calls).
RESOLVED_CHECKS = [
    (
        "accumulation",
        {"train.grad_accum_steps": 3},
        ConfigError,
        r"train\.batch_size=4 is not a multiple of train\.grad_accum_steps=3",
    ),
    (
        "rules_form",
        {"mesh.rules": "embed"},
        ConfigError,
        r"mesh\.rules: 'embed' should be LOGICAL:MESH_AXIS",
    ),
    (
        "rules_axis",
        {"mesh.rules": "embed:pipeline"},
        ConfigError,
        r"mesh\.rules: 'embed:pipeline' names mesh axes \['pipeline'\]",
    ),
    (
        "rules_twice",
        {"mesh.rules": "embed:fsdp,embed:data"},
        ConfigError,
        r"mesh\.rules: logical axis 'embed' is mapped twice",
    ),
    ("seed_negative", {"train.seed": -1}, ConfigError, r"train\.seed must be in \[0, 2\*\*32\)"),
    ("seed_too_big", {"train.seed": 2**32}, ConfigError, r"train\.seed must be in \[0, 2\*\*32\)"),
    (
        "warmup_negative",
        {"train.warmup_steps": -1},
        ConfigError,
        r"train\.warmup_steps=-1 must be in \[0, train\.steps=6\]",
    ),
    (
        "warmup_past_steps",
        {"train.warmup_steps": 7},
        ConfigError,
        r"train\.warmup_steps=7 must be in \[0, train\.steps=6\]",
    ),
    (
        "block_size_small",
        {"data.block_size": 2},
        ConfigError,
        r"data\.block_size=2 leaves no room for text between <s> and </s>",
    ),
    (
        "tokenizer_kind",
        {"data.tokenizer_kind": "unigram"},
        ConfigError,
        r"data\.tokenizer_kind must be one of \['bpe', 'wordpiece'\], got 'unigram'",
    ),
    (
        "documents",
        {"data.documents": "page"},
        ConfigError,
        r"data\.documents must be one of \['line', 'paragraph'\], got 'page'",
    ),
    (
        "mlm_targets",
        {"data.mlm_targets": "everything"},
        ConfigError,
        r"data\.mlm_targets must be one of \['no_specials', 'reference'\], got 'everything'",
    ),
    (
        "mlm_probability_zero",
        {"data.mlm_probability": 0.0},
        ConfigError,
        r"data\.mlm_probability must be in \(0, 1\), got 0\.0",
    ),
    (
        "mlm_probability_one",
        {"data.mlm_probability": 1.0},
        ConfigError,
        r"data\.mlm_probability must be in \(0, 1\), got 1\.0",
    ),
    (
        "block_size_past_positions",
        {"data.block_size": 65},
        ConfigError,
        r"data\.block_size=65 exceeds what model\.max_position_embeddings=66 allows \(64 tokens",
    ),
    (
        "model_shape",
        {"model.num_heads": 5},
        ValueError,
        r"model\.hidden_size=32 is not divisible by model\.num_heads=5",
    ),
    (
        "document_masks_pallas",
        {"data.document_masks": True, **PALLAS},
        ConfigError,
        r"data\.document_masks=true needs per-document attention masks.*'pallas'",
    ),
    (
        "guidance_empty",
        {"guidance.heads": "  "},
        ConfigError,
        r"guidance\.enabled is true but guidance\.heads is empty",
    ),
    ("guidance_parse", {"guidance.heads": "next:x"}, SpecError, r"head count 'x' for next"),
    ("guidance_heads", {"guidance.heads": "0,1,1,4"}, SpecError, r"needs 6 heads .* has 4"),
    (
        "guidance_start_layer",
        {"guidance.start_layer": 2},
        SpecError,
        r"start layer 2 is out of range .* 2 layers",
    ),
    (
        "guidance_start_layer_groups",
        {"guidance.start_layer_groups": "heads"},
        SpecError,
        r"start layer groups must be one of \['all', 'tokens'\], got 'heads'",
    ),
    (
        "guidance_registered_pallas",
        {"guidance.heads": "next:1,window1:1", **PALLAS},
        ConfigError,
        r"guidance\.heads uses registered patterns \['window1'\].*model\.attention='pallas'",
    ),
]


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [case[1:] for case in RESOLVED_CHECKS],
    ids=[case[0] for case in RESOLVED_CHECKS],
)
def test_resolved_config_checks(changes: dict, error: type[Exception], match: str) -> None:
    config = _changed(TINY, changes)
    with pytest.raises(error, match=match):
        check_resolved_config(config)
    with pytest.raises(error, match=match):
        check_config(config)


def _mesh(data: int, fsdp: int, tensor: int) -> jax.sharding.Mesh:
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh((data, fsdp, tensor), ("data", "fsdp", "tensor"), axis_types=auto)


def test_the_batch_must_split_over_the_mesh_and_micro_batches() -> None:
    check_config(TINY, _mesh(2, 2, 2))  # 4 rows over data x fsdp = 4
    check_mesh_fits(TINY, _mesh(1, 4, 2))
    accumulated = _changed(TINY, {"train.grad_accum_steps": 2})
    with pytest.raises(
        ConfigError,
        match=r"train\.batch_size=4 must be a multiple of mesh data x fsdp \(4\) x "
        r"train\.grad_accum_steps \(2\)",
    ):
        check_config(accumulated, _mesh(2, 2, 2))
    with pytest.raises(ConfigError, match=r"train\.batch_size=4 .* data x fsdp \(8\)"):
        check_mesh_fits(TINY, _mesh(8, 1, 1))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("5,x", r"train\.keep_steps must be comma-separated step numbers or percentages .*'5,x'"),
        ("1.5", r"train\.keep_steps must be comma-separated step numbers or percentages"),
        ("0,5", r"train\.keep_steps must hold positive steps, got '0,5'"),
        ("-3", r"train\.keep_steps must hold positive steps, got '-3'"),
        ("0%", r"train\.keep_steps percentages must be in \(0%, 100%\], got '0%'"),
        ("5,101%", r"train\.keep_steps percentages must be in \(0%, 100%\], got '101%'"),
        ("x%", r"train\.keep_steps must be comma-separated step numbers or percentages"),
    ],
)
def test_keep_steps_are_positive_step_numbers_or_percentages(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_keep_steps(text, 1000)
    with pytest.raises(ConfigError, match=match):
        check_config(_changed(TINY, {"train.keep_steps": text}))


def test_keep_steps_are_parsed_sorted_and_unique() -> None:
    assert parse_keep_steps("", 1000) == ()
    assert parse_keep_steps("10, 5,10,", 1000) == (5, 10)


@pytest.mark.parametrize(
    ("text", "total", "steps"),
    [
        ("1%,100%", 10000, (100, 10000)),
        ("1%,100%", 1234, (12, 1234)),  # 12.34 rounds down
        ("1%,100%", 150, (2, 150)),  # 1.5 rounds to even
        ("1%,100%", 30, (1, 30)),  # 0.3 is at least step 1
        ("50%,7", 9, (4, 7)),  # 4.5 rounds to even; numbers and percentages mix
    ],
)
def test_keep_steps_percentages_are_of_the_total(text: str, total: int, steps: tuple) -> None:
    assert parse_keep_steps(text, total) == steps


def _config_only(tmp_path: Path) -> Path:
    """A model directory with the fixture's config.json but no weights."""
    directory = tmp_path / "config_only"
    directory.mkdir()
    shutil.copy(HF_ROBERTA / "config.json", directory / "config.json")
    return directory


def test_init_from_must_name_weights_of_the_runs_architecture(tmp_path: Path) -> None:
    fits = _changed(TINY, {"train.init_from": str(HF_ROBERTA), "model.max_position_embeddings": 40})
    check_config(fits)  # same architecture (the vocabulary follows the weights' with -1)
    cases = [
        (tmp_path / "nowhere", r"train\.init_from: .*nowhere' does not exist"),
        (tmp_path, r"train\.init_from: .* has no config\.json"),
        (_config_only(tmp_path), r"train\.init_from: '.*model\.safetensors' does not exist"),
        (
            HF_ROBERTA,
            r"train\.init_from: the weights in .* are of another architecture "
            r"\(max_position_embeddings: weights 40 vs run 66\)",
        ),
    ]
    for directory, match in cases:
        with pytest.raises(ConfigError, match=match):
            check_config(_changed(TINY, {"train.init_from": str(directory)}))


FINETUNE_CHECKS = [
    ("batch_size", {"batch_size": 0}, r"^config batch_size must be positive, got 0$"),
    ("epochs", {"epochs": 0}, r"^config epochs must be positive, got 0$"),
    (
        "learning_rates_zero",
        {"learning_rates": "1e-4,0"},
        r"^config learning_rates must be comma-separated positive rates, each once .*'1e-4,0'$",
    ),
    ("learning_rates_text", {"learning_rates": "fast"}, r"learning_rates must be .*got 'fast'$"),
    ("learning_rates_repeated", {"learning_rates": "1e-4,1e-4"}, r"each once"),
    ("learning_rates_empty", {"learning_rates": ""}, r"learning_rates must be .*got ''$"),
    (
        "learning_rate_in_selected",
        {"learning_rate": 1e-4},
        r"^config learning_rate: protocol='selected' picks its rate on validation from "
        r"learning_rates; .*--config\.learning_rates=0\.0001\)$",
    ),
    (
        "learning_rates_in_reference",
        {"protocol": "reference", "learning_rates": "1e-4"},
        r"^config learning_rates: protocol='reference' trains at its fixed learning_rate",
    ),
    ("max_length", {"max_length": -1}, r"^config max_length must be positive, got -1$"),
    ("max_length_short", {"max_length": 2}, r"max_length must be at least 3, got 2"),
    ("eval_every", {"eval_every": -1}, r"^config eval_every must be >= 0, got -1$"),
    ("patience", {"patience": -1}, r"^config patience must be >= 0, got -1$"),
    ("weight_decay", {"weight_decay": -0.1}, r"^config weight_decay must be >= 0, got -0\.1$"),
    ("split_seed", {"split_seed": -1}, r"^config split_seed must be >= 0, got -1$"),
    ("warmup", {"warmup_fraction": 1.0}, r"^config warmup_fraction must be in \[0, 1\), got 1\.0$"),
    ("dropout", {"classifier_dropout": -0.1}, r"^config classifier_dropout must be in \[0, 1\)"),
    (
        "validation_fraction",
        {"data.validation_fraction": 0.0},
        r"^config data.validation_fraction must be in \(0, 1\), got 0\.0$",
    ),
    ("seeds_not_integers", {"seeds": "1,x"}, r"seeds must be comma-separated integers, got '1,x'"),
    ("seeds_empty", {"seeds": " , "}, r"seeds must name at least one seed, each once; got ' , '"),
    ("seeds_repeated", {"seeds": "1,2,1"}, r"seeds must name at least one seed, each once"),
]


@pytest.mark.parametrize(
    ("changes", "match"),
    [case[1:] for case in FINETUNE_CHECKS],
    ids=[case[0] for case in FINETUNE_CHECKS],
)
def test_finetune_config_checks(changes: dict, match: str) -> None:
    with pytest.raises(FinetuneError, match=match):
        check_finetune_config(_changed(FINETUNE, changes))


def test_seeds_are_parsed_in_order() -> None:
    assert parse_seeds("3, 1,2") == [3, 1, 2]
    assert parse_seeds(7) == [7]
    with pytest.raises(FinetuneError, match="seeds must be comma-separated integers"):
        parse_seeds("1.5")


def test_model_vocabulary_must_hold_the_tokenizers() -> None:
    config = _changed(TINY, {"model.vocab_size": 500})
    assert build_model_config(config, vocab_size=500).vocab_size == 500
    with pytest.raises(
        ConfigError,
        match=r"model\.vocab_size=500 is smaller than the tokenizer's vocabulary \(600\); use -1",
    ):
        build_model_config(config, vocab_size=600)
    assert build_model_config(TINY, vocab_size=600).vocab_size == 600  # -1 follows it
    with pytest.raises(ConfigError, match=r"data\.block_size=65 exceeds .*=66"):
        build_model_config(_changed(TINY, {"data.block_size": 65}), vocab_size=600)


def test_from_dir_errors_name_the_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere' does not exist"):
        resolve_config(_changed(TINY, {"model.from_dir": str(tmp_path / "nowhere")}))
    directory = _config_only(tmp_path)
    config = _changed(TINY, {"model.from_dir": str(directory)})
    with pytest.raises(
        ConfigError, match=r"model\.from_dir: '.*config_only' has no tokenizer files.*tokenizer_dir"
    ):
        resolve_config(config)
    config.data.tokenizer_dir = str(HF_ROBERTA)  # a tokenizer elsewhere completes it
    resolved, model_dir = resolve_config(config)
    assert resolved.model.max_position_embeddings == 40 and model_dir.path == directory
    bad = json.loads((directory / "config.json").read_text()) | {"hidden_act": "relu"}
    (directory / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match=r"unsupported hidden_act='relu'"):
        resolve_config(config)


def test_a_workdir_belongs_to_one_config(tmp_path: Path) -> None:
    check_workdir(TINY, tmp_path)  # nothing saved yet
    (tmp_path / "config.json").write_text(TINY.to_json())
    check_workdir(TINY, tmp_path)
    check_workdir(_changed(TINY, {"mesh.data": 2, "model.attention": "flash"}), tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"workdir .* holds a run of a different config \(train\.steps: 6 -> 7\); use a new",
    ):
        check_workdir(_changed(TINY, {"train.steps": 7}), tmp_path)
    # A key added after the run was written resumes at the value the run had implicitly.
    saved = json.loads(TINY.to_json())
    del saved["data"]["document_masks"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_workdir(TINY, tmp_path)
    with pytest.raises(ConfigError, match=r"data\.document_masks: None -> True"):
        check_workdir(_changed(TINY, {"data.document_masks": True}), tmp_path)


def test_outputs_at_unsupported_urls_are_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from guided_jax.analysis import finetune, reproduce
    from guided_jax.storage import StorageError
    from guided_jax.weights.hf import export

    monkeypatch.chdir(tmp_path)
    url = "s3://bucket/run"
    calls = [
        ("--workdir", lambda: reproduce.train_arms(TINY, url)),
        ("--workdir", lambda: finetune.run(TINY, "runs/pretrained", url)),
        ("--out", lambda: export(None, None, url)),
    ]
    for flag, call in calls:
        with pytest.raises(StorageError, match=rf"^{flag} 's3://bucket/run': expected a local"):
            call()
    assert list(tmp_path.iterdir()) == []
