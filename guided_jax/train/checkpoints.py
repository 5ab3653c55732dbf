"""Orbax checkpoints of training under ``WORKDIR/checkpoints``: the train state, the data
position and the input iterator's state (grain's own checkpoint handler: one small JSON file
per process). :mod:`guided_jax.weights.workdir` reads their parameters back.

Saves are asynchronous (training goes on while the arrays are written) and atomic (a save
cut short by ``kill -9`` leaves only a temporary directory that is never restored). Restores
land on whatever shardings the caller asks for, so a run saved on 8 devices resumes on 4.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from guided_jax.weights.workdir import checkpoint_dir


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
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_position: Mapping[str, Any],
    iterator: grain.DatasetIterator | None = None,
) -> None:
    """Starts writing ``state``, the JSON ``data_position`` (what the input stream is and where
    it stands) and the input ``iterator``'s state (taken now, before training goes on)."""
    items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_position)))
    if iterator is not None:
        items["iterator"] = grain.checkpoint.CheckpointSave(iterator)
    manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    iterator: grain.DatasetIterator | None = None,
) -> tuple[int, Any, dict[str, Any], bool] | None:
    """``(step, state, data_position, iterator_restored)`` of the newest checkpoint, or
    ``None`` when there is none.

    ``abstract_state`` holds ``jax.ShapeDtypeStruct`` leaves whose shardings say where each
    restored array goes. ``iterator`` (not yet started) is set to the saved state when the
    checkpoint holds one for this process; ``iterator_restored`` says whether it did (a
    checkpoint written by another number of processes holds none for this one)."""
    step = manager.latest_step()
    if step is None:
        return None
    items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    has_iterator = iterator is not None and iterator_saved(manager, step)
    if has_iterator:
        items["iterator"] = grain.checkpoint.CheckpointRestore(iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return step, restored.state, dict(restored.data), has_iterator


def iterator_saved(manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether checkpoint ``step`` holds an input iterator state for this process."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return (manager.directory / str(step) / "iterator" / name).exists()
