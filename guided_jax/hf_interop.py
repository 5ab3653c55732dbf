"""HuggingFace model directories: export our encoders and import theirs.

Export writes what ``transformers.RobertaForMaskedLM.from_pretrained`` (or
``BertForMaskedLM`` for ``model_type=bert``) reads: ``config.json``, ``model.safetensors``
(written with safetensors' numpy API: no torch needed) and the tokenizer's files. Import reads
such a directory — ours, or a HuggingFace checkpoint like roberta-base saved as safetensors —
into our parameters, e.g. to continue pretraining it with attention guidance
(``--config.model.from_dir=DIR --config.train.init_from=DIR``).

The two layouts differ only in names and shapes: our fused QKV kernel ``[3, d, H, hd]`` is
HF's three ``[d, d]`` query/key/value weights, our ``[in, out]`` kernels are HF's transposed
``[out, in]`` weights, and the MLM decoder is tied to the word embeddings on both sides (so
only its bias is stored).

    python -m guided_jax.hf_interop --workdir runs/default --out exported/default
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from guided_jax.model import ModelConfig
from guided_jax.model_dir import read_model_dir
from guided_jax.pretrained import Params, Pretrained, model_params
from guided_jax.tokenizer import (
    CONFIG_FILE as TOKENIZER_CONFIG_FILE,
)
from guided_jax.tokenizer import (
    MERGES_FILE,
    VOCAB_FILE,
    WORDPIECE_VOCAB_FILE,
    Tokenizer,
    has_tokenizer_files,
    load_tokenizer,
)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = (VOCAB_FILE, MERGES_FILE, WORDPIECE_VOCAB_FILE, TOKENIZER_CONFIG_FILE)
# model_type -> (HF class, prefix of encoder weights, MLM head's dense, its LayerNorm, its bias)
ARCHITECTURES = {
    "roberta": (
        "RobertaForMaskedLM",
        "roberta",
        "lm_head.dense",
        "lm_head.layer_norm",
        "lm_head.bias",
    ),
    "bert": (
        "BertForMaskedLM",
        "bert",
        "cls.predictions.transform.dense",
        "cls.predictions.transform.LayerNorm",
        "cls.predictions.bias",
    ),
}
# HF keys a checkpoint may hold that our MLM encoder has no use for: the pooler (a fine-tuning
# head), the position-id buffer, and the tied decoder (checked equal to what it is tied to).
_TIED = {
    "roberta": ("lm_head.decoder.weight", "lm_head.decoder.bias"),
    "bert": ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
}
_UNUSED_SUFFIXES = (".embeddings.position_ids",)
_UNUSED_PARTS = (".pooler.", "cls.seq_relationship.")


class InteropError(ValueError):
    """A directory or checkpoint that cannot be converted, with the file and key at fault."""


# ----------------------------------------------------------------------------- name mapping

# One entry per tensor: (our path, HF name, ours -> HF, HF -> ours given our shape).
Mapping = tuple[tuple[Any, ...], str, Callable[[np.ndarray], np.ndarray], Callable[..., np.ndarray]]


def _same(x: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    return x


def _transposed(x: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _flat_bias(x: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    return x.reshape(shape) if shape is not None else x.reshape(-1)


def _mappings(config: ModelConfig) -> Iterator[Mapping]:
    """Every parameter of the model of ``config`` and its HF name."""
    _, prefix, head_dense, head_norm, head_bias = ARCHITECTURES[config.model_type]
    d = config.hidden_size

    def norm(ours: tuple[Any, ...], theirs: str) -> Iterator[Mapping]:
        yield (*ours, "scale"), f"{theirs}.weight", _same, _same
        yield (*ours, "bias"), f"{theirs}.bias", _same, _same

    def dense(ours: tuple[Any, ...], theirs: str) -> Iterator[Mapping]:
        yield (*ours, "kernel"), f"{theirs}.weight", _transposed, _transposed
        yield (*ours, "bias"), f"{theirs}.bias", _same, _same

    emb = f"{prefix}.embeddings"
    yield ("embeddings", "word", "embedding"), f"{emb}.word_embeddings.weight", _same, _same
    yield ("embeddings", "position", "embedding"), f"{emb}.position_embeddings.weight", _same, _same
    yield (
        ("embeddings", "token_type", "embedding"),
        f"{emb}.token_type_embeddings.weight",
        _same,
        _same,
    )
    yield from norm(("embeddings", "norm"), f"{emb}.LayerNorm")
    for i in range(config.num_layers):
        layer = f"{prefix}.encoder.layer.{i}"
        for j, name in enumerate(("query", "key", "value")):
            yield (
                ("layers", i, "attention", "qkv", "kernel", j),
                f"{layer}.attention.self.{name}.weight",
                lambda x: np.ascontiguousarray(x.reshape(d, d).T),
                lambda x, shape: np.ascontiguousarray(x.T).reshape(shape),
            )
            yield (
                ("layers", i, "attention", "qkv", "bias", j),
                f"{layer}.attention.self.{name}.bias",
                _flat_bias,
                _flat_bias,
            )
        yield (
            ("layers", i, "attention", "out", "kernel"),
            f"{layer}.attention.output.dense.weight",
            lambda x: np.ascontiguousarray(x.reshape(d, d).T),
            lambda x, shape: np.ascontiguousarray(x.T).reshape(shape),
        )
        yield (
            ("layers", i, "attention", "out", "bias"),
            f"{layer}.attention.output.dense.bias",
            _same,
            _same,
        )
        yield from norm(("layers", i, "attention_norm"), f"{layer}.attention.output.LayerNorm")
        if config.intermediate_size:
            yield from dense(("layers", i, "ffn", "up"), f"{layer}.intermediate.dense")
            yield from dense(("layers", i, "ffn", "down"), f"{layer}.output.dense")
            yield from norm(("layers", i, "ffn_norm"), f"{layer}.output.LayerNorm")
    yield from dense(("head", "dense"), head_dense)
    yield from norm(("head", "norm"), head_norm)
    yield ("head", "bias"), head_bias, _same, _same


def _get(params: Params, path: tuple[Any, ...]) -> np.ndarray:
    node: Any = params
    for key in path:
        node = node[key]
    return np.asarray(node, dtype=np.float32)


def to_hf_tensors(params: Params, config: ModelConfig) -> dict[str, np.ndarray]:
    """Our parameters under HF's names and layouts (float32, contiguous)."""
    _check_type(config)
    return {name: to_hf(_get(params, path)) for path, name, to_hf, _ in _mappings(config)}


