"""``model.from_dir``: the reference's model directories (HuggingFace-style config.json beside
the tokenizer's files) build the model and tokenizer they describe; bad directories are
refused before anything is written. Also a tiny BERT + WordPiece run guided on [SEP] and ".".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import REPO, write_corpus
from guided_jax.config import ConfigError, check_config, load_config
from guided_jax.data.tokenizer import Tokenizer, train_tokenizer
from guided_jax.model import EncoderForMLM
from guided_jax.train.inputs import prepare
from guided_jax.train.loop import train_and_evaluate
from guided_jax.train.metrics import read_metrics


def _roberta_json(layers: int, width: int, heads: int, *, attention_only: bool = False) -> dict:
    """A config.json as in the reference's ag_config/ and oromo_config/ directories (its
    attention-only files keep intermediate_size 3072; the layers have no FFN all the same)."""
    return {
        "architectures": [
            "RobertaForMaskedLMOnlyAttention" if attention_only else "RobertaForMaskedLM"
        ],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": width,
        "initializer_range": 0.02,
        "intermediate_size": 4 * width,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 514,
        "model_type": "roberta-only-attention" if attention_only else "roberta",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "type_vocab_size": 1,
        "vocab_size": 52000,
    }


def _bert_json(layers: int, heads: int, *, model_type: str = "bert", named_only_attention=False):
    """A config.json as in the reference's filipino_config/ directories, bookkeeping included
    (its self_attention_24 names BertForMaskedLMOnlyAttention with model_type bert)."""
    return {
        "architectures": [
            "BertForMaskedLMOnlyAttention" if named_only_attention else "BertForMaskedLM"
        ],
        "attention_probs_dropout_prob": 0.1,
        "bos_token_id": 0,
        "directionality": "bidi",
        "do_sample": False,
        "eos_token_ids": 0,
        "finetuning_task": None,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 768,
        "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "is_decoder": False,
        "label2id": {"LABEL_0": 0, "LABEL_1": 1},
        "layer_norm_eps": 1e-12,
        "length_penalty": 1.0,
        "max_length": 20,
        "max_position_embeddings": 512,
        "model_type": model_type,
        "num_attention_heads": heads,
        "num_beams": 1,
        "num_hidden_layers": layers,
        "num_labels": 2,
        "num_return_sequences": 1,
        "output_attentions": True,
        "output_hidden_states": True,
        "output_past": True,
        "pad_token_id": 0,
        "pooler_fc_size": 768,
        "pooler_num_fc_layers": 3,
        "pooler_size_per_head": 128,
        "pooler_type": "first_token_transform",
        "pruned_heads": {},
        "repetition_penalty": 1.0,
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
        "torchscript": False,
        "type_vocab_size": 2,
        "use_bfloat16": False,
        "vocab_size": 30101,
    }


# name: (config.json, layers, width, FFN size, positions, token types); the vocabulary is the
# tokenizer's, whatever config.json says (the reference resizes the embeddings to it).
SHAPES = {
    "roberta_4": (_roberta_json(4, 512, 8), 4, 512, 2048, 514, 1),
    "roberta_8": (_roberta_json(8, 768, 12), 8, 768, 3072, 514, 1),
    "roberta_12": (_roberta_json(12, 768, 12), 12, 768, 3072, 514, 1),
    "roberta_16": (_roberta_json(16, 768, 16), 16, 768, 3072, 514, 1),
    "roberta_self_24": (_roberta_json(24, 768, 12, attention_only=True), 24, 768, 0, 514, 1),
    "roberta_self_48": (_roberta_json(48, 768, 12, attention_only=True), 48, 768, 0, 514, 1),
    "bert_8": (_bert_json(8, 12), 8, 768, 3072, 512, 2),
    "bert_16": (_bert_json(16, 16), 16, 768, 3072, 512, 2),
    # filipino_config/self_attention_24: full layers, as AutoModelWithLMHead built them
    "bert_self_24": (_bert_json(24, 12, named_only_attention=True), 24, 768, 3072, 512, 2),
    "bert_attention_only_24": (
        _bert_json(24, 12, model_type="bert-only-attention", named_only_attention=True),
        *(24, 768, 0, 512, 2),
    ),
}


def _tokenizer_length(directory: Path) -> int:
    """Entries of the directory's vocab.json or lines of its vocab.txt: len(tokenizer)."""
    if (directory / "vocab.json").exists():
        return len(json.loads((directory / "vocab.json").read_text()))
    return len((directory / "vocab.txt").read_text().splitlines())


