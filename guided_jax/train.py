"""The training loop: ``train_and_evaluate(config, workdir)``.

Steps, in order: prepare the experiment (config, tokenizer, packed blocks; see
``experiment.py``) → model and optimizer → restore if WORKDIR has a checkpoint of the same
config → jitted steps with dynamic masking and the guidance loss → JSONL metrics (fetched one
step late) → periodic eval → orbax checkpoints.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from guided_jax import checkpointing, data, diagnostics, documents, hf_interop, pipeline, sharding
from guided_jax.experiment import ConfigError, Experiment, check_config, prepare
from guided_jax.guidance import Guide, guidance_weight, token_masks
from guided_jax.masking import mask_tokens, max_predictions, mlm_loss, prediction_positions
from guided_jax.metrics import MetricsWriter
from guided_jax.model import EncoderForMLM


@struct.dataclass
class TrainState:
    """Everything a checkpoint restores. Step ``s`` draws its masking and dropout keys from
    ``fold_in(rng, s)`` and its batch from the data position, so a resumed run repeats exactly
    what an uninterrupted one does."""

    step: jax.Array
    rng: jax.Array  # raw uint32 key data (saves and restores like any array)
    params: nnx.State
    opt_state: optax.OptState


# ----------------------------------------------------------------------------- steps


def make_optimizer(
    train: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup then linear decay to 0, after global-norm clipping.

    Biases and LayerNorm parameters (the 1-D ones) get no weight decay, as in HF's Trainer.
    """
    schedule = optax.join_schedules(
        [
            optax.linear_schedule(0.0, train.learning_rate, max(train.warmup_steps, 1)),
            optax.linear_schedule(
                train.learning_rate, 0.0, max(train.steps - train.warmup_steps, 1)
            ),
        ],
        [train.warmup_steps],
    )
    decay_mask = functools.partial(jax.tree.map, lambda p: p.ndim > 1)
    adamw = optax.adamw(
        schedule,
        b1=train.adam_b1,
        b2=train.adam_b2,
        eps=train.adam_eps,
        weight_decay=train.weight_decay,
        mask=decay_mask,
    )
    if train.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train.grad_clip_norm), adamw), schedule
    return adamw, schedule


