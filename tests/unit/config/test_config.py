"""Every config file loads, builds a valid model, and documents the command that runs it."""

import pytest

from conftest import REPO
from guided_jax.config import MODEL_PRESETS, check_config, load_config, model_config
from guided_jax.config.resolve import build_model_config

CONFIG_FILES = ["configs/default.py", "configs/tiny.py"] + [
    f"configs/reference.py:{name}" for name in MODEL_PRESETS
]


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_file_is_valid(name):
    config = load_config(str(REPO / name))
    check_config(config)
    path = name.split(":")[0]
    assert f"--config {path}" in (REPO / path).read_text()


@pytest.mark.parametrize(
    ("name", "layers", "width", "heads", "ffn"),
    [
        ("roberta_4", 4, 512, 8, 2048),
        ("roberta_8", 8, 768, 12, 3072),
        ("roberta_12", 12, 768, 12, 3072),
        ("roberta_16", 16, 768, 16, 3072),
        ("roberta_self_24", 24, 768, 12, 0),
        ("roberta_self_48", 48, 768, 12, 0),
    ],
)
def test_reference_shapes(name, layers, width, heads, ffn):
    config = load_config(f"{REPO / 'configs/reference.py'}:{name}")
    model = build_model_config(config, vocab_size=52000)
    assert (model.num_layers, model.hidden_size, model.num_heads, model.intermediate_size) == (
        layers,
        width,
        heads,
        ffn,
    )
    assert (model.vocab_size, model.max_position_embeddings, model.layer_norm_eps) == (
        52000,
        514,
        1e-5,
    )
    assert model.dropout == model.attention_dropout == 0.1
    assert config.data.block_size == 512
    # the reference's --num_train_epochs 3 --per_device_train_batch_size=4, <unk> predicted
    assert (config.train.epochs, config.train.per_device_batch_size) == (3.0, 4)
    assert (config.data.mlm_targets, config.data.format) == ("reference", "reference_text")
    assert config.guidance.heads == "0,1,1,4" and config.guidance.scale == 100.0
    assert (model.model_type, config.data.tokenizer_kind, config.model.from_dir) == (
        "roberta",
        "bpe",
        "",
    )


@pytest.mark.parametrize(
    ("name", "layers", "heads", "ffn"),
    [
        ("bert_8", 8, 12, 3072),
        ("bert_16", 16, 16, 3072),
        ("bert_self_24", 24, 12, 3072),  # the reference built full layers
        ("bert_attention_only_24", 24, 12, 0),
        ("bert_48", 48, 12, 3072),
    ],
)
def test_reference_bert_shapes(name, layers, heads, ffn):
    """The reference's filipino_config/ models: BERT with a WordPiece of 30,101."""
    config = load_config(f"{REPO / 'configs/reference.py'}:{name}")
    model = build_model_config(config, vocab_size=30101, pad_token_id=0)
    assert (model.model_type, model.num_layers, model.num_heads, model.intermediate_size) == (
        "bert",
        layers,
        heads,
        ffn,
    )
    assert (model.hidden_size, model.vocab_size, model.max_position_embeddings) == (
        768,
        30101,
        512,
    )
    assert (model.type_vocab_size, model.layer_norm_eps, model.pad_token_id) == (2, 1e-12, 0)
    assert model.max_block_size == config.data.block_size == 512  # no padding offset
    assert config.data.tokenizer_kind == "wordpiece"
    assert config.data.tokenizer_vocab_size == 30101


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="roberta_7"):
        model_config("roberta_7")


def test_unknown_model_key_is_refused():
    config = load_config(str(REPO / "configs/tiny.py"))
    config.model.unlock()
    config.model.hidden = 3
    with pytest.raises(ValueError, match="hidden"):
        check_config(config)