def expected_parameters(vocab: int, width: int, layers: int, ffn: int, positions: int, types: int):
    """Parameters of a post-LN encoder with an MLM head whose decoder is tied to the word
    embeddings (HuggingFace's RobertaForMaskedLM / BertForMaskedLM, which have no pooler)."""
    d = width
    embeddings = (vocab + positions + types) * d + 2 * d  # three tables, LayerNorm
    attention = 4 * (d * d + d) + 2 * d  # Q, K, V, output projections, LayerNorm
    feed_forward = (d * ffn + ffn) + (ffn * d + d) + 2 * d if ffn else 0
    head = (d * d + d) + 2 * d + vocab  # dense, LayerNorm, decoder bias
    return embeddings + layers * (attention + feed_forward) + head


def test_parameter_formula_matches_published_counts() -> None:
    """The formula gives HuggingFace's counts for roberta-base and bert-base-uncased MLMs."""
    assert expected_parameters(50265, 768, 12, 3072, 514, 1) == 124_697_433
    assert expected_parameters(30522, 768, 12, 3072, 512, 2) == 109_514_298


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def tokenizers(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tokenizer]:
    texts = corpus.read_text().splitlines()
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "bpe": train_tokenizer(texts, 400, root / "bpe"),
        "wordpiece": train_tokenizer(texts, 200, root / "wordpiece", kind="wordpiece"),
    }


def _model_dir(path: Path, config_json: dict | None, tokenizer: Tokenizer | None = None) -> Path:
    path.mkdir(parents=True)
    if config_json is not None:
        (path / "config.json").write_text(json.dumps(config_json, indent=2))
    if tokenizer is not None:
        assert tokenizer.directory is not None
        for file in tokenizer.directory.iterdir():
            shutil.copy(file, path / file.name)
    return path


def _config(corpus: Path, from_dir: Path | str = ""):
    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.data.train_files = str(corpus)
    config.model.from_dir = str(from_dir)
    return config


