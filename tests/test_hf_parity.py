"""Our RoBERTa equals HuggingFace's PyTorch RobertaForMaskedLM given the same weights.

The reference implementation is a fork of HF transformers, so matching its RoBERTa logits and
attention maps is the check that the model (positions with the padding offset, post-LN blocks,
GELU, tied decoder with bias) is faithful. Skipped where torch/transformers are not installed
(they are not dependencies of the package).
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from guided_jax.guidance import HeadSpec, guidance_loss
from guided_jax.model import ModelConfig, RobertaForMLM

torch = pytest.importorskip("torch", reason="torch is not installed (optional parity check)")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (optional parity check)"
)


def _hf_copy(model: RobertaForMLM, config: ModelConfig):
    hf_config = transformers.RobertaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps,
        hidden_act="gelu",
        pad_token_id=config.pad_token_id,
        bos_token_id=0,
        eos_token_id=2,
        attn_implementation="eager",
    )
    hf = transformers.RobertaForMaskedLM(hf_config).eval()
    d = config.hidden_size

    def t(x, transpose=False):
        array = np.array(x[...], dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(array.T if transpose else array))

    def dense(target, kernel, bias):
        target.weight.data = t(np.asarray(kernel[...]).reshape(-1, bias[...].size), True)
        target.bias.data = t(np.asarray(bias[...]).reshape(-1))

    def norm(target, ln):
        target.weight.data, target.bias.data = t(ln.scale), t(ln.bias)

    emb = hf.roberta.embeddings
    emb.word_embeddings.weight.data = t(model.embeddings.word.embedding)
    emb.position_embeddings.weight.data = t(model.embeddings.position.embedding)
    emb.token_type_embeddings.weight.data = t(model.embeddings.token_type.embedding)
    norm(emb.LayerNorm, model.embeddings.norm)
    for ours, theirs in zip(model.layers, hf.roberta.encoder.layer, strict=True):
        qkv_kernel = np.asarray(ours.attention.qkv.kernel[...])  # [3, d, H, hd]
        qkv_bias = np.asarray(ours.attention.qkv.bias[...])  # [3, H, hd]
        attn = theirs.attention.self
        for i, target in enumerate((attn.query, attn.key, attn.value)):
            target.weight.data = t(qkv_kernel[i].reshape(d, d), True)
            target.bias.data = t(qkv_bias[i].reshape(d))
        dense(theirs.attention.output.dense, ours.attention.out.kernel, ours.attention.out.bias)
        norm(theirs.attention.output.LayerNorm, ours.attention_norm)
        dense(theirs.intermediate.dense, ours.ffn.up.kernel, ours.ffn.up.bias)
        dense(theirs.output.dense, ours.ffn.down.kernel, ours.ffn.down.bias)
        norm(theirs.output.LayerNorm, ours.ffn_norm)
    dense(hf.lm_head.dense, model.head.dense.kernel, model.head.dense.bias)
    norm(hf.lm_head.layer_norm, model.head.norm)
    hf.lm_head.bias.data = t(model.head.bias)
    hf.tie_weights()
    return hf


def test_logits_and_attention_match_huggingface_roberta():
    config = ModelConfig(
        vocab_size=120,
        hidden_size=48,
        num_layers=2,
        num_heads=4,
        intermediate_size=96,
        max_position_embeddings=40,
    )
    model = RobertaForMLM(config, rngs=nnx.Rngs(3))
    # Perturb the zero-initialised biases and LayerNorms so that every mapped tensor matters.
    rng = np.random.default_rng(0)
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param):
            value = np.asarray(variable[...])
            variable[...] = jnp.asarray(value + 0.05 * rng.standard_normal(value.shape))
    hf = _hf_copy(model, config)

    ids = rng.integers(3, config.vocab_size, size=(2, 17))
    ids[:, 0], ids[:, -1] = 0, 2
    ids[1, 12:] = config.pad_token_id  # a padded example
    mask = (ids != config.pad_token_id).astype(np.int64)

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
    spec = HeadSpec.parse("1,1,1,1")
    hf_maps = [jnp.asarray(a.numpy()) for a in out.attentions]
    np.testing.assert_allclose(
        guidance_loss(aux["attentions"], spec), guidance_loss(hf_maps, spec), rtol=1e-5
    )
