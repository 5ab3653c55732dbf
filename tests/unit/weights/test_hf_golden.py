"""Golden numerics against HuggingFace transformers, without torch: tests/fixtures/hf/ holds tiny
RoBERTa and BERT masked-LM directories written by transformers (make_hf_fixtures.py there) with
the logits, last hidden states and attention maps transformers computed for a padded batch.

* import: guided_jax.weights.hf.read_hf_dir + build_model reproduce those outputs;
* export: guided_jax.weights.hf.export writes each tensor under its HF name and layout, compared
  with the fixture's own model.safetensors (a transposed Q/K/V mapping, which an export-then-
  import round trip cannot see, fails here);
* forward: our model, filled by the mapping written out below (not the package's), reproduces
  the logits, which pins the forward pass itself (e.g. the MLM head's dense → GELU →
  LayerNorm → decoder + bias).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from conftest import REPO
from guided_jax.data.tokenizer import load_tokenizer
from guided_jax.model import EncoderForMLM, ModelConfig, build_model
from guided_jax.weights.hf import export, read_hf_dir

FIXTURES = REPO / "tests" / "fixtures" / "hf"
MODELS = ("roberta", "bert")
RTOL = ATOL = 1e-5
# config.json keys that say what the architecture is (the rest is bookkeeping).
ARCHITECTURE_KEYS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "pad_token_id",
    "hidden_act",
    "position_embedding_type",
)
# model type -> (encoder prefix, MLM head's dense, its LayerNorm, its bias), as transformers'
# RobertaForMaskedLM and BertForMaskedLM name them.
HEAD_NAMES = {
    "roberta": ("roberta", "lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
    "bert": (
        "bert",
        "cls.predictions.transform.dense",
        "cls.predictions.transform.LayerNorm",
        "cls.predictions.bias",
    ),
}


def _hf_config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def _hf_tensors(name: str) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(str(FIXTURES / name / "model.safetensors"))


def _expected(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / name / "expected.npz") as expected:
        return {key: expected[key] for key in expected.files}


def _config_by_hand(name: str) -> ModelConfig:
    """Our config of the fixture, read off its config.json key by key."""
    hf = _hf_config(name)
    return ModelConfig(
        model_type=hf["model_type"],
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        type_vocab_size=hf["type_vocab_size"],
        layer_norm_eps=hf["layer_norm_eps"],
        pad_token_id=hf["pad_token_id"],
        dropout=0.0,
        attention_dropout=0.0,
    )


def _params_by_hand(name: str, config: ModelConfig) -> dict:
    """Our parameters from the fixture's tensors. torch's Linear computes ``x @ W.T + b`` with
    ``W`` ``[out, in]``; our kernels are ``[in, out]``; the fused QKV kernel is
    ``[3, d, heads, head_dim]`` (query, key, value; HF's output features are head-major), its
    bias ``[3, heads, head_dim]``; the attention output kernel is ``[heads, head_dim, d]``."""
    hf = _hf_tensors(name)
    prefix, head_dense, head_norm, head_bias = HEAD_NAMES[name]
    d, heads = config.hidden_size, config.num_heads
    split = (d, heads, d // heads)

    def linear(theirs: str) -> dict:
        return {"kernel": hf[f"{theirs}.weight"].T, "bias": hf[f"{theirs}.bias"]}

    def norm(theirs: str) -> dict:
        return {"scale": hf[f"{theirs}.weight"], "bias": hf[f"{theirs}.bias"]}

    emb = f"{prefix}.embeddings"
    params: dict = {
        "embeddings": {
            "word": {"embedding": hf[f"{emb}.word_embeddings.weight"]},
            "position": {"embedding": hf[f"{emb}.position_embeddings.weight"]},
            "token_type": {"embedding": hf[f"{emb}.token_type_embeddings.weight"]},
            "norm": norm(f"{emb}.LayerNorm"),
        },
        "layers": {},
        "head": {"dense": linear(head_dense), "norm": norm(head_norm), "bias": hf[head_bias]},
    }
    for i in range(config.num_layers):
        layer = f"{prefix}.encoder.layer.{i}"
        attention = f"{layer}.attention.self"
        qkv = ("query", "key", "value")
        params["layers"][i] = {
            "attention": {
                "qkv": {
                    "kernel": np.stack(
                        [hf[f"{attention}.{p}.weight"].T.reshape(split) for p in qkv]
                    ),
                    "bias": np.stack([hf[f"{attention}.{p}.bias"].reshape(split[1:]) for p in qkv]),
                },
                "out": {
                    "kernel": hf[f"{layer}.attention.output.dense.weight"].T.reshape(
                        heads, d // heads, d
                    ),
                    "bias": hf[f"{layer}.attention.output.dense.bias"],
                },
            },
            "attention_norm": norm(f"{layer}.attention.output.LayerNorm"),
            "ffn": {
                "up": linear(f"{layer}.intermediate.dense"),
                "down": linear(f"{layer}.output.dense"),
            },
            "ffn_norm": norm(f"{layer}.output.LayerNorm"),
        }
    return params


def _model_by_hand(name: str) -> EncoderForMLM:
    config = _config_by_hand(name)
    return build_model(config, _params_by_hand(name, config))


def _forward(model: EncoderForMLM, expected: dict[str, np.ndarray]):
    logits, aux = model(
        jnp.asarray(expected["input_ids"]),
        attention_mask=jnp.asarray(expected["attention_mask"]),
        return_attentions=True,
        return_hidden=True,
    )
    return np.asarray(logits), np.asarray(aux["hidden"]), np.stack(aux["attentions"])


def _assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, what
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=what)


@pytest.mark.parametrize("name", MODELS)
def test_imported_model_reproduces_transformers(name: str) -> None:
    """Every position, padding included: padded queries attend to the real keys like any other
    query in both implementations, and the padded keys get the same (zero) weight."""
    config, params, _ = read_hf_dir(FIXTURES / name)
    assert dataclasses.replace(config, dropout=0.0, attention_dropout=0.0) == _config_by_hand(name)
    expected = _expected(name)
    assert (expected["attention_mask"] == 0).any()  # the batch is padded
    logits, hidden, attentions = _forward(build_model(config, params), expected)
    _assert_close(logits, expected["logits"], "logits")
    _assert_close(hidden, expected["hidden"], "hidden")
    _assert_close(attentions, expected["attentions"], "attentions")
    # and the imported parameters are those of the mapping written out above
    jax.tree.map(np.testing.assert_array_equal, params, _params_by_hand(name, config))


@pytest.mark.parametrize("name", MODELS)
def test_export_writes_transformers_names_and_layouts(name: str, tmp_path: Path) -> None:
    """The model filled by hand (not by the package's import, so the export is checked on its
    own) is exported: each tensor equals the fixture's tensor of that name."""
    out = export(_model_by_hand(name), load_tokenizer(FIXTURES / name), tmp_path / "out")
    written = safetensors.numpy.load_file(str(out / "model.safetensors"))
    fixture = _hf_tensors(name)
    assert sorted(written) == sorted(fixture)  # no decoder: it is tied on both sides
    for key, value in fixture.items():
        assert written[key].shape == value.shape, key
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    config, fixture_config = json.loads((out / "config.json").read_text()), _hf_config(name)
    assert {k: config[k] for k in ARCHITECTURE_KEYS} == {
        k: fixture_config[k] for k in ARCHITECTURE_KEYS
    }
    for file in (FIXTURES / name).iterdir():
        if file.suffix in (".txt", ".json") and file.name != "config.json":
            assert (out / file.name).read_bytes() == file.read_bytes(), file.name


@pytest.mark.parametrize("name", MODELS)
def test_forward_pass_with_parameters_mapped_by_hand_reproduces_transformers(name: str) -> None:
    expected = _expected(name)
    logits, hidden, _ = _forward(_model_by_hand(name), expected)
    _assert_close(logits, expected["logits"], "logits")
    _assert_close(hidden, expected["hidden"], "hidden")
