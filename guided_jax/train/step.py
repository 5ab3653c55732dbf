"""The compiled pieces of a run: the train state, the train and eval steps, the head
diagnostics step, and :func:`build_train_program`, which lays them out on a mesh from abstract
shapes before any array exists."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from guided_jax import sharding
from guided_jax.config.checks import check_mesh_fits
from guided_jax.guidance import token_masks
from guided_jax.guidance.stats import flat_metrics, head_diagnostics
from guided_jax.model import EncoderForMLM, ModelConfig
from guided_jax.train.inputs import RunInputs
from guided_jax.train.objective import Objective, mlm_forward, split_batch
from guided_jax.train.optimizer import make_optimizer


@struct.dataclass
class TrainState:
    """Everything a checkpoint restores. Step ``s`` draws its masking and dropout keys from
    ``fold_in(rng, s)`` and its batch from the data position, so a resumed run repeats exactly
    what an uninterrupted one does."""

    step: jax.Array
    rng: jax.Array  # raw uint32 key data (saves and restores like any array)
    params: nnx.State
    opt_state: optax.OptState


def make_train_step(
    objective: Objective,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    accum: int = 1,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, Any]]]:
    """``(state, batch) -> (state, metrics)``: mask, forward, MLM + weighted guidance, update.

    With ``accum = k`` (``train.grad_accum_steps``) the global batch is split into k
    micro-batches whose gradients are averaged before the one optimizer update (scanned, so
    memory is that of one micro-batch); micro-batch i draws its keys from
    ``fold_in(step_key, i)``.
    """
    guided = objective.guided  # the config checks refuse guidance enabled without a spec

    def loss_fn(params: nnx.State, batch: jax.Array, key: jax.Array, weight: jax.Array):
        mask_key, dropout_key = jax.random.split(key)
        model = nnx.merge(graphdef, params)
        mlm, groups, _ = mlm_forward(
            objective, model, batch, mask_key, guided=guided, dropout_key=dropout_key
        )
        return mlm + weight * jnp.sum(groups), (mlm, groups)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict[str, Any]]:
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        weight = objective.ag_weight(state.step)
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
            metrics.update(
                {f"ag_loss/{g.name}": groups[i] for i, g in enumerate(objective.spec.groups)}
            )
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(objective: Objective, graphdef: nnx.GraphDef, seed: int):
    """``(params, batch, index) -> (nll_sum, count, ag_loss)`` with fixed masks per index and no
    dropout, so evals of one run compare like for like; AG is measured even for the baseline."""

    def eval_step(params: nnx.State, batch: jax.Array, index: jax.Array):
        # traced, not computed eagerly: the mesh may be a TPU slice this host only compiles for
        eval_key = jax.random.fold_in(jax.random.key(seed), 2**31 - 1)
        model = nnx.merge(graphdef, params)
        mlm, groups, count = mlm_forward(
            objective,
            model,
            batch,
            jax.random.fold_in(eval_key, index),
            guided=objective.spec is not None,
        )
        return mlm * jnp.maximum(count, 1), count, jnp.sum(groups)

    return eval_step


def evaluate(eval_step, params: nnx.State, batches: list[jax.Array]) -> dict[str, float]:
    nll = count = ag = 0.0
    for index, batch in enumerate(batches):
        b_nll, b_count, b_ag = sharding.to_host(eval_step(params, batch, index))
        nll, count, ag = nll + float(b_nll), count + float(b_count), ag + float(b_ag)
    return {"eval_mlm_loss": nll / max(count, 1.0), "eval_ag_loss": ag / len(batches)}


def make_diagnostics_step(
    objective: Objective, graphdef: nnx.GraphDef
) -> Callable[[nnx.State, jax.Array], dict[str, jax.Array]]:
    """``(params, batch) -> {diag/...: scalar}`` for ``jax.jit``: the heads' statistics
    (:mod:`guided_jax.guidance.stats`) on one deterministic forward pass of the batch (no
    dropout; the unused MLM head is dropped by XLA), paid on log steps only
    (``train.diagnostics``). A baseline's heads (no spec) are all compared with the built-in
    patterns."""
    spec = objective.spec
    pad_id = objective.pad_id

    def diagnostics_step(params: nnx.State, batch: jax.Array) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, params)
        batch, segment_ids = split_batch(batch)  # [B, 2, n]: data.document_masks
        attend = batch != pad_id
        _, aux = model(
            batch, attention_mask=attend, return_attentions=True, segment_ids=segment_ids
        )
        masks = token_masks(batch, objective.token_ids) if objective.token_ids else None
        values = head_diagnostics(aux["attentions"], spec, attend, masks)
        return flat_metrics(values, spec)

    return diagnostics_step


def batch_shape(config: ml_collections.ConfigDict, rows: int | None = None) -> tuple[int, ...]:
    """A training batch's shape: ``[rows, block_size]`` token ids, or ``[rows, 2, block_size]``
    with document starts (``data.document_masks``); ``rows`` defaults to train.batch_size."""
    rows = config.train.batch_size if rows is None else rows
    if config.data.get("document_masks", False):
        return (rows, 2, config.data.block_size)
    return (rows, config.data.block_size)


class TrainProgram(NamedTuple):
    """The compiled pieces of a run on one mesh."""

    graphdef: nnx.GraphDef
    abstract_state: TrainState  # ShapeDtypeStructs that carry their shardings
    state_shardings: Any
    batch_sharding: NamedSharding
    init_state: Callable[[], TrainState]  # jitted: creates the state directly sharded
    train_step: Any  # compiled (state, batch) -> (state, metrics); the state is donated
    eval_step: Any  # jitted (params, batch, index) -> (nll_sum, count, ag_loss)


def step_functions(
    model: ModelConfig, objective: Objective, train: ml_collections.ConfigDict
) -> tuple[nnx.GraphDef, Callable[[], TrainState], Callable]:
    """A run's model graph, its state initialiser (the seeded init and the optimizer's state) and
    its train step, not yet placed on devices (``train``: the config's ``train`` section)."""
    tx, schedule = make_optimizer(train)

    def init_state() -> TrainState:
        params = nnx.state(EncoderForMLM(model, rngs=nnx.Rngs(params=train.seed)))
        rng = jax.random.key_data(jax.random.key(train.seed))
        return TrainState(jnp.zeros((), jnp.int32), rng, params, tx.init(params))

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: EncoderForMLM(model, rngs=nnx.Rngs(0))))
    step = make_train_step(objective, graphdef, tx, schedule, train.grad_accum_steps)
    return graphdef, init_state, step


