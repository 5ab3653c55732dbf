"""RoBERTa and BERT encoders with an MLM head (flax.nnx), plus attention-only layers.

The two types share every building block; they differ only in how positions are numbered
(RoBERTa counts non-pad tokens from ``pad_token_id + 1``, BERT uses ``0..n-1``) and in their
usual settings (BERT: two token types, LayerNorm eps 1e-12, ``[PAD]`` = 0), which come from the
config. The MLM heads are the same: dense, GELU, LayerNorm, decoder tied to the word embeddings
plus a bias. Token-type ids are all zero (single-segment MLM, as in the reference).

The forward pass returns ``(mlm_logits, aux)``. ``aux["guidance"]`` holds, for each guided layer,
the per-group guidance losses computed inside that layer, so the guided heads' probabilities
never leave it and the unguided heads' are never kept. Parameters carry ``logical_axes``
metadata (embed, heads, kv, mlp, vocab) for sharding rules.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from guided_jax.guidance import Guide
from guided_jax.kernels.dense import attention_bias, attention_probs
from guided_jax.kernels.dropout import dropout
from guided_jax.model.attention import layer_attention
from guided_jax.model.config import REMAT_POLICIES, ModelConfig
from guided_jax.sharding import BATCH_AXES


def _init(config: ModelConfig) -> nnx.Initializer:
    return nnx.initializers.normal(config.initializer_range)


def _layer_norm(config: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        config.hidden_size,
        epsilon=config.layer_norm_eps,
        dtype=config.compute_dtype,
        rngs=rngs,
        scale_metadata={"logical_axes": ("embed",)},
        bias_metadata={"logical_axes": ("embed",)},
    )


def _dense(
    config: ModelConfig, d_in: int, d_out: int, axes: tuple[str, str], rngs: nnx.Rngs
) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        kernel_init=_init(config),
        dtype=config.compute_dtype,
        rngs=rngs,
        kernel_metadata={"logical_axes": axes},
        bias_metadata={"logical_axes": axes[1:]},
    )


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU in the reference's form, ``x/2 (1 + erf(x/sqrt 2))``: XLA evaluates ``erf``
    with one rational approximation, much cheaper on CPU than the ``erfc`` of ``jax.nn.gelu``
    (benchmarks/RESULTS.md)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (2.0**-0.5)))


def _fold(key: jax.Array | None, index: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, index)


def constrain_to_batch(x: jax.Array) -> jax.Array:
    """Keeps activations split over the mesh's batch axes when one is set (``jax.set_mesh``),
    so the partitioner never has to guess their layout from the parameters'."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def _lookup(embed: nnx.Embed, ids: jax.Array) -> jax.Array:
    """Rows of an embedding table. On a mesh the table is gathered whole first, as FSDP does
    with every weight before use: a lookup into an ``embed``-sharded table would come out
    split along the features and need an all-to-all to reach the batch layout."""
    table = embed.embedding[...]
    if not jax.sharding.get_abstract_mesh().empty:
        table = jax.lax.with_sharding_constraint(table, P())
    return constrain_to_batch(jnp.take(table, ids, axis=0).astype(embed.dtype))


def roberta_position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """Positions count non-pad tokens from ``pad_token_id + 1``; pads sit at ``pad_token_id``."""
    not_pad = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + pad_token_id


def bert_position_ids(input_ids: jax.Array) -> jax.Array:
    """Positions ``0..n-1`` whatever the tokens (pads included), as BERT numbers them."""
    return jax.lax.broadcasted_iota(jnp.int32, input_ids.shape, input_ids.ndim - 1)


def position_ids(input_ids: jax.Array, config: ModelConfig) -> jax.Array:
    """The position of every token for ``config.model_type``."""
    if config.model_type == "bert":
        return bert_position_ids(input_ids)
    return roberta_position_ids(input_ids, config.pad_token_id)