def _refused(config, workdir: Path, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        prepare(config, workdir)
    assert not workdir.exists()
    return str(info.value)


@pytest.mark.parametrize("name", SHAPES)
def test_reference_shape_from_config_json(name, corpus, tokenizers, tmp_path) -> None:
    config_json, layers, width, ffn, positions, types = SHAPES[name]
    kind = "wordpiece" if name.startswith("bert") else "bpe"
    directory = _model_dir(tmp_path / name, config_json, tokenizers[kind])
    inputs = prepare(_config(corpus, directory), tmp_path / "run", write=False)
    vocab = _tokenizer_length(directory)

    model = inputs.model
    assert (model.num_layers, model.hidden_size, model.intermediate_size) == (layers, width, ffn)
    assert (model.vocab_size, model.max_position_embeddings, model.type_vocab_size) == (
        vocab,
        positions,
        types,
    )
    assert model.num_heads == config_json["num_attention_heads"]
    assert model.layer_norm_eps == config_json["layer_norm_eps"]
    assert model.model_type == ("bert" if kind == "wordpiece" else "roberta")
    assert model.pad_token_id == inputs.tokenizer.pad_id == (0 if kind == "wordpiece" else 1)
    assert inputs.tokenizer.kind == kind and inputs.config.data.tokenizer_kind == kind
    assert inputs.config.data.tokenizer_dir == str(directory)
    # blocks are <s> … </s> or [CLS] … [SEP]
    assert (inputs.train_blocks[:, 0] == inputs.tokenizer.bos_id).all()
    assert (inputs.train_blocks[:, -1] == inputs.tokenizer.eos_id).all()

    abstract = nnx.eval_shape(lambda: EncoderForMLM(model, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    assert count == expected_parameters(vocab, width, layers, ffn, positions, types)


def test_resolved_config_is_recorded_and_resumes(corpus, tokenizers, tmp_path) -> None:
    directory = _model_dir(tmp_path / "bert_8", _bert_json(8, 12), tokenizers["wordpiece"])
    config = _config(corpus, directory)
    check_config(config)  # what train_and_evaluate calls first
    workdir = tmp_path / "run"
    prepare(config, workdir)
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["model_type"] == "bert" and saved["model"]["num_layers"] == 8
    assert saved["model"]["from_dir"] == str(directory)
    assert saved["data"]["tokenizer_dir"] == str(directory)
    assert saved["data"]["tokenizer_kind"] == "wordpiece"
    assert config.model.num_layers == 2  # the caller's config is left alone
    prepare(config, workdir)  # the same command resumes
    # the directory's config changed since: refused, naming what changed
    changed = {**_bert_json(8, 12), "num_hidden_layers": 16}
    (directory / "config.json").write_text(json.dumps(changed))
    with pytest.raises(ConfigError, match=r"model\.num_layers: 8 -> 16"):
        prepare(config, workdir)


def test_directory_without_tokenizer_files_is_refused(corpus, tokenizers, tmp_path) -> None:
    """Like the reference's filipino_config/ directories, which hold only config.json."""
    directory = _model_dir(tmp_path / "bert_8", _bert_json(8, 12))
    message = _refused(_config(corpus, directory), tmp_path / "run", "has no tokenizer files")
    assert str(directory) in message and "data.tokenizer_dir" in message
    # a tokenizer elsewhere, named explicitly, completes the directory
    config = _config(corpus, directory)
    config.data.tokenizer_dir = str(tokenizers["wordpiece"].directory)
    inputs = prepare(config, tmp_path / "run", write=False)
    assert inputs.model.num_layers == 8 and inputs.tokenizer.kind == "wordpiece"


@pytest.mark.parametrize("rows_in_file", [100, 52000])
def test_embedding_rows_follow_the_tokenizer(corpus, tokenizers, tmp_path, capsys, rows_in_file):
    """Like the reference's oromo_config/ (52,000 in config.json, 40,000 in vocab.json): the
    run trains one row per token, says so once, records it, and resumes."""
    config_json = {**_roberta_json(4, 512, 8), "vocab_size": rows_in_file}
    directory = _model_dir(tmp_path / "om", config_json, tokenizers["bpe"])
    rows = _tokenizer_length(directory)
    workdir = tmp_path / "run"
    inputs = prepare(_config(corpus, directory), workdir)
    assert inputs.model.vocab_size == rows != rows_in_file
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"model.vocab_size={rows}:") and f"{rows_in_file} of " in line
    assert str(directory / "config.json") in line
    assert json.loads((workdir / "config.json").read_text())["model"]["vocab_size"] == rows
    assert prepare(_config(corpus, directory), workdir).model.vocab_size == rows
    capsys.readouterr()
    # with the file and the tokenizer agreeing, nothing is said
    (directory / "config.json").write_text(json.dumps({**config_json, "vocab_size": rows}))
    prepare(_config(corpus, directory), tmp_path / "agreeing", write=False)
    assert capsys.readouterr().out == ""


def test_pad_id_other_than_the_tokenizers_is_refused(corpus, tokenizers, tmp_path) -> None:
    config_json = {**_bert_json(8, 12), "pad_token_id": 1}
    directory = _model_dir(tmp_path / "bert", config_json, tokenizers["wordpiece"])
    _refused(_config(corpus, directory), tmp_path / "run", "pads with id 0.*pad_token_id=1")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "xlnet"}, "unsupported model_type 'xlnet'"),
        ({"model_type": "gpt2", "n_layer": 4}, r"unsupported keys \['n_layer'\]"),
        ({"rotary_dim": 64, "foo": 1}, r"unsupported keys \['foo', 'rotary_dim'\]"),
        ({"hidden_act": "relu"}, "unsupported hidden_act='relu'.*hidden_act='gelu'"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"architectures": ["BertForMaskedLM"]}, "unsupported architectures"),
        ({"num_hidden_layers": None}, "num_hidden_layers=None .* must be an integer"),
        ({"layer_norm_eps": "1e-5"}, "layer_norm_eps='1e-5' .* must be a number"),
    ],
)
def test_unsupported_config_json_is_refused(corpus, tokenizers, tmp_path, change, match) -> None:
    directory = _model_dir(tmp_path / "dir", {**_roberta_json(4, 512, 8), **change})
    for file in tokenizers["bpe"].directory.iterdir():
        shutil.copy(file, directory / file.name)
    message = _refused(_config(corpus, directory), tmp_path / "run", match)
    assert str(directory / "config.json") in message


