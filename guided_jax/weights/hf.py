"""HuggingFace model directories: export our encoders and import theirs (weights without torch).

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
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

from guided_jax.data.tokenizer import CONFIG_FILE as TOKENIZER_CONFIG_FILE
from guided_jax.data.tokenizer import (
    MERGES_FILE,
    VOCAB_FILE,
    WORDPIECE_VOCAB_FILE,
    Tokenizer,
    has_tokenizer_files,
    load_tokenizer,
)
from guided_jax.model import EncoderForMLM, ModelConfig, Params, init_params, model_params
from guided_jax.model.hf_config import (
    CONFIG_FILE,
    HF_CLASSES,
    WEIGHTS_FILE,
    architecture_differences,
    hf_config,
    model_config_of,
)
from guided_jax.storage import as_path, check_location, is_remote

TOKENIZER_FILES = (VOCAB_FILE, MERGES_FILE, WORDPIECE_VOCAB_FILE, TOKENIZER_CONFIG_FILE)
# model_type -> (prefix of encoder weights, MLM head's dense, its LayerNorm, its bias)
HF_NAMES = {
    "roberta": (
        "roberta",
        "lm_head.dense",
        "lm_head.layer_norm",
        "lm_head.bias",
    ),
    "bert": (
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
    prefix, head_dense, head_norm, head_bias = HF_NAMES[config.model_type]
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
    return {name: to_hf(_get(params, path)) for path, name, to_hf, _ in _mappings(config)}


def from_hf_tensors(
    tensors: dict[str, np.ndarray], config: ModelConfig, source: str = "the checkpoint"
) -> Params:
    """HF-named tensors as our parameters for ``config``; every parameter must be there with
    its shape, and nothing may be left over but the pooler, position ids and tied decoder."""
    tensors = {_modern_name(k): v for k, v in tensors.items()}
    params = init_params(config, 0)  # every parameter's shape, to fill
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
            f"{source} holds tensors the {HF_CLASSES[config.model_type]} of "
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
    prefix, _, _, head_bias = HF_NAMES[config.model_type]
    for name, tied_to in (
        (weight, f"{prefix}.embeddings.word_embeddings.weight"),
        (bias, head_bias),
    ):
        if name in tensors and not np.array_equal(tensors[name], tensors[tied_to]):
            raise InteropError(
                f"{name} in {source} differs from {tied_to}: an untied decoder, which our "
                f"encoder (decoder tied to the word embeddings) cannot represent"
            )


def _describe(config: ModelConfig) -> str:
    return (
        f"model_type={config.model_type}, vocab_size={config.vocab_size}, hidden_size="
        f"{config.hidden_size}, num_layers={config.num_layers}, num_heads={config.num_heads}, "
        f"intermediate_size={config.intermediate_size}, max_position_embeddings="
        f"{config.max_position_embeddings}, type_vocab_size={config.type_vocab_size}"
    )


# ----------------------------------------------------------------------------- directories


def export(
    model: EncoderForMLM, tokenizer: Tokenizer, out_dir: str | os.PathLike, step: int | None = None
) -> epath.Path:
    """Writes ``model.safetensors``, the tokenizer files and, last, ``config.json`` to
    ``out_dir`` (``step``, the checkpoint's, is recorded in the weights' metadata)."""
    check_location(out_dir, "--out")
    config = model.config
    out = as_path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / WEIGHTS_FILE).is_file():
        raise InteropError(
            f"{str(out)!r} exists and is not a model directory; choose an empty or new --out"
        )
    tensors = to_hf_tensors(model_params(model), config)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}  # what transformers expects of a safetensors checkpoint
    if step is not None:
        metadata["guided_jax_step"] = str(step)
    source = tokenizer.directory
    if source is None:
        raise InteropError("the tokenizer was not loaded from a directory; nothing to copy")
    (out / WEIGHTS_FILE).write_bytes(safetensors.numpy.save(tensors, metadata=metadata))
    for name in TOKENIZER_FILES:
        file, target = source / name, out / name
        if file.is_file() and (is_remote(target) or file.resolve() != target.resolve()):
            target.write_bytes(file.read_bytes())
    # Last: readers (ours, transformers) start from config.json, so an export cut short is
    # refused, never loaded, and exporting again redoes it.
    (out / CONFIG_FILE).write_text(json.dumps(hf_config(config, tokenizer), indent=2) + "\n")
    return out


def read_safetensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of ``DIR/model.safetensors`` (float32)."""
    path = as_path(directory) / WEIGHTS_FILE
    if not path.is_file():
        other = [p.name for p in as_path(directory).glob("*.bin")]
        hint = (
            f"; it holds {other}: load it with transformers and save_pretrained(..., "
            f"safe_serialization=True) to convert"
            if other
            else ""
        )
        raise InteropError(f"{str(path)!r} does not exist{hint}")
    try:
        if not is_remote(path):
            with safetensors.safe_open(str(path), framework="np") as f:
                return {k: np.asarray(f.get_tensor(k), dtype=np.float32) for k in f.keys()}  # noqa: SIM118
        tensors = safetensors.numpy.load(path.read_bytes())
        return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
    except (safetensors.SafetensorError, TypeError) as error:
        raise InteropError(f"cannot read {str(path)!r}: {error}") from None


def read_hf_dir(directory: str | os.PathLike) -> tuple[ModelConfig, Params, Tokenizer]:
    """A HuggingFace MLM directory's architecture, weights and tokenizer."""
    config = model_config_of(directory)
    params = from_hf_tensors(
        read_safetensors(directory), config, str(as_path(directory) / WEIGHTS_FILE)
    )
    if not has_tokenizer_files(directory):
        raise InteropError(
            f"{str(directory)!r} has no tokenizer files (vocab.json + merges.txt or vocab.txt)"
        )
    return config, params, load_tokenizer(directory)


def load_init_params(directory: str | os.PathLike, run: ModelConfig) -> Params:
    """The weights of ``train.init_from`` for the run's model ``run``."""
    weights = model_config_of(directory)
    differences = architecture_differences(run, weights)
    if differences:
        raise InteropError(
            f"train.init_from: the weights in {str(directory)!r} do not fit the run's model "
            f"({'; '.join(differences)})"
        )
    return from_hf_tensors(read_safetensors(directory), run, str(as_path(directory) / WEIGHTS_FILE))