class Embeddings(nnx.Module):
    """Word + learned absolute position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config

        def embed(rows: int, row_axis: str | None) -> nnx.Embed:
            return nnx.Embed(
                rows,
                config.hidden_size,
                embedding_init=_init(config),
                dtype=config.compute_dtype,
                rngs=rngs,
                embedding_metadata={"logical_axes": (row_axis, "embed")},
            )

        self.word = embed(config.vocab_size, "vocab")
        self.position = embed(config.max_position_embeddings, None)
        self.token_type = embed(config.type_vocab_size, None)
        # Like torch's padding_idx, the pad rows start at zero: the word's always, the
        # position's only where pads have a position of their own (RoBERTa).
        pad = config.pad_token_id
        self.word.embedding[...] = self.word.embedding[...].at[pad].set(0.0)
        if config.model_type == "roberta":
            self.position.embedding[...] = self.position.embedding[...].at[pad].set(0.0)
        self.norm = _layer_norm(config, rngs)

    def __call__(self, input_ids: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        positions = position_ids(input_ids, self.config)
        x = (
            _lookup(self.word, input_ids)
            + _lookup(self.position, positions)
            + _lookup(self.token_type, jnp.zeros_like(input_ids))
        )
        x = self.norm(x)
        return dropout(x, self.config.dropout, dropout_key)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with a fused QKV projection."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, h, hd = config.hidden_size, config.num_heads, config.head_dim
        self.qkv = nnx.Einsum(
            "bsd,cdhk->cbshk",
            (3, d, h, hd),
            (3, h, hd),
            kernel_init=_init(config),
            dtype=config.compute_dtype,
            rngs=rngs,
            kernel_metadata={"logical_axes": (None, "embed", "heads", "kv")},
            bias_metadata={"logical_axes": (None, "heads", "kv")},
        )
        self.out = nnx.Einsum(
            "bshk,hkd->bsd",
            (h, hd, d),
            (d,),
            kernel_init=_init(config),
            dtype=config.compute_dtype,
            rngs=rngs,
            kernel_metadata={"logical_axes": ("heads", "kv", "embed")},
            bias_metadata={"logical_axes": ("embed",)},
        )
        self.attention_dropout = config.attention_dropout
        self.kind = config.attention  # which kernel: dense | flash | pallas

    def __call__(
        self,
        x: jax.Array,
        key_mask: jax.Array,
        dropout_key: jax.Array | None,
        guide: Guide | None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        q, k, v = self.qkv(x)
        values, losses = layer_attention(
            self.kind,
            q,
            k,
            v,
            key_mask,
            dropout_rate=self.attention_dropout,
            dropout_key=dropout_key,
            guide=guide,
            segment_ids=segment_ids,
        )
        return self.out(values), losses


class FeedForward(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.up = _dense(
            config, config.hidden_size, config.intermediate_size, ("embed", "mlp"), rngs
        )
        self.down = _dense(
            config, config.intermediate_size, config.hidden_size, ("mlp", "embed"), rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(gelu(self.up(x)))


class EncoderLayer(nnx.Module):
    """Post-LN block: ``LN(x + attn(x))`` then ``LN(x + ffn(x))`` (no FFN when attention-only)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.attention = SelfAttention(config, rngs)
        self.attention_norm = _layer_norm(config, rngs)
        self.ffn = FeedForward(config, rngs) if config.intermediate_size else None
        self.ffn_norm = _layer_norm(config, rngs) if config.intermediate_size else None
        self.dropout = config.dropout

    def __call__(
        self,
        x: jax.Array,
        key_mask: jax.Array,
        dropout_key: jax.Array | None,
        guide: Guide | None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        def drop(y: jax.Array, site: int) -> jax.Array:
            return dropout(y, self.dropout, _fold(dropout_key, site))

        h, losses = self.attention(x, key_mask, _fold(dropout_key, 0), guide, segment_ids)
        x = self.attention_norm(x + drop(h, 1))
        if self.ffn is not None:
            x = self.ffn_norm(x + drop(self.ffn(x), 2))
        return x, losses


class MLMHead(nnx.Module):
    """Dense + GELU + LayerNorm, then the decoder tied to the word embeddings plus a bias."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.dense = _dense(
            config, config.hidden_size, config.hidden_size, ("embed", "embed"), rngs
        )
        self.norm = _layer_norm(config, rngs)
        self.bias = nnx.Param(jnp.zeros((config.vocab_size,), jnp.float32), logical_axes=("vocab",))

    def __call__(self, x: jax.Array, word_embedding: nnx.Embed) -> jax.Array:
        x = self.norm(gelu(self.dense(x)))
        return word_embedding.attend(x) + self.bias[...].astype(x.dtype)


class EncoderForMLM(nnx.Module):
    """The encoder (RoBERTa or BERT, per ``config.model_type``) and its MLM head; see the
    module docstring for the returned ``aux``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = Embeddings(config, rngs)
        self.layers = nnx.List([EncoderLayer(config, rngs) for _ in range(config.num_layers)])
        self.head = MLMHead(config, rngs)

    def _run_layer(
        self,
        layer: EncoderLayer,
        x: jax.Array,
        key_mask: jax.Array,
        key: jax.Array | None,
        guide: Guide | None,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """One layer, rematerialised in the backward per ``config.remat``."""
        if self.config.remat == "none":
            return layer(x, key_mask, key, guide, segment_ids)

        def forward(layer: EncoderLayer, x: jax.Array, mask: jax.Array, key: jax.Array | None):
            return layer(x, mask, key, guide, segment_ids)

        policy = REMAT_POLICIES[self.config.remat]
        return nnx.remat(forward, policy=policy)(layer, x, key_mask, key)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        guide: Guide | None = None,
        return_attentions: bool = False,
        return_hidden: bool = False,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """``(mlm_logits [B, n, V], aux)``; arguments as for :meth:`encode`. ``return_hidden``
        also returns the last layer's output ``[B, n, d]`` in ``aux["hidden"]`` (for fine-tuning
        heads; under jit an unused MLM head costs nothing)."""
        hidden, aux = self.encode(
            input_ids,
            attention_mask=attention_mask,
            dropout_key=dropout_key,
            guide=guide,
            return_attentions=return_attentions,
            segment_ids=segment_ids,
        )
        if return_hidden:
            aux["hidden"] = hidden
        return self.logits(hidden), aux

    def logits(self, hidden: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """MLM logits (float32) of the encoder's output; only at ``positions`` ``[B, K]`` when
        given: the vocabulary projection is the costliest matmul, and the MLM loss needs only
        the ~15% of positions it selected."""
        if positions is not None:
            hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
        return self.head(hidden, self.embeddings.word).astype(jnp.float32)

    def encode(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        guide: Guide | None = None,
        return_attentions: bool = False,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """The encoder's output ``[B, n, d]`` and ``aux``. ``attention_mask`` ``[B, n]`` marks
        the keys to attend to (default: the non-pad ids; pass the unmasked batch's when MLM noise
        may have drawn the pad id, as the reference takes it from the tokenizer);
        ``dropout_key=None`` runs deterministically (eval); ``guide`` turns on the guidance
        statistics; ``return_attentions`` also returns every layer's full maps (for analysis);
        ``segment_ids`` ``[B, n]`` keeps each token's attention inside its document
        (``data.document_masks``, see :mod:`guided_jax.kernels.segments`)."""
        if input_ids.shape[-1] > self.config.max_block_size:
            raise ValueError(
                f"input of {input_ids.shape[-1]} tokens is longer than the model's "
                f"{self.config.max_block_size} positions (max_position_embeddings="
                f"{self.config.max_position_embeddings}, pad_token_id={self.config.pad_token_id}"
                f", model_type={self.config.model_type})"
            )
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        key_mask = attention_mask.astype(bool)
        x = self.embeddings(input_ids, _fold(dropout_key, 0))
        guidance, attentions = [], []
        if return_attentions:
            bias = attention_bias(key_mask, segment_ids=segment_ids)
        for index, layer in enumerate(self.layers):
            key = _fold(dropout_key, index + 1)
            layer_guide = None if guide is None else guide.for_layer(index)
            if return_attentions:
                q, k, _ = layer.attention.qkv(x)
                attentions.append(attention_probs(q, k, bias))
            x, losses = self._run_layer(layer, x, key_mask, key, layer_guide, segment_ids)
            x = constrain_to_batch(x)
            if losses is not None:
                guidance.append(losses)
        aux: dict[str, Any] = {}
        if guidance:
            aux["guidance"] = jnp.stack(guidance)  # [guided layers, groups]
        if return_attentions:
            aux["attentions"] = tuple(attentions)
        return x, aux
