"""A trained encoder on disk: our pretraining workdirs (:mod:`.workdir`) and HuggingFace
directories (:mod:`.hf`: read, export, import), with one :func:`load` on top."""

from guided_jax.weights.pretrained import Pretrained, load

__all__ = ["Pretrained", "load"]
