"""Tests for guided_jax.model: shapes, RoBERTa and BERT positions, the tied decoder, parameter
counts, dropout, in-layer guidance vs the public guidance_loss, padding, sharding metadata,
config."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_model
from guided_jax.guidance import Guide, HeadSpec, guidance_loss, token_masks
from guided_jax.model import REMAT_POLICIES, EncoderForMLM, ModelConfig
from guided_jax.model.encoder import bert_position_ids, position_ids, roberta_position_ids

PAD, BOS, EOS = 1, 0, 2
# Models that run: sizes shared between parameters where possible (V = P = FFN = 64), because
# every distinct initializer shape costs an XLA compilation on CPU.
SMALL = small_model(
    vocab_size=64, hidden_size=32, num_heads=8, intermediate_size=64, max_position_embeddings=64
)
NO_DROPOUT = dataclasses.replace(SMALL, dropout=0.0, attention_dropout=0.0)
ATTENTION_ONLY = dataclasses.replace(SMALL, intermediate_size=0)
# Models that are only counted (abstractly): all sizes distinct, so no term stands in for another.
COUNTED = ModelConfig(
    vocab_size=61,
    hidden_size=24,
    num_layers=3,
    num_heads=4,
    intermediate_size=40,
    max_position_embeddings=19,
    type_vocab_size=2,
)
LOGICAL_AXES = {None, "embed", "heads", "kv", "mlp", "vocab"}
MAX_WORD = 50  # inputs use ids below this, so ids MAX_WORD.. never occur


def _ids(rows: int = 2, length: int = 9, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, MAX_WORD, size=(rows, length)).astype(np.int32)
    ids[:, 0], ids[:, -1] = BOS, EOS
    ids[0, 4] = EOS  # a sentence boundary inside, for the token-set pattern
    return ids


@pytest.fixture(scope="module")
def model() -> EncoderForMLM:
    return EncoderForMLM(SMALL, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def plain_model() -> EncoderForMLM:
    return EncoderForMLM(NO_DROPOUT, rngs=nnx.Rngs(1))


def _params(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    return dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _num_params(model: nnx.Module) -> int:
    return sum(int(np.prod(v.get_value().shape)) for v in _params(model).values())


def _closed_form_count(c: ModelConfig) -> int:
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    embeddings = v * d + c.max_position_embeddings * d + c.type_vocab_size * d + 2 * d
    layer = 3 * (d * d + d) + (d * d + d) + 2 * d
    if f:
        layer += d * f + f + f * d + d + 2 * d
    head = d * d + d + 2 * d + v
    return embeddings + c.num_layers * layer + head


# ----------------------------------------------------------------------------- shapes, positions


def test_logits_shape_and_dtype(model: EncoderForMLM) -> None:
    logits, aux = model(jnp.asarray(_ids()))
    assert logits.shape == (2, 9, SMALL.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    assert aux == {}  # no guide, no attentions requested


def test_roberta_position_ids() -> None:
    ids = jnp.asarray([[0, 5, 6, 2, 1, 1], [1, 1, 0, 7, 2, 1]])
    np.testing.assert_array_equal(
        np.asarray(roberta_position_ids(ids, 1)), [[2, 3, 4, 5, 1, 1], [1, 1, 2, 3, 4, 1]]
    )
    np.testing.assert_array_equal(
        np.asarray(roberta_position_ids(jnp.asarray([[3, 0, 4, 0]]), 0)), [[1, 0, 2, 0]]
    )


def test_attention_maps_are_row_stochastic_and_hide_pads(plain_model: EncoderForMLM) -> None:
    ids = _ids()
    ids[1, -3:] = PAD
    _, aux = plain_model(jnp.asarray(ids), return_attentions=True)
    maps = aux["attentions"]
    assert isinstance(maps, tuple) and len(maps) == SMALL.num_layers
    for attention in maps:
        attention = np.asarray(attention)
        assert attention.shape == (2, SMALL.num_heads, 9, 9)
        np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-5)
        assert np.abs(attention[1, :, :, -3:]).max() < 1e-12  # no query attends to a pad key


# ----------------------------------------------------------------------------- tied decoder, counts


def test_decoder_is_tied_to_word_embeddings() -> None:
    abstract = nnx.eval_shape(lambda: EncoderForMLM(COUNTED, rngs=nnx.Rngs(0)))
    vocab_sized = sorted(
        ".".join(map(str, path))
        for path, v in _params(abstract).items()
        if COUNTED.vocab_size in v.get_value().shape
    )
    assert vocab_sized == ["embeddings.word.embedding", "head.bias"]  # no decoder kernel

    model = EncoderForMLM(NO_DROPOUT, rngs=nnx.Rngs(2))
    ids = jnp.asarray(_ids())
    unused = MAX_WORD + 3  # a word that is not in the input, so only the decoder sees its row
    assert not (np.asarray(ids) == unused).any()
    before, _ = model(ids)
    embedding = model.embeddings.word.embedding
    direction = jax.random.normal(jax.random.key(0), (SMALL.hidden_size,))
    embedding[...] = embedding[...].at[unused].add(direction)
    after, _ = model(ids)
    before, after = np.asarray(before), np.asarray(after)
    assert np.abs(after[..., unused] - before[..., unused]).min() > 1e-3
    np.testing.assert_array_equal(np.delete(after, unused, -1), np.delete(before, unused, -1))


@pytest.mark.parametrize("model_type", ["roberta", "bert"])
@pytest.mark.parametrize("intermediate_size", [40, 0], ids=["full", "attention_only"])
def test_parameter_count_matches_closed_form(intermediate_size: int, model_type: str) -> None:
    config = dataclasses.replace(
        COUNTED, intermediate_size=intermediate_size, model_type=model_type, pad_token_id=0
    )
    model = nnx.eval_shape(lambda: EncoderForMLM(config, rngs=nnx.Rngs(0)))
    assert _num_params(model) == _closed_form_count(config)


def test_bert_and_roberta_share_every_parameter_shape() -> None:
    """One set of building blocks: the types differ in position numbering, not in weights."""
    bert_config = dataclasses.replace(COUNTED, model_type="bert", pad_token_id=0)
    roberta = nnx.eval_shape(lambda: EncoderForMLM(COUNTED, rngs=nnx.Rngs(0)))
    bert = nnx.eval_shape(lambda: EncoderForMLM(bert_config, rngs=nnx.Rngs(0)))
    shapes = {path: v.get_value().shape for path, v in _params(roberta).items()}
    assert {path: v.get_value().shape for path, v in _params(bert).items()} == shapes
    assert EncoderForMLM is EncoderForMLM


def test_attention_only_variant_has_no_ffn() -> None:
    lean_config = dataclasses.replace(COUNTED, intermediate_size=0)
    full = nnx.eval_shape(lambda: EncoderForMLM(COUNTED, rngs=nnx.Rngs(0)))
    lean = nnx.eval_shape(lambda: EncoderForMLM(lean_config, rngs=nnx.Rngs(0)))
    assert any("ffn" in map(str, path) for path in _params(full))
    assert not any(p.startswith("ffn") for path in _params(lean) for p in map(str, path))
    d, f = COUNTED.hidden_size, COUNTED.intermediate_size
    ffn_and_norm = d * f + f + f * d + d + 2 * d
    assert _num_params(full) - _num_params(lean) == COUNTED.num_layers * ffn_and_norm


def test_attention_only_forward() -> None:
    lean = EncoderForMLM(dataclasses.replace(ATTENTION_ONLY, dropout=0.0), rngs=nnx.Rngs(1))
    spec = HeadSpec.parse("0,1,1,4")
    logits, aux = lean(jnp.asarray(_ids()), guide=Guide(spec))
    assert logits.shape == (2, 9, SMALL.vocab_size) and np.isfinite(np.asarray(logits)).all()
    assert aux["guidance"].shape == (SMALL.num_layers, 3)


# ----------------------------------------------------------------------------- dropout


def test_dropout_key_none_is_deterministic_and_keys_vary(model: EncoderForMLM) -> None:
    ids = jnp.asarray(_ids())
    eval_a, _ = model(ids)
    eval_b, _ = model(ids, dropout_key=None)
    np.testing.assert_array_equal(np.asarray(eval_a), np.asarray(eval_b))
    train_a, _ = model(ids, dropout_key=jax.random.key(1))
    train_a2, _ = model(ids, dropout_key=jax.random.key(1))
    train_b, _ = model(ids, dropout_key=jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(train_a), np.asarray(train_a2))
    assert np.abs(np.asarray(train_a) - np.asarray(train_b)).max() > 1e-3
    assert np.abs(np.asarray(train_a) - np.asarray(eval_a)).max() > 1e-3


def test_zero_dropout_ignores_the_key(plain_model: EncoderForMLM) -> None:
    ids = jnp.asarray(_ids())
    eval_logits, _ = plain_model(ids)
    train_logits, _ = plain_model(ids, dropout_key=jax.random.key(3))
    np.testing.assert_allclose(np.asarray(train_logits), np.asarray(eval_logits), atol=1e-6)


# ----------------------------------------------------------------------------- guidance


class _Vocab:
    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    def token_to_id(self, token: str) -> int:
        return self.vocab[token]


@pytest.mark.parametrize(
    ("text", "tokens", "start"),
    [("0,1,1,4", (), 0), ("1,1,1,0,2,1", ("</s>", "<s>"), 1)],
    ids=["reference", "tokens_start1"],
)
def test_in_layer_guidance_equals_guidance_loss(
    plain_model: EncoderForMLM, text: str, tokens: tuple, start: int
) -> None:
    ids = _ids()
    ids[1, -2:] = PAD  # padding is not excluded from the loss (reference behaviour)
    vocab = {"<s>": BOS, "</s>": EOS}
    spec = HeadSpec.parse(text, tokens=tokens, start_layer=start)
    masks = token_masks(jnp.asarray(ids), spec.token_ids(_Vocab(vocab))) if tokens else None
    _, aux = plain_model(jnp.asarray(ids), guide=Guide(spec, masks), return_attentions=True)
    guidance = np.asarray(aux["guidance"])
    assert guidance.shape == (SMALL.num_layers - start, len(spec.groups))
    assert (guidance > 0).all()
    want = guidance_loss(aux["attentions"], spec, ids, vocab)
    np.testing.assert_allclose(guidance.sum(), float(want), rtol=1e-5)
    # per guided layer too: the first row belongs to layer `start`
    first = guidance_loss(aux["attentions"][start : start + 1], HeadSpec(spec.groups), ids, vocab)
    np.testing.assert_allclose(guidance[0].sum(), float(first), rtol=1e-5)


def test_guidance_after_dropout_option(model: EncoderForMLM) -> None:
    """Faithful mode scores the dropped maps; after_dropout=False the clean softmax output."""
    ids = jnp.asarray(_ids())
    spec = HeadSpec.parse("0,1,1,4")
    key = jax.random.key(4)
    _, clean = model(
        ids, dropout_key=key, guide=Guide(spec, after_dropout=False), return_attentions=True
    )
    _, dropped = model(ids, dropout_key=key, guide=Guide(spec), return_attentions=True)
    # the maps returned for analysis are the pre-dropout ones of the same forward pass
    want = float(guidance_loss(clean["attentions"], spec))
    np.testing.assert_allclose(float(clean["guidance"].sum()), want, rtol=1e-5)
    assert abs(float(dropped["guidance"].sum()) - want) > 1e-3 * want
    # without a dropout key both modes agree
    _, a = model(ids, guide=Guide(spec, after_dropout=False))
    _, b = model(ids, guide=Guide(spec))
    np.testing.assert_allclose(np.asarray(a["guidance"]), np.asarray(b["guidance"]), rtol=1e-6)


def test_gradients_of_guidance_and_mlm_reach_the_right_parameters(
    plain_model: EncoderForMLM,
) -> None:
    ids = jnp.asarray(_ids())
    spec = HeadSpec.parse("0,1,1,4", start_layer=1)
    graphdef, params = nnx.split(plain_model, nnx.Param)
    weights = jax.random.normal(jax.random.key(5), (2, 9, SMALL.vocab_size))

    def losses(p):
        logits, aux = nnx.merge(graphdef, p)(ids, guide=Guide(spec))
        return jnp.stack([jnp.sum(aux["guidance"]), jnp.sum(logits * weights)])

    @jax.jit
    def both_gradients(p):
        _, pullback = jax.vjp(losses, p)
        return pullback(jnp.array([1.0, 0.0]))[0], pullback(jnp.array([0.0, 1.0]))[0]

    ag_grads, mlm_grads = (
        {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(g)}
        for g in both_gradients(params)
    )

    def grad(grads, *path):
        return grads[path]

    assert np.abs(grad(ag_grads, "layers", 0, "attention", "qkv", "kernel")).max() > 0
    assert np.abs(grad(ag_grads, "layers", 1, "attention", "qkv", "kernel")).max() > 0
    # the last layer's attention output, FFN and the MLM head do not affect the guidance loss
    assert not grad(ag_grads, "layers", 1, "attention", "out", "kernel").any()
    assert not grad(ag_grads, "layers", 1, "ffn", "up", "kernel").any()
    assert not grad(ag_grads, "head", "dense", "kernel").any()
    # the MLM output depends on every parameter (the word embeddings also as the decoder)
    for path, value in mlm_grads.items():
        assert np.abs(value).max() > 0, path
    unused = MAX_WORD + 1  # not an input: its embedding row only gets the decoder's gradient
    assert np.abs(mlm_grads[("embeddings", "word", "embedding")][unused]).max() > 0


# ----------------------------------------------------------------------------- padding


def test_padding_does_not_change_non_pad_logits(plain_model: EncoderForMLM) -> None:
    ids = _ids()
    pads = np.full((3,), PAD, np.int32)
    # row 0 padded on the right, row 1 on the left: RoBERTa positions skip the pads either way
    padded = np.stack([np.concatenate([ids[0], pads]), np.concatenate([pads, ids[1]])])
    logits, _ = plain_model(jnp.asarray(ids))
    padded_logits, _ = plain_model(jnp.asarray(padded))
    logits, padded_logits = np.asarray(logits), np.asarray(padded_logits)
    np.testing.assert_allclose(padded_logits[0, :9], logits[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(padded_logits[1, 3:], logits[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- BERT

# Our WordPiece's ids: [PAD]=0, [CLS]=2, [SEP]=3; BERT's two token types and LayerNorm eps.
BERT_PAD, CLS, SEP, PERIOD = 0, 2, 3, 7
BERT = dataclasses.replace(
    NO_DROPOUT, model_type="bert", pad_token_id=BERT_PAD, type_vocab_size=2, layer_norm_eps=1e-12
)


def _bert_ids(rows: int = 2, length: int = 9) -> np.ndarray:
    ids = _ids(rows, length)  # words from 5 up
    ids[:, 0], ids[:, -1] = CLS, SEP
    ids[0, 4], ids[1, 3] = SEP, PERIOD
    return ids


@pytest.fixture(scope="module")
def bert_model() -> EncoderForMLM:
    return EncoderForMLM(BERT, rngs=nnx.Rngs(4))


def test_bert_positions_count_from_zero_pads_included() -> None:
    ids = jnp.asarray([[CLS, 5, 6, SEP, 0, 0], [0, 0, CLS, 7, SEP, 0]])
    want = [[0, 1, 2, 3, 4, 5]] * 2
    np.testing.assert_array_equal(np.asarray(bert_position_ids(ids)), want)
    np.testing.assert_array_equal(np.asarray(position_ids(ids, BERT)), want)
    assert position_ids(ids, NO_DROPOUT)[0, 0] == NO_DROPOUT.pad_token_id + 1  # RoBERTa's
    assert BERT.max_block_size == BERT.max_position_embeddings == 64
    assert NO_DROPOUT.max_block_size == 64 - 2


def test_bert_position_row_of_the_pad_id_is_trained(bert_model: EncoderForMLM) -> None:
    """[PAD] = 0 is also position 0 ([CLS]'s): only the word row of the pad starts at zero."""
    assert not np.asarray(bert_model.embeddings.word.embedding[...][BERT_PAD]).any()
    assert np.asarray(bert_model.embeddings.position.embedding[...][0]).any()
    assert bert_model.embeddings.token_type.embedding[...].shape == (2, BERT.hidden_size)


def test_bert_guidance_on_sep_and_period_equals_guidance_loss(
    bert_model: EncoderForMLM,
) -> None:
    ids = _bert_ids()
    vocab = {"[SEP]": SEP, ".": PERIOD}
    spec = HeadSpec.parse("first:1,token[[SEP]]:1,token[.]:1")
    masks = token_masks(jnp.asarray(ids), spec.token_ids(_Vocab(vocab)))
    logits, aux = bert_model(jnp.asarray(ids), guide=Guide(spec, masks), return_attentions=True)
    assert logits.shape == (2, 9, BERT.vocab_size) and np.isfinite(np.asarray(logits)).all()
    guidance = np.asarray(aux["guidance"])
    assert guidance.shape == (BERT.num_layers, 3) and (guidance > 0).all()
    want = guidance_loss(aux["attentions"], spec, ids, vocab)
    np.testing.assert_allclose(guidance.sum(), float(want), rtol=1e-5)


def test_bert_right_padding_keeps_logits_and_left_padding_moves_positions(
    bert_model: EncoderForMLM,
) -> None:
    ids = _bert_ids()
    pads = np.full((2, 3), BERT_PAD, np.int32)
    logits = np.asarray(bert_model(jnp.asarray(ids))[0])
    right = np.asarray(bert_model(jnp.asarray(np.concatenate([ids, pads], 1)))[0])
    left = np.asarray(bert_model(jnp.asarray(np.concatenate([pads, ids], 1)))[0])
    np.testing.assert_allclose(right[:, :9], logits, rtol=1e-5, atol=1e-5)
    assert np.abs(left[:, 3:] - logits).max() > 1e-3  # BERT positions count the pads


def test_bert_input_may_use_every_position(bert_model: EncoderForMLM) -> None:
    def logits_shape(length: int):
        ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
        return jax.eval_shape(lambda x: bert_model(x)[0], ids).shape

    fits = BERT.max_position_embeddings
    assert logits_shape(fits) == (1, fits, BERT.vocab_size)
    with pytest.raises(ValueError, match=f"{fits + 1} tokens .* model_type=bert"):
        logits_shape(fits + 1)


def test_model_type_is_validated() -> None:
    with pytest.raises(ValueError, match=r"model\.model_type must be one of .*'gpt2'"):
        ModelConfig(model_type="gpt2").validate()
    # BERT has no padding offset: two positions are two tokens (RoBERTa's are none).
    assert ModelConfig(model_type="bert", max_position_embeddings=2).max_block_size == 2
    with pytest.raises(ValueError, match="RoBERTa's padding offset"):
        ModelConfig(max_position_embeddings=2).validate()


# ----------------------------------------------------------------------------- metadata, config


def test_every_param_has_logical_axes_matching_its_rank(model: EncoderForMLM) -> None:
    params = _params(model)
    assert len(params) == 10 + 12 * SMALL.num_layers
    for path, variable in params.items():
        axes = variable.get_metadata().get("logical_axes")
        assert axes is not None, path
        assert len(axes) == variable[...].ndim, (path, axes, variable[...].shape)
        assert set(axes) <= LOGICAL_AXES, (path, axes)
    assert params[("embeddings", "word", "embedding")].get_metadata()["logical_axes"] == (
        "vocab",
        "embed",
    )
    qkv = params[("layers", 0, "attention", "qkv", "kernel")]
    assert qkv.get_metadata()["logical_axes"] == (None, "embed", "heads", "kv")
    assert qkv[...].shape == (3, SMALL.hidden_size, SMALL.num_heads, SMALL.head_dim)


def test_pad_embedding_rows_start_at_zero(model: EncoderForMLM) -> None:
    assert not np.asarray(model.embeddings.word.embedding[...][PAD]).any()
    assert not np.asarray(model.embeddings.position.embedding[...][PAD]).any()
    assert np.asarray(model.embeddings.word.embedding[...][PAD + 1]).any()


def test_config_from_mapping() -> None:
    values = dict(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=0)
    config = ModelConfig.from_mapping(values)
    assert config == ModelConfig(**values)
    assert config.head_dim == 16 and config.max_block_size == 512
    with pytest.raises(ValueError, match="hidden_sise"):
        ModelConfig.from_mapping({**values, "hidden_sise": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hidden_size = 8  # type: ignore[misc]


def test_config_validate_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"hidden_size=30 is not divisible by model\.num_heads=4"):
        ModelConfig(hidden_size=30, num_heads=4).validate()
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig.from_mapping({"hidden_size": 30, "num_heads": 4})
    with pytest.raises(ValueError, match="num_layers must be positive"):
        ModelConfig(num_layers=0).validate()
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelConfig(intermediate_size=-1).validate()
    with pytest.raises(ValueError, match="attention_dropout"):
        ModelConfig(attention_dropout=1.0).validate()
    with pytest.raises(ValueError, match="float64"):
        ModelConfig(dtype="float64").validate()
    ModelConfig().validate()
    SMALL.validate()


def test_input_longer_than_positions_is_refused(plain_model: EncoderForMLM) -> None:
    def logits_shape(length: int):
        ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
        return jax.eval_shape(lambda x: plain_model(x)[0], ids).shape

    fits = SMALL.max_position_embeddings - SMALL.pad_token_id - 1
    assert logits_shape(fits) == (1, fits, SMALL.vocab_size)
    with pytest.raises(ValueError, match=f"{fits + 1} tokens is longer than the model's {fits}"):
        logits_shape(fits + 1)


def test_explicit_attention_mask_overrides_pad_ids(plain_model: EncoderForMLM) -> None:
    # MLM noise can draw the pad id; the attention mask must come from the clean batch.
    ids = jnp.asarray(_ids(rows=1))
    noisy = ids.at[0, 2].set(SMALL.pad_token_id)
    _, aux = plain_model(noisy, attention_mask=jnp.ones_like(ids, bool), return_attentions=True)
    assert float(aux["attentions"][0][0, :, :, 2].min()) > 0.0
    _, aux = plain_model(noisy, return_attentions=True)
    assert float(aux["attentions"][0][0, :, :, 2].max()) == 0.0


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"pad_token_id": 60}, "pad_token_id=60"),
        ({"max_position_embeddings": 2}, "max_position_embeddings=2"),
    ],
)
def test_config_rejects_inconsistent_ids_and_positions(overrides, match) -> None:
    base = dict(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_mapping({**base, **overrides})


# ----------------------------------------------------------------------------- remat, dtype


def _graphdef(config: ModelConfig) -> nnx.GraphDef:
    return nnx.graphdef(nnx.eval_shape(lambda: EncoderForMLM(config, rngs=nnx.Rngs(0))))


def _loss_and_grads(config: ModelConfig, params: nnx.State) -> tuple[float, dict, list]:
    """A loss over the logits and the in-layer guidance statistics of every layer, its
    gradients and the remat policies in its program, for ``params`` run under ``config``.
    (Without dropout, which triples the compile time on CPU; remat with dropout is checked
    end to end in test_train.py.)"""
    ids = jnp.asarray(_ids())
    graphdef = _graphdef(config)
    weights = jax.random.normal(jax.random.key(7), (*ids.shape, config.vocab_size))
    guide = Guide(HeadSpec.parse("0,1,1,4"))

    def loss(p: nnx.State) -> jax.Array:
        logits, aux = nnx.merge(graphdef, p)(ids, guide=guide)
        return jnp.mean(logits * weights) + jnp.sum(aux["guidance"])

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    policies = _remat_policies(jax.make_jaxpr(loss)(params).jaxpr)
    grads = {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(grads)}
    return float(value), grads, policies


def _remat_policies(jaxpr) -> list:
    """The policy of every rematerialised region in ``jaxpr`` and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
            found.append(eqn.params["policy"])
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    found.extend(_remat_policies(sub))
    return found


@pytest.fixture(scope="module")
def no_remat_grads(plain_model: EncoderForMLM) -> tuple[float, dict, list]:
    return _loss_and_grads(NO_DROPOUT, nnx.state(plain_model, nnx.Param))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_loss_and_gradients(
    plain_model: EncoderForMLM, no_remat_grads: tuple[float, dict, list], remat: str
) -> None:
    want_loss, want, no_policies = no_remat_grads
    config = dataclasses.replace(NO_DROPOUT, remat=remat)
    got_loss, got, policies = _loss_and_grads(config, nnx.state(plain_model, nnx.Param))
    # Each layer is one rematerialised region with the configured policy (none without remat).
    assert no_policies == []
    assert policies == [REMAT_POLICIES[remat]] * config.num_layers
    _assert_same_loss_and_grads((got_loss, got), (want_loss, want), rtol=1e-6)


def _assert_same_loss_and_grads(got: tuple[float, dict], want: tuple[float, dict], rtol: float):
    assert got[0] == pytest.approx(want[0], rel=rtol)
    assert got[1].keys() == want[1].keys()
    assert all(np.abs(g).max() > 0 for g in want[1].values())  # every parameter is checked
    for path, value in want[1].items():
        scale = np.abs(value).max()
        np.testing.assert_allclose(got[1][path], value, rtol=rtol, atol=rtol * scale, err_msg=path)


@pytest.mark.parametrize("attention", ["flash", "pallas"])
def test_blockwise_attention_gives_the_same_loss_and_gradients(
    plain_model: EncoderForMLM, no_remat_grads: tuple[float, dict, list], attention: str
) -> None:
    want_loss, want, _ = no_remat_grads
    config = dataclasses.replace(NO_DROPOUT, attention=attention)
    got_loss, got, _ = _loss_and_grads(config, nnx.state(plain_model, nnx.Param))
    _assert_same_loss_and_grads((got_loss, got), (want_loss, want), rtol=1e-5)


def test_attention_kind_is_validated() -> None:
    with pytest.raises(ValueError, match=r"model\.attention must be one of .*'flash'"):
        ModelConfig(attention="cudnn").validate()


def test_remat_policy_is_validated() -> None:
    with pytest.raises(ValueError, match=r"model\.remat must be one of .*'everything'"):
        ModelConfig(remat="everything").validate()
    with pytest.raises(ValueError, match=r"model\.remat"):
        ModelConfig.from_mapping({"remat": "Full"})
    for remat in ("none", "full", "dots"):
        ModelConfig(remat=remat).validate()


def test_bfloat16_compute_keeps_float32_parameters_and_logits(plain_model: EncoderForMLM) -> None:
    config = dataclasses.replace(NO_DROPOUT, dtype="bfloat16")
    abstract = nnx.eval_shape(lambda: EncoderForMLM(config, rngs=nnx.Rngs(1)))
    assert _params(abstract).keys() == _params(plain_model).keys()
    assert {v.get_value().dtype for v in _params(abstract).values()} == {jnp.dtype("float32")}

    ids = jnp.asarray(_ids())
    guide = Guide(HeadSpec.parse("0,1,1,4"))
    params = nnx.state(plain_model, nnx.Param)

    @functools.partial(jax.jit, static_argnums=0)
    def forward(graphdef: nnx.GraphDef, p: nnx.State):
        logits, aux = nnx.merge(graphdef, p)(ids, guide=guide)
        return logits, aux["guidance"]

    got, got_guidance = forward(_graphdef(config), params)
    want, want_guidance = forward(_graphdef(NO_DROPOUT), params)
    assert got.dtype == jnp.float32
    got, want = np.asarray(got), np.asarray(want)
    error, scale = np.abs(got - want).max(), np.abs(want).max()
    assert 0 < error < 0.05 * scale  # computed in bfloat16 (not identical), yet close
    np.testing.assert_allclose(
        np.asarray(got_guidance, np.float32), np.asarray(want_guidance), rtol=0.05
    )
