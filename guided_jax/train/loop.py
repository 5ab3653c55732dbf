"""The training loop: ``train_and_evaluate(config, workdir)``.

Steps, in order: check the config and prepare the run's inputs (config, tokenizer, packed
blocks; :mod:`.inputs`) → the compiled program on the mesh (:mod:`.step`) → restore the newest
checkpoint of this config, or initialise → steps with dynamic masking and the guidance loss →
metrics, one step late (:mod:`.metrics`) → periodic eval → orbax checkpoints
(:mod:`.checkpoints`). Ctrl-C, SIGTERM or a preemption saves and stops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from guided_jax import sharding
from guided_jax.config.checks import check_config, parse_keep_steps
from guided_jax.config.resolve import ConfigError, with_global_batch
from guided_jax.data.packing import eval_batches
from guided_jax.data.pipeline import BlocksWithStarts, train_iterator
from guided_jax.model.params import place_params
from guided_jax.storage import check_location
from guided_jax.train import verdict
from guided_jax.train.checkpoints import checkpoint_manager, restore_latest, save
from guided_jax.train.inputs import RunInputs, prepare
from guided_jax.train.metrics import MetricsLog, check_finite
from guided_jax.train.run_lock import Held, check_on_every_process, one_run_per_workdir
from guided_jax.train.step import (
    TrainProgram,
    TrainState,
    batch_shape,
    build_train_program,
    evaluate,
    make_diagnostics_step,
)
from guided_jax.weights.hf import load_init_params

# How long the other processes wait for process 0 to tokenize and write the workdir's files (a
# corpus larger than data.max_inline_bytes is prepared beforehand with guided_jax.prepare).
PREPARE_WAIT_S = 3 * 3600.0


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    devices: list[jax.Device] | None = None,
) -> dict[str, float]:
    """Trains per ``config`` into ``workdir`` on a mesh over ``devices`` (default: every device
    of every process); returns the last logged metrics."""
    check_location(workdir, "--workdir")
    mesh = sharding.make_mesh(config.mesh, devices)  # before anything is written
    config = with_global_batch(config, sharding.batch_axes_size(mesh))
    check_config(config, mesh)
    chief = jax.process_index() == 0
    with one_run_per_workdir(workdir, chief=chief) as held:  # before anything is written
        inputs = _prepare(config, workdir)
        with jax.set_mesh(mesh):
            return _train_loop(inputs, mesh, workdir, held)


def _prepare(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> RunInputs:
    """Process 0 checks, tokenizes and writes WORKDIR's files; the others then read them
    (WORKDIR must be on storage every host sees), or stop with process 0's reason."""
    if jax.process_count() == 1:
        return prepare(config, workdir)
    if jax.process_index() == 0:
        with verdict.shared("workdir_prepared"):
            return prepare(config, workdir)
    verdict.wait_for("workdir_prepared", "prepare the workdir", PREPARE_WAIT_S)
    return prepare(config, workdir, write=False)


def _data_position(inputs: RunInputs, step: int) -> dict[str, int]:
    """Where the input stream stands after ``step`` steps (batches are a function of it)."""
    return {
        "next_batch": step,
        "batch_size": inputs.config.train.batch_size,
        "num_blocks": len(inputs.train_blocks),
        "seed": inputs.config.train.seed,
    }


def _check_data_position(saved: dict[str, Any], expected: dict[str, int]) -> None:
    diffs = [f"{k}: {saved.get(k)} -> {v}" for k, v in expected.items() if saved.get(k) != v]
    if diffs:
        raise ConfigError(
            f"the checkpoint at step {expected['next_batch']} was trained on other data "
            f"({'; '.join(diffs)}); the corpus or batching changed since, use a new --workdir"
        )


def _eval_batches(inputs: RunInputs) -> list[np.ndarray]:
    """The fixed eval batches, with their document starts when the run uses them."""
    cfg = inputs.config
    blocks = eval_batches(inputs.eval_blocks, cfg.train.batch_size, cfg.train.eval_batches)
    if inputs.eval_starts is None:
        return blocks
    starts = eval_batches(inputs.eval_starts, cfg.train.batch_size, cfg.train.eval_batches)
    return [BlocksWithStarts(b, s).rows(slice(None)) for b, s in zip(blocks, starts, strict=True)]


@dataclasses.dataclass(frozen=True)
class Cadence:
    """What is due after a step: a log record, an eval, a checkpoint."""

    total: int
    log_every: int
    eval_every: int  # 0: never (also without eval blocks)
    checkpoint_every: int  # 0: only at the end (and on a stop request)
    kept: tuple[int, ...]  # train.keep_steps: checkpoints saved and kept besides the newest

    @classmethod
    def of(cls, train: ml_collections.ConfigDict, has_eval: bool) -> Cadence:
        return cls(
            total=train.steps,
            log_every=train.log_every,
            eval_every=train.eval_every if has_eval else 0,
            checkpoint_every=train.checkpoint_every,
            kept=parse_keep_steps(train.keep_steps, train.steps),
        )

    def log(self, done: int) -> bool:
        return done % self.log_every == 0 or done == self.total

    def eval(self, done: int) -> bool:
        return self.eval_every > 0 and (done % self.eval_every == 0 or done == self.total)

    def checkpoint(self, done: int, stopping: bool) -> bool:
        periodic = self.checkpoint_every > 0 and done % self.checkpoint_every == 0
        return done == self.total or stopping or periodic or done in self.kept