def from_hf_tensors(
    tensors: dict[str, np.ndarray], config: ModelConfig, source: str = "the checkpoint"
) -> Params:
    """HF-named tensors as our parameters for ``config``; every parameter must be there with
    its shape, and nothing may be left over but the pooler, position ids and tied decoder."""
    _check_type(config)
    tensors = {_modern_name(k): v for k, v in tensors.items()}
    from guided_jax.pretrained import init_params  # shapes of every parameter

    params = init_params(config, 0)
    used: set[str] = set()
    missing = []
    for path, name, _, from_hf in _mappings(config):
        if name not in tensors:
            missing.append(name)
            continue
        used.add(name)
        *parent_path, leaf = path
        parent: Any = params
        for key in parent_path:
            parent = parent[key]
        shape = np.shape(parent[leaf])
        value = from_hf(np.asarray(tensors[name], dtype=np.float32), shape)
        if value.shape != shape:
            raise InteropError(
                f"{name} in {source} has shape {np.shape(tensors[name])}, which does not fit "
                f"the model of {_describe(config)}"
            )
        parent[leaf] = value  # an int leaf is one slice of the fused QKV kernel or bias
    if missing:
        raise InteropError(f"{source} lacks {len(missing)} tensors of the model: {missing[:6]}")
    _check_tied(tensors, config, source)
    left = sorted(
        k
        for k in set(tensors) - used
        if k not in _TIED[config.model_type]
        and not k.endswith(_UNUSED_SUFFIXES)
        and not any(part in k for part in _UNUSED_PARTS)
    )
    if left:
        raise InteropError(
            f"{source} holds tensors the {ARCHITECTURES[config.model_type][0]} of "
            f"{_describe(config)} does not have: {left[:6]}"
        )
    return params


