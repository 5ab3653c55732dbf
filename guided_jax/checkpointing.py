"""Orbax checkpoints of the train state under ``WORKDIR/checkpoints``."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def checkpoint_manager(workdir: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
    """Async manager that keeps the newest ``keep`` checkpoints."""
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")), options=options
    )


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    manager.save(step, args=ocp.args.StandardSave(state), force=True)


def restore_latest(manager: ocp.CheckpointManager, like: Any) -> tuple[int, Any] | None:
    """``(step, state)`` of the newest checkpoint, restored onto the structure and shardings of
    ``like``; ``None`` when there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return step, manager.restore(step, args=ocp.args.StandardRestore(abstract))