def mlm_forward(
    exp: Experiment,
    model: EncoderForMLM,
    batch: jax.Array,
    mask_key: jax.Array,
    *,
    guided: bool,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masks ``batch`` and runs the model: ``(mlm_loss, per-group AG losses [G], #selected)``.

    Token-set targets are read from the model's (masked) input, as the reference does; the
    attention mask comes from the unmasked batch, as the reference's tokenizer gives it. A
    ``[B, 2, n]`` batch also carries document starts (``data.document_masks``).
    """
    batch, segment_ids = documents.split_batch(batch)
    inputs, selected = mask_tokens(
        mask_key,
        batch,
        vocab_size=exp.tokenizer.vocab_size,
        mask_id=exp.tokenizer.mask_id,
        special_ids=exp.tokenizer.special_ids,
        mlm_probability=exp.config.data.mlm_probability,
    )
    guide = None
    if guided:
        masks = token_masks(inputs, exp.token_ids) if exp.token_ids else None
        guide = Guide(exp.spec, masks, after_dropout=exp.config.guidance.after_dropout)
    attend = batch != exp.model.pad_token_id
    hidden, aux = model.encode(
        inputs,
        attention_mask=attend,
        dropout_key=dropout_key,
        guide=guide,
        segment_ids=segment_ids,
    )
    groups = aux["guidance"].sum(axis=0) if guided else jnp.zeros((0,), jnp.float32)
    probability = exp.config.data.mlm_probability
    mlm = selected_mlm_loss(model, hidden, batch, selected, probability)
    return mlm, groups, jnp.sum(selected)


def selected_mlm_loss(
    model: EncoderForMLM,
    hidden: jax.Array,
    labels: jax.Array,
    selected: jax.Array,
    probability: float,
) -> jax.Array:
    """The MLM loss with the head run only on the selected positions.

    Positions are gathered per batch shard (all rows of one device together, so no example
    moves): as many as :func:`max_predictions` allows for a shard's tokens, about 19% of them for
    16 rows of 128 at ``probability`` 0.15, where a per-row bound would need 34%. A shard with
    more selected positions takes the head on every position instead, so the loss is exact.
    """
    rows, n = labels.shape
    groups = sharding.batch_shards(rows)
    length = rows // groups * n
    bound = max_predictions(length, probability)
    if bound >= length:
        return mlm_loss(model.logits(hidden), labels, selected)
    positions, valid, fits = prediction_positions(selected.reshape(groups, length), bound)

    def gathered() -> jax.Array:
        logits = model.logits(hidden.reshape(groups, length, -1), positions)
        return mlm_loss(
            logits, jnp.take_along_axis(labels.reshape(groups, length), positions, 1), valid
        )

    def every_position() -> jax.Array:
        # One row of each shard at a time, rematerialised: the compiled step reserves this
        # branch's memory too, and the [B, n, V] logits of all rows at once would dominate it.
        def row_sums(xs: tuple[jax.Array, ...]) -> jax.Array:
            h, row_labels, row_selected = xs
            loss = mlm_loss(model.logits(h), row_labels, row_selected)
            return loss * jnp.sum(row_selected)

        def by_row(x: jax.Array) -> jax.Array:  # [B, ...] → [rows per shard, shards, ...]
            return jnp.swapaxes(x.reshape(groups, rows // groups, *x.shape[1:]), 0, 1)

        sums = jax.lax.map(
            jax.checkpoint(row_sums), (by_row(hidden), by_row(labels), by_row(selected))
        )
        return jnp.sum(sums) / jnp.maximum(jnp.sum(selected), 1)

    return jax.lax.cond(fits, gathered, every_position)


def make_train_step(
    exp: Experiment,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
):
    """``(state, batch) -> (state, metrics)``: mask, forward, MLM + weighted guidance, update.

    With ``train.grad_accum_steps = k`` the global batch is split into k micro-batches whose
    gradients are averaged before the one optimizer update (scanned, so memory is that of one
    micro-batch); micro-batch i draws its keys from ``fold_in(step_key, i)``.
    """
    cfg = exp.config
    guided = cfg.guidance.enabled  # experiment.head_spec refuses enabled without a spec
    accum = cfg.train.grad_accum_steps

    def loss_fn(params: nnx.State, batch: jax.Array, key: jax.Array, weight: jax.Array):
        mask_key, dropout_key = jax.random.split(key)
        model = nnx.merge(graphdef, params)
        mlm, groups, _ = mlm_forward(
            exp, model, batch, mask_key, guided=guided, dropout_key=dropout_key
        )
        return mlm + weight * jnp.sum(groups), (mlm, groups)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict[str, Any]]:
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        weight = jnp.zeros((), jnp.float32)
        if guided:
            weight = guidance_weight(
                state.step,
                scale=cfg.guidance.scale,
                stagnant_steps=cfg.guidance.stagnant_steps,
                total_steps=cfg.train.steps,
            )
        if accum == 1:
            (loss, (mlm, groups)), grads = grad_fn(state.params, batch, step_key, weight)
        else:
            # Row j * accum + i goes to micro-batch i: each device keeps its own rows.
            rows, *example = batch.shape
            micro = batch.reshape(rows // accum, accum, *example).swapaxes(0, 1)

            def accumulate(totals, xs):
                index, micro_batch = xs
                key = jax.random.fold_in(step_key, index)
                (loss, (mlm, groups)), grads = grad_fn(state.params, micro_batch, key, weight)
                return jax.tree.map(jnp.add, totals, (loss, mlm, groups, grads)), None

            shapes = jax.eval_shape(grad_fn, state.params, micro[0], step_key, weight)
            (loss, (mlm, groups)), grads = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), shapes
            )
            totals, _ = jax.lax.scan(
                accumulate, (loss, mlm, groups, grads), (jnp.arange(accum), micro)
            )
            loss, mlm, groups, grads = jax.tree.map(lambda t: t / accum, totals)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ag = jnp.sum(groups)
        metrics = dict(
            loss=loss,
            mlm_loss=mlm,
            ag_loss=ag,
            ag_weight=weight,
            learning_rate=schedule(state.step),
            grad_norm=optax.tree.norm(grads),
        )
        if guided:
            metrics.update({f"ag_loss/{g.name}": groups[i] for i, g in enumerate(exp.spec.groups)})
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(exp: Experiment, graphdef: nnx.GraphDef):
    """``(params, batch, index) -> (nll_sum, count, ag_loss)`` with fixed masks per index and no
    dropout, so evals of one run compare like for like; AG is measured even for the baseline."""
    eval_key = jax.random.fold_in(jax.random.key(exp.config.train.seed), 2**31 - 1)

    def eval_step(params: nnx.State, batch: jax.Array, index: jax.Array):
        model = nnx.merge(graphdef, params)
        mlm, groups, count = mlm_forward(
            exp, model, batch, jax.random.fold_in(eval_key, index), guided=exp.spec is not None
        )
        return mlm * jnp.maximum(count, 1), count, jnp.sum(groups)

    return eval_step


def evaluate(eval_step, params: nnx.State, batches: list[jax.Array]) -> dict[str, float]:
    nll = count = ag = 0.0
    for index, batch in enumerate(batches):
        b_nll, b_count, b_ag = sharding.to_host(eval_step(params, batch, index))
        nll, count, ag = nll + float(b_nll), count + float(b_count), ag + float(b_ag)
    return {"eval_mlm_loss": nll / max(count, 1.0), "eval_ag_loss": ag / len(batches)}


# ----------------------------------------------------------------------------- loop


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


def _check_finite(metrics: dict[str, Any], step: int) -> None:
    metrics = {k: float(v) for k, v in metrics.items()}
    bad = [
        k
        for k in ("loss", "mlm_loss", "ag_loss", "grad_norm")
        if k in metrics and not math.isfinite(metrics[k])
    ]
    if bad:
        values = ", ".join(f"{k}={metrics[k]}" for k in bad)
        raise FloatingPointError(
            f"non-finite {values} at step {step}; stopping without saving "
            f"(the last checkpoint is the last good state)"
        )


@contextlib.contextmanager
def _finishing_saves(manager: ocp.CheckpointManager) -> Iterator[None]:
    """However the loop ends (done, signal, NaN, error), a save in flight completes: it may be
    the last good state."""
    try:
        yield
    finally:
        manager.wait_until_finished()
        manager.close()


def batch_shape(config: ml_collections.ConfigDict, rows: int | None = None) -> tuple[int, ...]:
    """A training batch's shape: ``[rows, block_size]`` token ids, or ``[rows, 2, block_size]``
    with document starts (``data.document_masks``); ``rows`` defaults to train.batch_size."""
    rows = config.train.batch_size if rows is None else rows
    if config.data.get("document_masks", False):
        return (rows, 2, config.data.block_size)
    return (rows, config.data.block_size)


def _check_mesh_fits(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.train.batch_size % (batch_shards * config.train.grad_accum_steps):
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} must be a multiple of mesh data x fsdp "
            f"({batch_shards}) x train.grad_accum_steps ({config.train.grad_accum_steps})"
        )


def _prepare(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> Experiment:
    """Process 0 checks, tokenizes and writes WORKDIR's files; the others then read them
    (WORKDIR must be on storage every host sees)."""
    if jax.process_count() == 1:
        return prepare(config, workdir)
    exp = prepare(config, workdir) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("guided_jax: workdir prepared")
    return exp or prepare(config, workdir, write=False)


def _data_position(exp: Experiment, step: int) -> dict[str, int]:
    """Where the input stream stands after ``step`` steps (batches are a function of it)."""
    return {
        "next_batch": step,
        "batch_size": exp.config.train.batch_size,
        "num_blocks": len(exp.train_blocks),
        "seed": exp.config.train.seed,
    }


def _check_data_position(saved: dict[str, Any], expected: dict[str, int]) -> None:
    diffs = [f"{k}: {saved.get(k)} -> {v}" for k, v in expected.items() if saved.get(k) != v]
    if diffs:
        raise ConfigError(
            f"the checkpoint at step {expected['next_batch']} was trained on other data "
            f"({'; '.join(diffs)}); the corpus or batching changed since, use a new --workdir"
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    devices: list[jax.Device] | None = None,
) -> dict[str, float]:
    """Trains per ``config`` into ``workdir`` on a mesh over ``devices`` (default: every device
    of every process); returns the last logged metrics."""
    mesh = sharding.make_mesh(config.mesh, devices)  # before anything is written
    check_config(config)
    _check_mesh_fits(config, mesh)
    hf_interop.check_init_from(config)
    checkpointing.keep_steps(config.train.keep_steps)
    exp = _prepare(config, workdir)
    with _one_run_per_workdir(workdir), jax.set_mesh(mesh):
        return _train_loop(exp, mesh, workdir)


@contextlib.contextmanager
def _one_run_per_workdir(workdir: str | os.PathLike) -> Iterator[None]:
    """A second run on the same workdir would interleave metrics and race for checkpoints:
    process 0 holds an exclusive lock on ``WORKDIR/.lock`` while training (released by the
    kernel whenever the process ends, so a killed run never leaves it behind)."""
    if jax.process_index() != 0:
        yield
        return
    with open(os.path.join(workdir, ".lock"), "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ConfigError(
                f"workdir {workdir} is in use by another run ({lock.read().strip() or 'pid ?'}); "
                f"wait for it to end or use another --workdir"
            ) from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield


class TrainProgram(NamedTuple):
    """The compiled pieces of a run on one mesh."""

    graphdef: nnx.GraphDef
    abstract_state: TrainState  # ShapeDtypeStructs that carry their shardings
    state_shardings: Any
    batch_sharding: NamedSharding
    init_state: Callable[[], TrainState]  # jitted: creates the state directly sharded
    train_step: Any  # compiled (state, batch) -> (state, metrics); the state is donated


def build_train_program(exp: Experiment, mesh: jax.sharding.Mesh) -> TrainProgram:
    """Shapes and shardings first, then the jitted init and the compiled step: no array of
    the model is created before its place on the mesh is known. Call under ``jax.set_mesh``."""
    cfg = exp.config
    rules = sharding.parse_rules(cfg.mesh.rules)
    _check_mesh_fits(cfg, mesh)
    tx, schedule = make_optimizer(cfg.train)

    def init_state() -> TrainState:
        params = nnx.state(EncoderForMLM(exp.model, rngs=nnx.Rngs(params=cfg.train.seed)))
        rng = jax.random.key_data(jax.random.key(cfg.train.seed))
        return TrainState(jnp.zeros((), jnp.int32), rng, params, tx.init(params))

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: EncoderForMLM(exp.model, rngs=nnx.Rngs(0))))
    abstract = jax.eval_shape(init_state)
    state_shardings = sharding.tree_shardings(abstract, mesh, rules)
    abstract = sharding.with_shardings(abstract, state_shardings)
    batch_sharding = sharding.batch_sharding(mesh, cfg.train.batch_size)
    batch = jax.ShapeDtypeStruct(batch_shape(cfg), jnp.int32, sharding=batch_sharding)
    train_step = (
        jax.jit(
            make_train_step(exp, graphdef, tx, schedule),
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, NamedSharding(mesh, P())),
            donate_argnums=0,
        )
        .lower(abstract, batch)
        .compile()
    )
    init = jax.jit(init_state, out_shardings=state_shardings)
    return TrainProgram(graphdef, abstract, state_shardings, batch_sharding, init, train_step)


def _eval_batches(exp: Experiment) -> list[np.ndarray]:
    """The fixed eval batches, with their document starts when the run uses them."""
    cfg = exp.config
    blocks = data.eval_batches(exp.eval_blocks, cfg.train.batch_size, cfg.train.eval_batches)
    if exp.eval_starts is None:
        return blocks
    starts = data.eval_batches(exp.eval_starts, cfg.train.batch_size, cfg.train.eval_batches)
    return [
        pipeline.BlocksWithStarts(b, s).rows(slice(None))
        for b, s in zip(blocks, starts, strict=True)
    ]


def _train_loop(exp: Experiment, mesh: jax.sharding.Mesh, workdir: str | os.PathLike):
    cfg = exp.config
    is_chief = jax.process_index() == 0
    kept = checkpointing.keep_steps(cfg.train.keep_steps)
    manager = checkpointing.checkpoint_manager(workdir, cfg.train.keep_checkpoints, kept)
    if (manager.latest_step() or 0) >= cfg.train.steps:  # finished: nothing to compile
        manager.close()
        return {}
    program = build_train_program(exp, mesh)
    shape = batch_shape(cfg)
    # This process's rows of every global batch, read by its own input iterator.
    rows = sharding.local_rows(program.batch_sharding, shape)
    batches = pipeline.train_iterator(exp, rows)
    restored = checkpointing.restore_latest(manager, program.abstract_state, batches)
    if restored is None:
        state = program.init_state()
        if cfg.train.init_from:  # imported weights instead of the seeded ones
            params = hf_interop.load_init_params(cfg.train.init_from, exp.model)
            state = state.replace(
                params=hf_interop.place_params(params, state.params, program.state_shardings.params)
            )
    else:
        step, state, position, iterator_restored = restored
        _check_data_position(position, _data_position(exp, step))
        if not iterator_restored:  # saved by another number of processes: start at the step
            batches = pipeline.train_iterator(exp, rows, start_step=step)
    start = int(sharding.to_host(state.step))

    train_step, graphdef = program.train_step, program.graphdef
    replicated = NamedSharding(mesh, P())
    eval_step = jax.jit(make_eval_step(exp, graphdef), out_shardings=replicated)
    diagnostics_step = None  # heads' attention statistics, on log steps only
    if cfg.train.diagnostics:
        batch_spec = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=program.batch_sharding)
        diagnostics_step = (
            jax.jit(diagnostics.make_diagnostics_step(exp, graphdef), out_shardings=replicated)
            .lower(program.abstract_state.params, batch_spec)
            .compile()
        )
    eval_sets = [
        sharding.global_batch(
            sharding.batch_sharding(mesh, len(b)), b.shape, lambda rows, b=b: b[rows]
        )
        for b in _eval_batches(exp)
    ]

    def next_batch() -> jax.Array:
        return sharding.global_batch(program.batch_sharding, shape, lambda _: next(batches))

    if is_chief:
        memory = sharding.memory_summary(train_step)
        print(f"mesh {dict(mesh.shape)} over {mesh.size} devices; train step {memory}")
    total = cfg.train.steps
    tokens_per_step = cfg.train.batch_size * cfg.data.block_size
    writer = MetricsWriter(workdir, resume_step=start, enabled=is_chief)

    last: dict[str, float] = {}
    pending: tuple[int, Any, dict[str, float]] | None = None
    clock = {"time": time.perf_counter(), "step": start}

    def emit(record_step: int, device_metrics: Any, extra: dict[str, float]) -> None:
        record: dict[str, float] = {"step": record_step}
        if device_metrics is not None:
            host = {k: float(v) for k, v in sharding.to_host(device_metrics).items()}
            _check_finite(host, record_step)
            now = time.perf_counter()
            elapsed = max(now - clock["time"], 1e-9)
            host["tokens_per_sec"] = (record_step - clock["step"]) * tokens_per_step / elapsed
            clock.update(time=now, step=record_step)
            record.update(host)
        record.update(extra)
        writer.write(record)
        last.update(record)
        bar.set_postfix(
            {k: f"{record[k]:.4g}" for k in ("mlm_loss", "ag_loss", "eval_mlm_loss") if k in record}
        )

    with (
        _finishing_saves(manager),
        writer,
        _StopRequests() as stop,
        tqdm(
            total=total,
            initial=start,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not is_chief,
        ) as bar,
    ):
        for step in range(start, total):
            batch = next_batch()
            state, metrics = train_step(state, batch)
            if step == start:  # exclude compilation from the throughput
                jax.block_until_ready(metrics)
                clock.update(time=time.perf_counter(), step=step + 1)
            if pending is not None:
                emit(*pending)
                pending = None
            done = step + 1
            stopping = stop.requested(done)
            log_due = done % cfg.train.log_every == 0 or done == total
            if log_due and diagnostics_step is not None:
                metrics = {**metrics, **diagnostics_step(state.params, batch)}
            eval_due = (
                bool(eval_sets)
                and cfg.train.eval_every > 0
                and (done % cfg.train.eval_every == 0 or done == total)
            )
            ckpt_due = (
                done == total
                or stopping
                or (cfg.train.checkpoint_every > 0 and done % cfg.train.checkpoint_every == 0)
                or done in kept
            )
            extra = {}
            if eval_due:
                jax.block_until_ready(state)
                eval_start = time.perf_counter()
                extra = evaluate(eval_step, state.params, eval_sets)
                clock["time"] += time.perf_counter() - eval_start  # not part of tokens/s
            if log_due or eval_due:
                pending = (done, metrics if log_due else None, extra)
            if ckpt_due:
                _check_finite(sharding.to_host(metrics), done)
                if pending is not None:  # on disk before the state that resumes after it
                    emit(*pending)
                    pending = None
                checkpointing.save(manager, done, state, _data_position(exp, done), batches)
            bar.update(1)
            if stopping:
                break
        if pending is not None:
            emit(*pending)
    if stop.signal is not None:
        raise Interrupted(
            f"stopped by signal {stop.signal} at step {int(sharding.to_host(state.step))} after "
            f"saving a checkpoint there; rerun the same command to resume"
        )
    return last