def _restore_or_init(
    inputs: RunInputs, program: TrainProgram, manager: ocp.CheckpointManager, rows: slice
) -> tuple[TrainState, grain.DatasetIterator]:
    """The newest checkpoint's state and input iterator, or the initial state (the seeded
    init, or ``train.init_from``'s weights) and a fresh iterator."""
    cfg = inputs.config

    def iterator(start_step: int = 0) -> grain.DatasetIterator:
        return train_iterator(
            inputs.train_blocks,
            inputs.train_starts,
            cfg.train.batch_size,
            cfg.train.seed,
            rows=rows,
            start_step=start_step,
            prefetch=int(cfg.data.get("prefetch", 2)),
        )

    batches = iterator()
    restored = restore_latest(manager, program.abstract_state, batches)
    if restored is None:
        state = program.init_state()
        if cfg.train.init_from:  # imported weights instead of the seeded ones
            params = load_init_params(cfg.train.init_from, inputs.model)
            placed = place_params(params, state.params, program.state_shardings.params)
            state = state.replace(params=placed)
        return state, batches
    step, state, position, iterator_restored = restored
    _check_data_position(position, _data_position(inputs, step))
    if not iterator_restored:  # saved by another number of processes: start at the step
        batches = iterator(start_step=step)
    if jax.process_index() == 0:
        print(f"resuming from the checkpoint at step {step} of {cfg.train.steps}")
    return state, batches


def _train_loop(inputs: RunInputs, mesh: jax.sharding.Mesh, workdir: str | os.PathLike, held: Held):
    cfg = inputs.config
    is_chief = jax.process_index() == 0
    eval_sets = _eval_batches(inputs)
    cadence = Cadence.of(cfg.train, has_eval=bool(eval_sets))
    manager = checkpoint_manager(workdir, cfg.train.keep_checkpoints, cadence.kept)
    if (manager.latest_step() or 0) >= cadence.total:  # finished: nothing to compile
        manager.close()
        return {}
    program = build_train_program(inputs, mesh)
    shape = batch_shape(cfg)
    # This process's rows of every global batch, read by its own input iterator.
    rows = sharding.local_rows(program.batch_sharding, shape)
    state, batches = _restore_or_init(inputs, program, manager, rows)
    start = int(sharding.to_host(state.step))

    train_step, graphdef = program.train_step, program.graphdef
    replicated = NamedSharding(mesh, P())
    eval_step = program.eval_step
    diagnostics_step = None  # heads' attention statistics, on log steps only
    if cfg.train.diagnostics:
        batch_spec = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=program.batch_sharding)
        diagnostics_step = (
            jax.jit(make_diagnostics_step(inputs.objective, graphdef), out_shardings=replicated)
            .lower(program.abstract_state.params, batch_spec)
            .compile()
        )
    eval_sets = [
        sharding.global_batch(
            sharding.batch_sharding(mesh, len(b)), b.shape, lambda rows, b=b: b[rows]
        )
        for b in eval_sets
    ]

    def next_batch() -> jax.Array:
        return sharding.global_batch(program.batch_sharding, shape, lambda _: next(batches))

    if is_chief:
        memory = sharding.memory_summary(train_step)
        print(f"mesh {dict(mesh.shape)} over {mesh.size} devices; train step {memory}")
    tokens_per_step = cfg.train.batch_size * cfg.data.block_size
    with (
        _finishing_saves(manager),
        MetricsLog(
            workdir,
            start=start,
            total=cadence.total,
            tokens_per_step=tokens_per_step,
            enabled=is_chief,
            guard=held.check,  # before each write to the workdir
        ) as log,
        _StopRequests() as stop,
    ):
        for step in range(start, cadence.total):
            batch = next_batch()
            state, metrics = train_step(state, batch)
            if step == start:  # exclude compilation from the throughput
                jax.block_until_ready(metrics)
                log.restart_clock(step + 1)
            log.flush()  # the previous step's record, now that this step is dispatched
            done = step + 1
            stopping = stop.requested(done)
            log_due, eval_due = cadence.log(done), cadence.eval(done)
            if log_due and diagnostics_step is not None:
                metrics = {**metrics, **diagnostics_step(state.params, batch)}
            extra = {}
            if eval_due:
                jax.block_until_ready(state)
                with log.paused():
                    extra = evaluate(eval_step, state.params, eval_sets)
            if log_due or eval_due:
                log.defer(done, metrics if log_due else None, extra)
            if cadence.checkpoint(done, stopping):
                check_finite(sharding.to_host(metrics), done)
                check_on_every_process(held)  # process 0's verdict, on every process
                log.sync()  # stored before the state that resumes after it
                save(manager, done, state, _data_position(inputs, done), batches)
            log.bar.update(1)
            if stopping:
                break
        log.flush()
    if stop.signal is not None:
        raise Interrupted(
            f"stopped by signal {stop.signal} at step {int(sharding.to_host(state.step))} after "
            f"saving a checkpoint there; rerun the same command to resume"
        )
    return log.last


class Interrupted(RuntimeError):
    """Training stopped by Ctrl-C or SIGTERM after saving a checkpoint."""


class _StopRequests:
    """Ctrl-C or SIGTERM (preemption, ``kill``) asks the loop to stop after the current step,
    so it can save a consistent state; a second signal interrupts at once.

    With several processes a signal reaches each at a different step, so SIGTERM is left to
    JAX's preemption service, which picks one step at which all processes stop together."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._multi_process = jax.process_count() > 1

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread() and not self._multi_process:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def requested(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (the same answer on every process)."""
        if self._multi_process and multihost_utils.reached_preemption_sync_point(step):
            self.signal = signal.SIGTERM
        return self.signal is not None


@contextlib.contextmanager
def _finishing_saves(manager: ocp.CheckpointManager) -> Iterator[None]:
    """However the loop ends (done, signal, NaN, error), a save in flight completes: it may be
    the last good state."""
    try:
        yield
    finally:
        manager.wait_until_finished()
        manager.close()