def _modern_name(name: str) -> str:
    """Old BERT checkpoints call LayerNorm's weight and bias gamma and beta."""
    if "LayerNorm." in name:
        return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias"
        )
    return name


def _check_tied(tensors: dict[str, np.ndarray], config: ModelConfig, source: str) -> None:
    """Our decoder is the word embedding matrix plus the head's bias: a checkpoint whose
    decoder differs would change the model."""
    weight, bias = _TIED[config.model_type]
    _, prefix, _, _, head_bias = ARCHITECTURES[config.model_type]
    for name, tied_to in (
        (weight, f"{prefix}.embeddings.word_embeddings.weight"),
        (bias, head_bias),
    ):
        if name in tensors and not np.array_equal(tensors[name], tensors[tied_to]):
            raise InteropError(
                f"{name} in {source} differs from {tied_to}: an untied decoder, which our "
                f"encoder (decoder tied to the word embeddings) cannot represent"
            )


def _check_type(config: ModelConfig) -> None:
    if config.model_type not in ARCHITECTURES:
        raise InteropError(f"model_type {config.model_type!r} has no HuggingFace mapping")


def _describe(config: ModelConfig) -> str:
    return (
        f"model_type={config.model_type}, vocab_size={config.vocab_size}, hidden_size="
        f"{config.hidden_size}, num_layers={config.num_layers}, num_heads={config.num_heads}, "
        f"intermediate_size={config.intermediate_size}, max_position_embeddings="
        f"{config.max_position_embeddings}, type_vocab_size={config.type_vocab_size}"
    )


# ----------------------------------------------------------------------------- directories


def hf_config(config: ModelConfig, tokenizer: Tokenizer | None = None) -> dict[str, Any]:
    """``config.json`` for HF (and for ``model.from_dir``): the architecture as HF names it."""
    _check_type(config)
    attention_only = config.intermediate_size == 0
    architecture = ARCHITECTURES[config.model_type][0]
    model_type = config.model_type
    if attention_only:  # transformers has no such class; model.from_dir reads it
        architecture += "OnlyAttention"
        model_type = "roberta-only-attention" if model_type == "roberta" else model_type
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


def export(pretrained: Pretrained, out_dir: str | os.PathLike) -> Path:
    """Writes ``config.json``, ``model.safetensors`` and the tokenizer files to ``out_dir``."""
    config = pretrained.config
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / WEIGHTS_FILE).is_file():
        raise InteropError(
            f"{str(out)!r} exists and is not a model directory; choose an empty or new --out"
        )
    tensors = to_hf_tensors(model_params(pretrained.model), config)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}  # what transformers expects of a safetensors checkpoint
    if pretrained.step is not None:
        metadata["guided_jax_step"] = str(pretrained.step)
    safetensors.numpy.save_file(tensors, str(out / WEIGHTS_FILE), metadata=metadata)
    (out / CONFIG_FILE).write_text(
        json.dumps(hf_config(config, pretrained.tokenizer), indent=2) + "\n"
    )
    source = pretrained.tokenizer.directory
    if source is None:
        raise InteropError("the tokenizer was not loaded from a directory; nothing to copy")
    for name in TOKENIZER_FILES:
        if (source / name).is_file() and (source / name).resolve() != (out / name).resolve():
            shutil.copyfile(source / name, out / name)
    return out


def read_safetensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of ``DIR/model.safetensors`` (float32)."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        other = [p.name for p in Path(directory).glob("*.bin")]
        hint = (
            f"; it holds {other}: load it with transformers and save_pretrained(..., "
            f"safe_serialization=True) to convert"
            if other
            else ""
        )
        raise InteropError(f"{str(path)!r} does not exist{hint}")
    try:
        with safetensors.safe_open(str(path), framework="np") as f:
            return {k: np.asarray(f.get_tensor(k), dtype=np.float32) for k in f.keys()}  # noqa: SIM118
    except (safetensors.SafetensorError, TypeError) as error:
        raise InteropError(f"cannot read {str(path)!r}: {error}") from None