def test_missing_keys_and_files_are_refused(corpus, tmp_path) -> None:
    config_json = _roberta_json(4, 512, 8)
    del config_json["num_hidden_layers"], config_json["intermediate_size"]
    directory = _model_dir(tmp_path / "partial", config_json)
    _refused(
        _config(corpus, directory),
        tmp_path / "run",
        r"missing keys \['intermediate_size', 'num_hidden_layers'\]",
    )
    _refused(_config(corpus, tmp_path / "nowhere"), tmp_path / "run", "nowhere' does not exist")
    empty = _model_dir(tmp_path / "empty", None)
    _refused(_config(corpus, empty), tmp_path / "run", "has no config.json")
    (empty / "config.json").write_text("[1, 2]")
    _refused(_config(corpus, empty), tmp_path / "run", "must hold a JSON object")


def test_workdir_of_another_tokenizer_kind_is_refused(corpus, tmp_path) -> None:
    config = _config(corpus)
    config.data.tokenizer_kind = "wordpiece"
    workdir = tmp_path / "run"
    inputs = prepare(config, workdir)
    assert (workdir / "tokenizer" / "vocab.txt").is_file() and inputs.tokenizer.kind == "wordpiece"
    assert (inputs.train_blocks[:, 0] == inputs.tokenizer.token_to_id("[CLS]")).all()
    config.data.tokenizer_kind = "bpe"
    with pytest.raises(ConfigError, match=r"data\.tokenizer_kind: 'wordpiece' -> 'bpe'"):
        prepare(config, workdir)
    config.data.tokenizer_kind = "sentencepiece"
    _refused(config, tmp_path / "other", "data.tokenizer_kind must be one of")


def test_run_written_before_the_new_keys_resumes(corpus, tmp_path) -> None:
    """A workdir whose config.json predates model_type, from_dir and tokenizer_kind resumes
    with the values it had implicitly, and only with those."""
    config = _config(corpus)
    workdir = tmp_path / "run"
    prepare(config, workdir)
    saved = json.loads((workdir / "config.json").read_text())
    del saved["model"]["model_type"], saved["model"]["from_dir"], saved["data"]["tokenizer_kind"]
    (workdir / "config.json").write_text(json.dumps(saved))
    bert = config.copy_and_resolve_references()
    bert.model.model_type = "bert"
    with pytest.raises(ConfigError, match=r"model\.model_type: None -> 'bert'"):
        prepare(bert, workdir)
    prepare(config, workdir)
    assert json.loads((workdir / "config.json").read_text())["data"]["tokenizer_kind"] == "bpe"


@pytest.mark.slow
def test_tiny_bert_wordpiece_run_guided_on_sep_and_period(corpus, tmp_path) -> None:
    config = _config(corpus)
    config.model.update(
        model_type="bert", type_vocab_size=2, layer_norm_eps=1e-12, max_position_embeddings=32
    )
    config.data.tokenizer_kind = "wordpiece"
    config.guidance.heads = "first:1,token[[SEP]]:1,token[.]:1"
    config.train.update(
        steps=40, learning_rate=3e-3, log_every=5, eval_every=20, checkpoint_every=40
    )
    workdir = tmp_path / "run"
    last = train_and_evaluate(config, workdir, devices=jax.devices()[:1])

    logged = [r for r in read_metrics(workdir) if "mlm_loss" in r]
    assert [r["step"] for r in logged] == list(range(5, 41, 5))
    first, final = logged[0], logged[-1]
    groups = ("first", "token[[SEP]]", "token[.]")
    assert {f"ag_loss/{g}" for g in groups} <= set(final)
    assert final["ag_loss"] < 0.6 * first["ag_loss"]  # the period head is slower, see below
    # [CLS] and [SEP] sit at fixed places in every block: their heads lock on quickly
    for group in ("first", "token[[SEP]]"):
        assert final[f"ag_loss/{group}"] < 0.3 * first[f"ag_loss/{group}"], group
    # the number of periods varies from batch to batch: compare two logs at each end
    period = [r["ag_loss/token[.]"] for r in logged]
    assert sum(period[-2:]) < 0.8 * sum(period[:2])
    assert final["mlm_loss"] < first["mlm_loss"]
    assert last["step"] == 40 and (workdir / "checkpoints" / "40").is_dir()
    assert (workdir / "tokenizer" / "vocab.txt").is_file()
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["model_type"] == "bert"
    assert saved["data"]["tokenizer_kind"] == "wordpiece"
