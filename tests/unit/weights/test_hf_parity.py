"""Our RoBERTa and BERT equal HuggingFace's PyTorch RobertaForMaskedLM and BertForMaskedLM
given the same weights, and HuggingFace reads the tokenizers we write.

The reference implementation is a fork of HF transformers, so matching its logits and attention
maps is the check that the model (RoBERTa positions with the padding offset or BERT's from 0,
token types, post-LN blocks, GELU, tied decoder with bias) is faithful. Skipped where
torch/transformers are not installed (they are not dependencies of the package).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_model
from guided_jax.data.tokenizer import train_tokenizer
from guided_jax.guidance import HeadSpec, guidance_loss
from guided_jax.model import EncoderForMLM, ModelConfig, model_params
from guided_jax.model.hf_config import hf_config
from guided_jax.weights.hf import to_hf_tensors

torch = pytest.importorskip("torch", reason="torch is not installed (optional parity check)")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (optional parity check)"
)


def _hf_copy(model: EncoderForMLM, config: ModelConfig):
    """transformers' RobertaForMaskedLM or BertForMaskedLM holding our weights, through the
    mapping that export uses; only the tied decoder weight is not loaded (it is tied)."""
    bert = config.model_type == "bert"
    hf_class = transformers.BertForMaskedLM if bert else transformers.RobertaForMaskedLM
    config_class = transformers.BertConfig if bert else transformers.RobertaConfig
    hf = hf_class(config_class(**hf_config(config), attn_implementation="eager"))
    tensors = to_hf_tensors(model_params(model), config)
    missing, unexpected = hf.load_state_dict(
        {k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False
    )
    assert unexpected == []
    tied = ("lm_head.decoder", "cls.predictions.decoder")
    assert {name.rpartition(".")[0] for name in missing} <= set(tied)
    hf.tie_weights()
    return hf.eval()


def _perturbed(config: ModelConfig, seed: int) -> EncoderForMLM:
    """A model whose zero-initialised biases and LayerNorms are perturbed, so that every mapped
    tensor matters."""
    model = EncoderForMLM(config, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param):
            value = np.asarray(variable[...])
            variable[...] = jnp.asarray(value + 0.05 * rng.standard_normal(value.shape))
    return model


def _assert_same_outputs(model: EncoderForMLM, hf, ids: np.ndarray, mask: np.ndarray):
    """Logits (on real tokens) and attention maps agree; returns both sides' maps."""
    logits, aux = model(jnp.asarray(ids), return_attentions=True)
    with torch.no_grad():
        out = hf(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            output_attentions=True,
        )
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        np.asarray(logits)[valid], out.logits.numpy()[valid], atol=1e-4, rtol=1e-4
    )
    for ours, theirs in zip(aux["attentions"], out.attentions, strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-5)
    return aux["attentions"], [jnp.asarray(a.numpy()) for a in out.attentions]


def test_logits_and_attention_match_huggingface_roberta():
    config = small_model(
        vocab_size=120, hidden_size=48, intermediate_size=96, max_position_embeddings=40
    )
    model = _perturbed(config, seed=3)
    hf = _hf_copy(model, config)

    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, size=(2, 17))
    ids[:, 0], ids[:, -1] = 0, 2
    ids[1, 12:] = config.pad_token_id  # a padded example
    mask = (ids != config.pad_token_id).astype(np.int64)

    ours, hf_maps = _assert_same_outputs(model, hf, ids, mask)
    spec = HeadSpec.parse("1,1,1,1")
    np.testing.assert_allclose(guidance_loss(ours, spec), guidance_loss(hf_maps, spec), rtol=1e-5)


def test_logits_attention_and_guidance_match_huggingface_bert():
    config = small_model(
        model_type="bert",
        vocab_size=120,
        hidden_size=48,
        intermediate_size=96,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )
    model = _perturbed(config, seed=4)
    hf = _hf_copy(model, config)
    ours_count = sum(
        int(np.prod(v.shape)) for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)
    )
    assert ours_count == sum(p.numel() for p in hf.parameters())  # tied decoder counted once

    cls, sep, period = 2, 3, 7
    rng = np.random.default_rng(1)
    ids = rng.integers(8, config.vocab_size, size=(2, 24))  # every position, pads included
    ids[:, 0], ids[:, -1] = cls, sep
    ids[0, 9], ids[0, 5], ids[1, 11] = sep, period, period
    ids[1, 16:] = config.pad_token_id
    ids[1, 15] = sep
    mask = (ids != config.pad_token_id).astype(np.int64)

    ours, hf_maps = _assert_same_outputs(model, hf, ids, mask)
    spec = HeadSpec.parse("first:1,token[[SEP]]:1,token[.]:1")
    vocab = {"[SEP]": sep, ".": period}
    np.testing.assert_allclose(
        guidance_loss(ours, spec, ids, vocab),
        guidance_loss(hf_maps, spec, ids, vocab),
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    ("kind", "lowercase"), [("wordpiece", False), ("wordpiece", True), ("bpe", False)]
)
def test_huggingface_reads_our_tokenizers(tmp_path, kind, lowercase):
    texts = ["The cat sees the dog. A Dog likes the ball!", "Our teacher draws a letter."] * 40
    ours = train_tokenizer(texts, 320, tmp_path, kind=kind, lowercase=lowercase)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    sample = ["The dog draws the cat. Teacher!", "a Letter [MASK] <mask> ball"]
    want = ours.encode_batch(sample)
    assert [theirs.encode(t, add_special_tokens=False) for t in sample] == want
    assert theirs.mask_token_id == ours.mask_id and theirs.pad_token_id == ours.pad_id
    assert theirs.cls_token_id == ours.bos_id and theirs.sep_token_id == ours.eos_id