def model_config_of(directory: str | os.PathLike) -> ModelConfig:
    """The architecture ``DIR/config.json`` describes (checked as ``model.from_dir`` does)."""
    model_dir = read_model_dir(directory)
    return ModelConfig.from_mapping({**model_dir.model, "pad_token_id": model_dir.pad_token_id})


def read_hf_dir(directory: str | os.PathLike) -> tuple[ModelConfig, Params, Tokenizer]:
    """A HuggingFace MLM directory's architecture, weights and tokenizer."""
    config = model_config_of(directory)
    params = from_hf_tensors(
        read_safetensors(directory), config, str(Path(directory) / WEIGHTS_FILE)
    )
    if not has_tokenizer_files(directory):
        raise InteropError(
            f"{str(directory)!r} has no tokenizer files (vocab.json + merges.txt or vocab.txt)"
        )
    return config, params, load_tokenizer(directory)


# ----------------------------------------------------------------------------- init_from


def _architecture_differences(run: ModelConfig, weights: ModelConfig) -> list[str]:
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


def check_init_from(config: ml_collections.ConfigDict) -> None:
    """``train.init_from`` must name a readable weights directory whose architecture is the
    run's (vocabulary size aside when ``model.vocab_size=-1``: it is known only with the
    tokenizer, and checked again when the weights are loaded). Reads only."""
    directory = config.train.get("init_from", "")
    if not directory:
        return
    from guided_jax.experiment import ConfigError, build_model_config, resolve_config

    try:
        weights = model_config_of(directory)
    except ValueError as error:
        raise ConfigError(f"train.init_from: {error}") from None
    if not (Path(directory) / WEIGHTS_FILE).is_file():
        raise ConfigError(
            f"train.init_from: {str(Path(directory) / WEIGHTS_FILE)!r} does not exist"
        )
    resolved, _ = resolve_config(config)
    vocab = weights.vocab_size if resolved.model.vocab_size == -1 else None
    run = build_model_config(resolved, vocab, weights.pad_token_id)
    differences = _architecture_differences(run, weights)
    if differences:
        raise ConfigError(
            f"train.init_from: the weights in {str(directory)!r} are of another architecture "
            f"({'; '.join(differences)}); set --config.model.from_dir={directory} to build "
            f"the model they describe"
        )


def load_init_params(directory: str | os.PathLike, run: ModelConfig) -> Params:
    """The weights of ``train.init_from`` for the run's model ``run``."""
    weights = model_config_of(directory)
    differences = _architecture_differences(run, weights)
    if differences:
        raise InteropError(
            f"train.init_from: the weights in {str(directory)!r} do not fit the run's model "
            f"({'; '.join(differences)})"
        )
    return from_hf_tensors(read_safetensors(directory), run, str(Path(directory) / WEIGHTS_FILE))


def place_params(params: Params, like: nnx.State, shardings: Any) -> nnx.State:
    """``params`` as global arrays laid out like the run's state ``like`` (every process
    holds the whole host copy and contributes its own shards)."""
    state = jax.tree.map(lambda x: x, like)  # a copy to fill
    nnx.replace_by_pure_dict(state, params)

    def place(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, state, shardings)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str]) -> None:
    from absl import flags

    from guided_jax import pretrained

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    values = flags.FLAGS
    try:
        model = pretrained.load(values.workdir, values.step)
        out = export(model, values.out)
    except (ValueError, OSError) as error:
        sys.exit(f"guided_jax.hf_interop: error: {error}")
    where = f"step {model.step} of {model.source}" if model.step is not None else model.source
    print(f"exported {where} to {out} ({ARCHITECTURES[model.config.model_type][0]})")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Pretraining workdir (or a HuggingFace directory).")
    flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest).")
    flags.DEFINE_string(
        "out", None, "Directory to write config.json, model.safetensors and the tokenizer files to."
    )
    flags.mark_flags_as_required(["workdir", "out"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
