"""HuggingFace ``config.json`` ↔ our model config: model directories as the reference ships
them (RoBERTa, its attention-only variant, or BERT, beside the tokenizer's files), and the
``config.json`` we write when exporting.

``--config.model.from_dir=DIR`` builds the model that ``DIR/config.json`` describes and uses the
tokenizer in DIR. Every key of the file is either mapped onto the ``model`` config section,
checked to hold the one value we implement, or listed as bookkeeping with no effect on MLM
pretraining; anything else is an error naming the key and the file, so a config we would
build differently from the reference never runs silently.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from etils import epath

from guided_jax.data.tokenizer import Tokenizer, has_tokenizer_files, read_json_object
from guided_jax.model.config import ModelConfig
from guided_jax.storage import as_path

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"  # beside config.json in a HuggingFace directory

# config.json key -> model config key, for the keys every file must give.
REQUIRED_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
}
# Optional keys, with HuggingFace's defaults for RobertaConfig and BertConfig alike.
OPTIONAL_KEYS = {
    "hidden_dropout_prob": ("dropout", 0.1),
    "attention_probs_dropout_prob": ("attention_dropout", 0.1),
    "initializer_range": ("initializer_range", 0.02),
}
FLOAT_KEYS = frozenset(
    {"layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range"}
)
# Keys whose value must be the one thing our encoder does (HuggingFace's default for each).
FIXED_VALUES: dict[str, Any] = {
    "hidden_act": "gelu",  # exact (erf) GELU
    "position_embedding_type": "absolute",
    "is_decoder": False,
    "add_cross_attention": False,
    "pruned_heads": {},
    "tie_word_embeddings": True,
    "chunk_size_feed_forward": 0,
}
# Bookkeeping that does not change MLM pretraining: generation and label settings, the pooler
# (a masked-LM model has none), output switches, and the file's provenance. bos/eos ids are
# ignored because blocks take their first and last tokens from the tokenizer itself.
IGNORED_KEYS = frozenset({
    "_name_or_path", "bad_words_ids", "bos_token_id", "classifier_dropout",
    "decoder_start_token_id", "directionality", "do_sample", "early_stopping", "eos_token_id",
    "eos_token_ids", "finetuning_task", "gradient_checkpointing", "id2label", "label2id",
    "length_penalty", "max_length", "min_length", "no_repeat_ngram_size", "num_beams",
    "num_labels", "num_return_sequences", "output_attentions", "output_hidden_states",
    "output_past", "pooler_fc_size", "pooler_num_fc_layers", "pooler_size_per_head",
    "pooler_type", "problem_type", "repetition_penalty", "return_dict", "sep_token_id",
    "temperature", "top_k", "top_p", "torch_dtype", "torchscript", "transformers_version",
    "use_bfloat16", "use_cache",
    "dtype",  # what transformers >= 4.56 writes instead of torch_dtype
})  # fmt: skip
# model_type -> (our model_type, attention-only?, architectures allowed with it). The
# reference builds a model from its config with AutoModelWithLMHead.from_config, which looks at
# model_type alone: a "bert" config naming BertForMaskedLMOnlyAttention (its
# filipino_config/self_attention_24) trains full BERT layers, so only an "*-only-attention"
# model_type gives layers without FFN.
MODEL_TYPES: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "roberta": ("roberta", False, ("RobertaForMaskedLM", "RobertaForMaskedLMOnlyAttention")),
    "roberta-only-attention": ("roberta", True, ("RobertaForMaskedLMOnlyAttention",)),
    "bert": ("bert", False, ("BertForMaskedLM", "BertForMaskedLMOnlyAttention")),
    "bert-only-attention": ("bert", True, ("BertForMaskedLMOnlyAttention",)),
}
# Our model_type -> the HuggingFace class that loads what we export.
HF_CLASSES = {"roberta": "RobertaForMaskedLM", "bert": "BertForMaskedLM"}
# HuggingFace's pad id when config.json gives none.
DEFAULT_PAD_IDS = {"roberta": 1, "bert": 0}
KNOWN_KEYS = (
    {"model_type", "architectures", "intermediate_size", "pad_token_id"}
    | set(REQUIRED_KEYS)
    | set(OPTIONAL_KEYS)
    | set(FIXED_VALUES)
    | IGNORED_KEYS
)


class ModelDirError(ValueError):
    """A model directory that cannot be read, or a config.json we would not build faithfully."""


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """What a model directory says: the ``model`` config values and the ids to check against
    its tokenizer."""

    path: epath.Path
    model: dict[str, Any]  # model config keys (model_type, sizes, eps, dropout, ...)
    pad_token_id: int

    @property
    def config_file(self) -> epath.Path:
        return self.path / CONFIG_FILE

    @property
    def has_tokenizer(self) -> bool:
        return has_tokenizer_files(self.path)


def read_model_dir(directory: str | os.PathLike[str]) -> ModelDir:
    """Reads and checks ``directory/config.json``; raises ModelDirError naming what is wrong."""
    path = as_path(directory)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise ModelDirError(f"model.from_dir: {str(path)!r} {what}")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ModelDirError(
            f"model.from_dir: {str(path)!r} has no {CONFIG_FILE} (a HuggingFace-style model "
            f"config, as in the reference's ag_config/ directories)"
        )
    return ModelDir(path, *_map(read_json_object(file, ModelDirError), file))


def _map(values: dict[str, Any], file: epath.Path) -> tuple[dict[str, Any], int]:
    where = f"in {str(file)!r}"
    unknown = sorted(set(values) - KNOWN_KEYS)
    if unknown:
        raise ModelDirError(
            f"unsupported keys {unknown} {where}: neither model settings guided_jax builds nor "
            f"known bookkeeping (the keys it reads are listed in guided_jax/model/hf_config.py)"
        )
    model_type = values.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelDirError(
            f"unsupported model_type {model_type!r} {where}; expected one of {sorted(MODEL_TYPES)}"
        )
    our_type, attention_only, architectures = MODEL_TYPES[model_type]
    if "architectures" in values:
        given = values["architectures"]
        if not (isinstance(given, list) and len(given) == 1 and given[0] in architectures):
            raise ModelDirError(
                f"unsupported architectures {given!r} for model_type {model_type!r} {where}; "
                f"expected one of {[[a] for a in architectures]}"
            )
    wrong = [k for k, v in FIXED_VALUES.items() if k in values and values[k] != v]
    if wrong:
        given = ", ".join(f"{k}={values[k]!r}" for k in wrong)
        supported = ", ".join(f"{k}={FIXED_VALUES[k]!r}" for k in wrong)
        raise ModelDirError(f"unsupported {given} {where}; the encoder implements {supported}")
    required = dict(REQUIRED_KEYS)
    if not attention_only:  # attention-only layers have no FFN, whatever the file says
        required["intermediate_size"] = "intermediate_size"
    missing = sorted(set(required) - set(values))
    if missing:
        raise ModelDirError(f"missing keys {missing} {where}")
    model: dict[str, Any] = {"model_type": our_type}
    model.update({ours: _number(values, key, where) for key, ours in required.items()})
    for key, (ours, default) in OPTIONAL_KEYS.items():
        model[ours] = _number(values, key, where) if key in values else default
    if attention_only:
        model["intermediate_size"] = 0
    pad = _number(values, "pad_token_id", where) if values.get("pad_token_id") is not None else None
    return model, DEFAULT_PAD_IDS[our_type] if pad is None else pad


def _number(values: dict[str, Any], key: str, where: str) -> int | float:
    value = values[key]
    if key in FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ModelDirError(f"{key}={value!r} {where} must be a number")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelDirError(f"{key}={value!r} {where} must be an integer")
    return value


def model_config_of(directory: str | os.PathLike) -> ModelConfig:
    """The architecture ``DIR/config.json`` describes (checked as ``model.from_dir`` does)."""
    model_dir = read_model_dir(directory)
    return ModelConfig.from_mapping({**model_dir.model, "pad_token_id": model_dir.pad_token_id})


def hf_config(config: ModelConfig, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """``config.json`` for HF (and for ``model.from_dir``): the architecture as HF names it."""
    attention_only = config.intermediate_size == 0
    architecture = HF_CLASSES[config.model_type]
    model_type = config.model_type
    if attention_only:  # transformers has no such class; model.from_dir reads it
        architecture += "OnlyAttention"
        model_type += "-only-attention"
    values: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps,
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "initializer_range": config.initializer_range,
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
        "pad_token_id": config.pad_token_id,
    }
    if not attention_only:
        values["intermediate_size"] = config.intermediate_size
    if tokenizer is not None:
        values["bos_token_id"] = tokenizer.bos_id
        values["eos_token_id"] = tokenizer.eos_id
    return values


def architecture_differences(run: ModelConfig, weights: ModelConfig) -> list[str]:
    """``key: weights X vs run Y`` for each architecture key in which two models differ."""
    keys = (
        "model_type",
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
    )
    return [
        f"{k}: weights {getattr(weights, k)} vs run {getattr(run, k)}"
        for k in keys
        if getattr(run, k) != getattr(weights, k)
    ]
