"""What a run will do, resolved and checked without writing a file: ``--print_config``.

The config as the run records it in ``WORKDIR/config.json``, then what it derives: the steps
counted from ``train.epochs``, the global batch, the vocabulary rows, the mesh and the head
spec. t5x and MaxText users expect such a dry run before they rent a slice.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile

import jax
import ml_collections

from guided_jax import sharding
from guided_jax.config.checks import check_config
from guided_jax.config.resolve import with_global_batch
from guided_jax.guidance import Spec
from guided_jax.model import ModelConfig
from guided_jax.storage import check_location
from guided_jax.train.inputs import prepare


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """A resolved run: its config and what follows from it."""

    config: ml_collections.ConfigDict  # resolved, with the global batch and counted steps
    mesh: dict[str, int]
    devices: str  # e.g. "8 cpu devices"
    model: ModelConfig
    spec: Spec | None
    train_blocks: int | None  # None: the corpus was not read (lowering)

    def lines(self) -> list[str]:
        train = self.config.train
        accumulation = train.grad_accum_steps
        splitting = math.prod(self.mesh[a] for a in sharding.BATCH_AXES)
        source = "per_device_batch_size" if train.get("per_device_batch_size", 0) > 0 else "given"
        batch = (
            f"train.batch_size: {train.batch_size} ({source}: "
            f"{train.batch_size // splitting // accumulation} per device x {splitting} "
            f"batch-splitting devices x {accumulation} accumulated micro-batches)"
        )
        if train.epochs <= 0:
            steps = f"train.steps: {train.steps} (as given)"
        elif self.train_blocks is None:
            steps = (
                f"train.steps: counted from train.epochs={train.epochs:g} once the corpus is read"
            )
        else:
            steps = (
                f"train.steps: {train.steps} ({train.epochs:g} epochs of {self.train_blocks} "
                f"training blocks at a global batch of {train.batch_size})"
            )
        guided = self.config.guidance.enabled and self.spec is not None
        heads = f"{self.spec} ({self.spec.num_guided_heads} heads)" if self.spec else "none"
        return [
            str(self.config).rstrip("\n"),
            "",
            "# resolved (nothing was written)",
            steps,
            batch,
            f"model.vocab_size: {self.model.vocab_size} rows (pad id {self.model.pad_token_id})",
            "mesh: "
            + " x ".join(f"{a}={n}" for a, n in self.mesh.items())
            + f" over {self.devices}",
            f"guidance: {heads}" + ("" if guided or self.spec is None else ", measured only"),
        ]


def plan_run(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike | None = None,
    *,
    devices: list[jax.Device] | None = None,
) -> RunPlan:
    """Everything a run checks and resolves before its first step (the tokenizer trained or
    loaded, the corpus read or found in the token cache), with nothing written: ``workdir``
    is only read (a temporary one stands in without it)."""
    if workdir is not None:
        check_location(workdir, "--workdir")
    mesh = sharding.make_mesh(config.mesh, devices)
    config = with_global_batch(config, sharding.batch_axes_size(mesh))
    check_config(config, mesh)
    with tempfile.TemporaryDirectory(prefix="guided_jax_plan_") as scratch:
        inputs = prepare(config, workdir if workdir is not None else scratch, write=False)
    platform = mesh.devices.flat[0].platform
    return RunPlan(
        config=inputs.config,
        mesh=dict(mesh.shape),
        devices=f"{mesh.devices.size} {platform} device{'s' if mesh.devices.size > 1 else ''}",
        model=inputs.model,
        spec=inputs.spec,
        train_blocks=len(inputs.train_blocks),
    )