class PlacedSteps(NamedTuple):
    """A run's train and eval steps laid out on a mesh, jitted but not yet lowered: what a run
    compiles for its own devices and :mod:`guided_jax.train.lowering` for a TPU slice."""

    graphdef: nnx.GraphDef
    abstract_state: TrainState  # ShapeDtypeStructs that carry their shardings
    state_shardings: Any
    batch: jax.ShapeDtypeStruct  # a training (and eval) batch, with its sharding
    init_state: Callable[[], TrainState]
    train_step: Any  # jitted (state, batch) -> (state, metrics); the state is donated
    eval_step: Any  # jitted (params, batch, index) -> (nll_sum, count, ag_loss)


def place_steps(
    model: ModelConfig, objective: Objective, cfg: ml_collections.ConfigDict, mesh: Any
) -> PlacedSteps:
    """Shapes and shardings first, then the jitted steps: no array of the model is created
    before its place on the mesh is known. Call under ``jax.set_mesh(mesh)``."""
    rules = sharding.parse_rules(cfg.mesh.rules)
    check_mesh_fits(cfg, mesh)
    graphdef, init_state, step = step_functions(model, objective, cfg.train)
    abstract = jax.eval_shape(init_state)
    state_shardings = sharding.tree_shardings(abstract, mesh, rules)
    abstract = sharding.with_shardings(abstract, state_shardings)
    batch_sharding = sharding.batch_sharding(mesh, cfg.train.batch_size)
    batch = jax.ShapeDtypeStruct(batch_shape(cfg), jnp.int32, sharding=batch_sharding)
    replicated = NamedSharding(mesh, P())
    train_step = jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        make_eval_step(objective, graphdef, cfg.train.seed), out_shardings=replicated
    )
    return PlacedSteps(graphdef, abstract, state_shardings, batch, init_state, train_step,
                       eval_step)  # fmt: skip


def build_train_program(inputs: RunInputs, mesh: jax.sharding.Mesh) -> TrainProgram:
    """The run's compiled step and its jitted init on ``mesh`` (see :func:`place_steps`).
    Call under ``jax.set_mesh``."""
    placed = place_steps(inputs.model, inputs.objective, inputs.config, mesh)
    train_step = placed.train_step.lower(placed.abstract_state, placed.batch).compile()
    init = jax.jit(placed.init_state, out_shardings=placed.state_shardings)
    return TrainProgram(placed.graphdef, placed.abstract_state, placed.state_shardings,
                        placed.batch.sharding, init, train_step, placed.eval_step)  # fmt: skip
