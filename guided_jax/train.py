"""The training loop: ``train_and_evaluate(config, workdir)``.

Steps, in order: prepare the experiment (config, tokenizer, packed blocks; see
``experiment.py``) → model and optimizer → restore if WORKDIR has a checkpoint of the same
config → jitted steps with dynamic masking and the guidance loss → JSONL metrics (fetched one
step late) → periodic eval → orbax checkpoints.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from tqdm import tqdm

from guided_jax import checkpointing, data
from guided_jax.experiment import Experiment, prepare
from guided_jax.guidance import Guide, guidance_weight, token_masks
from guided_jax.masking import mask_tokens, mlm_loss
from guided_jax.metrics import MetricsWriter
from guided_jax.model import RobertaForMLM


@struct.dataclass
class TrainState:
    step: jax.Array
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
    model: RobertaForMLM,
    batch: jax.Array,
    mask_key: jax.Array,
    *,
    guided: bool,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Masks ``batch`` and runs the model: ``(mlm_loss, per-group AG losses [G], #selected)``.

    Token-set targets are read from the model's (masked) input, as the reference does; the
    attention mask comes from the unmasked batch, as the reference's tokenizer gives it.
    """
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
    logits, aux = model(inputs, attention_mask=attend, dropout_key=dropout_key, guide=guide)
    groups = aux["guidance"].sum(axis=0) if guided else jnp.zeros((0,), jnp.float32)
    return mlm_loss(logits, batch, selected), groups, jnp.sum(selected)


def make_train_step(
    exp: Experiment,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
):
    """``(state, batch) -> (state, metrics)``: mask, forward, MLM + weighted guidance, update."""
    cfg = exp.config
    guided = cfg.guidance.enabled  # experiment.head_spec refuses enabled without a spec
    base_key = jax.random.key(cfg.train.seed)

    def train_step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict[str, Any]]:
        mask_key, dropout_key = jax.random.split(jax.random.fold_in(base_key, state.step))
        weight = jnp.zeros((), jnp.float32)
        if guided:
            weight = guidance_weight(
                state.step,
                scale=cfg.guidance.scale,
                stagnant_steps=cfg.guidance.stagnant_steps,
                total_steps=cfg.train.steps,
            )

        def loss_fn(params: nnx.State):
            model = nnx.merge(graphdef, params)
            mlm, groups, _ = mlm_forward(
                exp, model, batch, mask_key, guided=guided, dropout_key=dropout_key
            )
            ag = jnp.sum(groups)
            return mlm + weight * ag, (mlm, ag, groups)

        (loss, (mlm, ag, groups)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
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
        return TrainState(state.step + 1, params, opt_state), metrics

    return jax.jit(train_step, donate_argnums=0)


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

    return jax.jit(eval_step)


def evaluate(eval_step, params: nnx.State, batches: list[np.ndarray]) -> dict[str, float]:
    nll = count = ag = 0.0
    for index, batch in enumerate(batches):
        b_nll, b_count, b_ag = jax.device_get(eval_step(params, batch, index))
        nll, count, ag = nll + float(b_nll), count + float(b_count), ag + float(b_ag)
    return {"eval_mlm_loss": nll / max(count, 1.0), "eval_ag_loss": ag / len(batches)}


# ----------------------------------------------------------------------------- loop


class Interrupted(RuntimeError):
    """Training stopped by Ctrl-C or SIGTERM after saving a checkpoint."""


class _StopRequests:
    """Ctrl-C or SIGTERM (preemption, ``kill``) asks the loop to stop after the current step,
    so it can save a consistent state; a second signal interrupts at once."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


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


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
) -> dict[str, float]:
    """Trains per ``config`` into ``workdir``; returns the last logged metrics."""
    exp = prepare(config, workdir)
    cfg = exp.config
    model = RobertaForMLM(exp.model, rngs=nnx.Rngs(params=cfg.train.seed))
    graphdef, params = nnx.split(model)
    tx, schedule = make_optimizer(cfg.train)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    manager = checkpointing.checkpoint_manager(workdir, cfg.train.keep_checkpoints)
    restored = checkpointing.restore_latest(manager, state)
    if restored is not None:
        state = restored[1]
    start = int(state.step)
    writer = MetricsWriter(workdir, resume_step=start, enabled=jax.process_index() == 0)

    eval_sets = data.eval_batches(exp.eval_blocks, cfg.train.batch_size, cfg.train.eval_batches)
    train_step = make_train_step(exp, graphdef, tx, schedule)
    eval_step = make_eval_step(exp, graphdef)
    total = cfg.train.steps
    tokens_per_step = cfg.train.batch_size * cfg.data.block_size

    last: dict[str, float] = {}
    pending: tuple[int, Any, dict[str, float]] | None = None
    clock = {"time": time.perf_counter(), "step": start}

    def emit(record_step: int, device_metrics: Any, extra: dict[str, float]) -> None:
        record: dict[str, float] = {"step": record_step}
        if device_metrics is not None:
            host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
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
        _StopRequests() as stop,
        tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True) as bar,
    ):
        for step in range(start, total):
            state, metrics = train_step(state, exp.sampler.batch(step))
            if step == start:  # exclude compilation from the throughput
                jax.block_until_ready(metrics)
                clock.update(time=time.perf_counter(), step=step + 1)
            if pending is not None:
                emit(*pending)
                pending = None
            done = step + 1
            log_due = done % cfg.train.log_every == 0 or done == total
            eval_due = (
                bool(eval_sets)
                and cfg.train.eval_every > 0
                and (done % cfg.train.eval_every == 0 or done == total)
            )
            ckpt_due = (
                done == total
                or stop.signal is not None
                or (cfg.train.checkpoint_every > 0 and done % cfg.train.checkpoint_every == 0)
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
                _check_finite(jax.device_get(metrics), done)
                checkpointing.save(manager, done, state)
            bar.update(1)
            if stop.signal is not None:
                break
        if pending is not None:
            emit(*pending)
    manager.wait_until_finished()
    manager.close()
    if stop.signal is not None:
        raise Interrupted(
            f"stopped by signal {stop.signal} at step {int(state.step)} after saving a checkpoint "
            f"there; rerun the same command to resume"
        )
    return last
