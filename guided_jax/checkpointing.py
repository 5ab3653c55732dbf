"""Orbax checkpoints under ``WORKDIR/checkpoints``: the train state plus the data position.

Saves are asynchronous (training goes on while the arrays are written) and atomic (a save
cut short by ``kill -9`` leaves only a temporary directory that is never restored). Restores
land on whatever shardings the caller asks for, so a run saved on 8 devices resumes on 4.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import orbax.checkpoint as ocp


def keep_steps(text: str) -> tuple[int, ...]:
    """The steps of ``train.keep_steps`` (comma-separated positive integers)."""
    try:
        steps = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    except ValueError:
        raise ValueError(
            f"train.keep_steps must be comma-separated step numbers, got {text!r}"
        ) from None
    if any(s <= 0 for s in steps):
        raise ValueError(f"train.keep_steps must hold positive steps, got {text!r}")
    return steps


def checkpoint_manager(
    workdir: str | os.PathLike, keep: int, keep_steps: Sequence[int] = ()
) -> ocp.CheckpointManager:
    """Async manager that keeps the newest ``keep`` checkpoints and those at ``keep_steps``."""
    policy = ocp.checkpoint_managers.LatestN(keep)
    if keep_steps:
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [policy, ocp.checkpoint_managers.CustomSteps(list(keep_steps))]
        )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")), options=options
    )


def save(
    manager: ocp.CheckpointManager, step: int, state: Any, data_position: Mapping[str, Any]
) -> None:
    """Starts writing ``state`` and the JSON ``data_position`` (where the input stream is)."""
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_position))
        ),
        force=True,
    )


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any
) -> tuple[int, Any, dict[str, Any]] | None:
    """``(step, state, data_position)`` of the newest checkpoint, or ``None`` when there is none.

    ``abstract_state`` holds ``jax.ShapeDtypeStruct`` leaves whose shardings say where each
    restored array goes."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
    )
    return step, restored.state, dict(restored.data)
