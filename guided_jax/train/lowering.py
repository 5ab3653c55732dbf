"""The whole train step of a config, lowered for a TPU or a GPU on any host (a CPU laptop, CI):
does every kernel of the run, Pallas included, lower for that platform?

No data, tokenizer or accelerator is needed: the step is traced from abstract shapes (the
vocabulary is the config's, or the size a trained tokenizer would have) and lowered with
``lowering_platforms``. JAX's Pallas lowering for TPU asks which chip it targets; the supported
way to say so without one is an abstract mesh whose abstract device names the chip
(``jax.sharding.AbstractMesh(..., abstract_device=AbstractDevice(...))``), used as the context
mesh while tracing and lowering. Lowering is not compiling: XLA's and Mosaic's own passes run
only on the device.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from guided_jax import sharding
from guided_jax.config.checks import check_mesh_fits, check_resolved_config
from guided_jax.config.resolve import (
    build_model_config,
    head_spec,
    resolve_config,
    with_global_batch,
)
from guided_jax.data.tokenizer import (
    ROLES,
    SPECIAL_ROLES,
    SPECIAL_TOKENS,
    WORDPIECE_SPECIAL_TOKENS,
)
from guided_jax.kernels import pallas
from guided_jax.train.objective import Objective
from guided_jax.train.step import batch_shape, step_functions

PLATFORMS = ("tpu", "cuda")
# The chip each platform is lowered for unless --device_kind names another (its device_kind).
DEVICE_KINDS = {"tpu": "TPU v5 lite", "cuda": "NVIDIA H100 80GB HBM3"}
# How each kind of custom call shows in the lowered StableHLO.
CUSTOM_CALLS = {
    "mosaic (TPU Pallas)": r"custom_call @tpu_custom_call",
    "triton (GPU Pallas)": r"custom_call @__gpu\$xla\.gpu\.triton",
    "mosaic_gpu (GPU Pallas)": r"custom_call @mosaic_gpu",
}


@dataclasses.dataclass(frozen=True)
class Lowered:
    """What was lowered and how it looks."""

    platform: str
    device_kind: str
    attention: str
    devices: int
    custom_calls: dict[str, int]
    stablehlo_bytes: int

    def lines(self) -> list[str]:
        calls = ", ".join(f"{name} {count}" for name, count in self.custom_calls.items())
        return [
            f"train step of attention={self.attention} on {self.devices} x {self.device_kind}",
            f"custom calls: {calls}",
            f"StableHLO: {self.stablehlo_bytes / 1024:.0f} KiB",
            f"lowered platform={self.platform} attention={self.attention} ok",
        ]


def _objective(config: ml_collections.ConfigDict, vocab_size: int, pad_id: int) -> Objective:
    """The objective a tokenizer of the config's kind would give (special ids as our tokenizers
    number them; token-set tokens get ids after them)."""
    specials = SPECIAL_TOKENS if config.data.tokenizer_kind == "bpe" else WORDPIECE_SPECIAL_TOKENS
    ids = {token: index for index, token in enumerate(specials)}
    roles = ROLES[config.data.tokenizer_kind]
    spec = head_spec(config)
    tokens = spec.tokens if spec is not None else ()
    return Objective.from_config(
        config,
        vocab_size=vocab_size,
        mask_id=ids[roles["mask"]],
        special_ids=tuple(ids[roles[r]] for r in SPECIAL_ROLES),
        pad_id=pad_id,
        spec=spec,
        token_ids=tuple(len(specials) + i for i in range(len(tokens))),
    )


def lower_train_step(
    config: ml_collections.ConfigDict,
    platform: str,
    *,
    devices: int = 1,
    device_kind: str | None = None,
) -> Lowered:
    """Lowers the train step of ``config`` for ``devices`` chips of ``platform`` (``tpu`` or
    ``cuda``) laid out as ``config.mesh`` says; raises the lowering's error if it fails."""
    if platform not in PLATFORMS:
        raise ValueError(f"--platform must be one of {list(PLATFORMS)}, got {platform!r}")
    config, _ = resolve_config(config)
    check_resolved_config(config)
    kind = device_kind or DEVICE_KINDS[platform]
    vocab = config.model.vocab_size if config.model.vocab_size > 0 else None
    vocab = vocab or config.data.tokenizer_vocab_size
    model = build_model_config(config, vocab)
    objective = _objective(config, model.vocab_size, model.pad_token_id)
    mesh = AbstractMesh(
        sharding.mesh_shape(config.mesh, devices),
        sharding.MESH_AXES,
        axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES),
        abstract_device=AbstractDevice(device_kind=kind, num_cores=1, platform=platform),
    )
    config = with_global_batch(config, sharding.batch_axes_size(mesh))
    check_mesh_fits(config, mesh)
    with jax.sharding.use_abstract_mesh(mesh), pallas.traced_for(platform):
        _, init_state, step = step_functions(model, objective, config.train)
        state = jax.eval_shape(init_state)
        batch = jax.ShapeDtypeStruct(batch_shape(config), jnp.int32)
        lowered = (
            jax.jit(step, donate_argnums=0)
            .trace(state, batch)
            .lower(lowering_platforms=(platform,))
        )
    text = lowered.as_text()
    calls = {name: len(re.findall(pattern, text)) for name, pattern in CUSTOM_CALLS.items()}
    return Lowered(platform, kind, model.attention, devices, calls, len(text.encode()))
