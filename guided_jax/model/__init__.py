"""The encoder: its typed config, the nnx modules, the attention adapter over the kernels, the
HuggingFace ``config.json`` mapping and parameter utilities."""

from guided_jax.model.config import ATTENTION_KINDS, MODEL_TYPES, REMAT_POLICIES, ModelConfig
from guided_jax.model.encoder import EncoderForMLM
from guided_jax.model.params import Params, build_model, init_params, model_params

__all__ = [
    "ATTENTION_KINDS",
    "MODEL_TYPES",
    "REMAT_POLICIES",
    "EncoderForMLM",
    "ModelConfig",
    "Params",
    "build_model",
    "init_params",
    "model_params",
]
