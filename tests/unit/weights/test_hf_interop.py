"""Export to and import from HuggingFace directories: the name mapping round-trips, broken
checkpoints are refused by name, transformers loads an export with the same logits, and an
imported directory starts a guided pretraining run."""

import json

import jax
import numpy as np
import pytest
import safetensors

from guided_jax import weights
from guided_jax.config import ConfigError
from guided_jax.data.tokenizer import train_tokenizer
from guided_jax.model import ModelConfig, build_model, init_params, model_params
from guided_jax.train.loop import train_and_evaluate
from guided_jax.train.metrics import read_metrics
from guided_jax.weights import hf as hf_interop
from guided_jax.weights.workdir import load_params

ONE_DEVICE = jax.devices()[:1]
ROBERTA = ModelConfig(
    vocab_size=120, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96,
    max_position_embeddings=40,
)  # fmt: skip
BERT = ModelConfig(
    model_type="bert", vocab_size=120, hidden_size=48, num_layers=2, num_heads=4,
    intermediate_size=96, max_position_embeddings=24, type_vocab_size=2, layer_norm_eps=1e-12,
    pad_token_id=0,
)  # fmt: skip


def _random_params(config: ModelConfig, seed: int) -> dict:
    """Parameters with no zeros or ones (biases and LayerNorms perturbed), so a tensor mapped
    to the wrong place cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: (x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32),
        init_params(config, seed),
    )


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize(
    "config", [ROBERTA, BERT, ModelConfig(**{**ROBERTA.__dict__, "intermediate_size": 0})],
    ids=["roberta", "bert", "attention_only"],
)  # fmt: skip
def test_hf_names_round_trip(config):
    params = _random_params(config, 0)
    tensors = hf_interop.to_hf_tensors(params, config)
    prefix = "bert" if config.model_type == "bert" else "roberta"
    assert f"{prefix}.encoder.layer.1.attention.self.key.weight" in tensors
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in tensors.values())
    _assert_trees_equal(hf_interop.from_hf_tensors(tensors, config), params)


def test_import_ignores_pooler_and_tied_decoder_and_renames_gamma_beta():
    params = _random_params(BERT, 1)
    tensors = hf_interop.to_hf_tensors(params, BERT)
    tensors["bert.pooler.dense.weight"] = np.zeros((48, 48), np.float32)
    tensors["bert.embeddings.position_ids"] = np.arange(24)[None]
    tensors["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"]
    tensors["bert.embeddings.LayerNorm.gamma"] = tensors.pop("bert.embeddings.LayerNorm.weight")
    _assert_trees_equal(hf_interop.from_hf_tensors(tensors, BERT), params)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("roberta.encoder.layer.1.output.dense.bias"), "lacks 1 tensors"),
        (
            lambda t: t.update({"roberta.embeddings.word_embeddings.weight": np.zeros((7, 48))}),
            "roberta.embeddings.word_embeddings.weight in the checkpoint has shape (7, 48)",
        ),
        (lambda t: t.update({"roberta.encoder.layer.2.x": np.zeros(3)}), "does not have"),
        (lambda t: t.update({"lm_head.decoder.weight": np.zeros((120, 48))}), "untied decoder"),
    ],
    ids=["missing", "shape", "extra", "untied"],
)
def test_import_refuses_checkpoints_that_do_not_fit(change, message):
    tensors = hf_interop.to_hf_tensors(_random_params(ROBERTA, 2), ROBERTA)
    change(tensors)
    with pytest.raises(
        hf_interop.InteropError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        hf_interop.from_hf_tensors(tensors, ROBERTA)


def test_reading_a_directory_without_weights_names_the_file(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(hf_interop.InteropError, match=r"model\.safetensors' does not exist.*bin"):
        hf_interop.read_safetensors(tmp_path)


# ----------------------------------------------------------------------------- a real run


def _export(workdir, out):
    loaded = weights.load(workdir)
    return hf_interop.export(loaded.model, loaded.tokenizer, out, step=loaded.step)


def test_export_then_import_gives_the_same_model(tiny_run, tmp_path):
    out = _export(tiny_run, tmp_path / "hf")
    assert out == tmp_path / "hf"
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "config.json").read_text())["architectures"] == ["RobertaForMaskedLM"]
    with safetensors.safe_open(str(out / "model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt", "guided_jax_step": "6"}
    ours, again = weights.load(tiny_run), weights.load(out)
    assert ours.step == 6 and again.step is None and again.config == ours.config
    _assert_trees_equal(model_params(again.model), model_params(ours.model))
    ids = np.asarray(ours.tokenizer.encode_batch(["The cat sees the dog."]), np.int32)
    np.testing.assert_array_equal(ours.model(ids)[0], again.model(ids)[0])


def test_export_refuses_a_directory_of_other_files(tiny_run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(hf_interop.InteropError, match="is not a model directory"):
        _export(tiny_run, tmp_path)


@pytest.mark.slow
def test_imported_weights_start_a_guided_run(tiny_run, tmp_path, tiny_config):
    out = _export(tiny_run, tmp_path / "hf")
    config = tiny_config.copy_and_resolve_references()
    config.model.from_dir = str(out)
    config.train.init_from = str(out)
    config.train.steps, config.train.checkpoint_every = 2, 1
    config.train.log_every = 1
    train_and_evaluate(config, tmp_path / "continued", devices=ONE_DEVICE)
    assert all(np.isfinite(r["ag_loss"]) for r in read_metrics(tmp_path / "continued"))
    imported = hf_interop.read_hf_dir(out)[1]
    _, after_one = load_params(tmp_path / "continued", 1)
    # Step 0's learning rate is 0 (one warmup step): the first update leaves the weights.
    _assert_trees_equal(after_one, imported)
    _, after_two = load_params(tmp_path / "continued", 2)
    gap = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), after_two, imported)
    assert 0 < max(jax.tree.leaves(gap)) <= 2.5 * config.train.learning_rate


def test_init_from_of_another_architecture_is_refused_before_writing(
    tiny_run, tmp_path, tiny_config
):
    out = _export(tiny_run, tmp_path / "hf")
    tiny_config.train.init_from = str(out)
    tiny_config.model.hidden_size = 64
    with pytest.raises(
        ConfigError, match=r"train\.init_from: .*\(hidden_size: weights 32 vs run 64\)"
    ):
        train_and_evaluate(tiny_config, tmp_path / "run", devices=ONE_DEVICE)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- transformers


def _transformers():
    pytest.importorskip("torch", reason="torch is not installed (optional HF check)")
    return pytest.importorskip("transformers", reason="transformers is not installed")


def _hf_logits(hf, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    return out.logits.numpy()


def test_transformers_loads_an_exported_run_with_the_same_logits(tiny_run, tmp_path):
    transformers = _transformers()
    ours = weights.load(tiny_run)
    out = _export(tiny_run, tmp_path / "hf")
    hf = transformers.RobertaForMaskedLM.from_pretrained(out, attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    texts = ["The cat sees the dog today.", "A small bird calls!"]
    batch = tokenizer(texts, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    assert ids[0, 0] == ours.tokenizer.bos_id and mask[1, -1] == 0  # <s> ... and a pad
    logits = np.asarray(ours.model(ids.astype(np.int32))[0])
    np.testing.assert_allclose(logits[mask == 1], _hf_logits(hf, ids, mask)[mask == 1], atol=1e-4)


def test_transformers_loads_an_exported_bert_with_the_same_logits(tmp_path):
    transformers = _transformers()
    texts = ["The cat sees the dog. A dog likes the ball!", "Our teacher draws a letter."] * 30
    tokenizer = train_tokenizer(texts, 120, tmp_path / "tok", kind="wordpiece")
    model = build_model(BERT, _random_params(BERT, 3))
    out = hf_interop.export(model, tokenizer, tmp_path / "hf")
    hf = transformers.BertForMaskedLM.from_pretrained(out, attn_implementation="eager").eval()
    batch = transformers.AutoTokenizer.from_pretrained(out)(
        ["the dog draws the cat.", "a letter"], padding=True, return_tensors="np"
    )
    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    logits = np.asarray(model(ids.astype(np.int32))[0])
    np.testing.assert_allclose(logits[mask == 1], _hf_logits(hf, ids, mask)[mask == 1], atol=1e-4)
    # and back: what transformers saves, we import
    hf.save_pretrained(tmp_path / "saved")
    for name in ("vocab.txt", "tokenizer_config.json"):
        (tmp_path / "saved" / name).write_bytes((out / name).read_bytes())
    again = weights.load(tmp_path / "saved")
    np.testing.assert_allclose(np.asarray(again.model(ids.astype(np.int32))[0]), logits, atol=1e-5)
