"""guided_jax: attention-guided masked-LM pretraining of Transformer encoders in JAX/Flax."""

__version__ = "0.1.0"
