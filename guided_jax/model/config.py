"""The encoder's architecture hyper-parameters, typed and checked (:class:`ModelConfig`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

# What the backward pass may keep from the forward of a layer instead of recomputing it:
# everything, nothing, or only the weight matmuls' outputs (attention maps are recomputed).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# How attention is computed: the reference's full maps, or blockwise with O(n) memory (portable
# JAX, or Pallas kernels for GPU and TPU).
ATTENTION_KINDS = ("dense", "flash", "pallas")

# Encoder types: how positions are numbered (see guided_jax.model.encoder).
MODEL_TYPES = ("roberta", "bert")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters (names follow HuggingFace's RobertaConfig/BertConfig)."""

    model_type: str = "roberta"  # roberta | bert
    vocab_size: int = 52000
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072  # 0 = attention-only layers (reference roberta_self_*)
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1
    attention_dropout: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 1
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: str = "none"  # recompute each layer in the backward: none | full | dots
    attention: str = "dense"  # dense (reference: full maps) | flash | pallas (blockwise, O(n))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown model config keys {unknown}; expected some of {sorted(known)}"
            )
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"model.model_type must be one of {list(MODEL_TYPES)}, got {self.model_type!r}"
            )
        positive = (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "max_position_embeddings",
            "type_vocab_size",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_heads={self.num_heads}"
            )
        if self.intermediate_size < 0:
            raise ValueError(
                f"model.intermediate_size must be >= 0 (0 = attention-only), got "
                f"{self.intermediate_size}"
            )
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"model.pad_token_id={self.pad_token_id} must be a vocabulary id in "
                f"[0, {self.vocab_size})"
            )
        if self.max_block_size < 1:
            raise ValueError(
                f"model.max_position_embeddings={self.max_position_embeddings} leaves no "
                f"position {self.position_note}"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}"
            )
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"model.attention must be one of {list(ATTENTION_KINDS)}, got {self.attention!r}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"model.remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_block_size(self) -> int:
        """Longest input: RoBERTa positions start after the padding index, BERT's at 0."""
        if self.model_type == "bert":
            return self.max_position_embeddings
        return self.max_position_embeddings - self.pad_token_id - 1

    @property
    def position_note(self) -> str:
        """Why ``max_block_size`` is what it is, for error messages."""
        if self.model_type == "bert":
            return "as BERT numbers positions from 0"
        return (
            f"after RoBERTa's padding offset (positions start at pad_token_id + 1 = "
            f"{self.pad_token_id + 1})"
        )

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)
