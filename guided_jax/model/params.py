"""Parameters as plain data: "pure" nested dicts of numpy arrays (``nnx.State.to_pure_dict``
with integer layer indices), the one form every consumer (export, fine-tuning, plots, imported
weights) needs, and the way back into a model or onto a mesh."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from guided_jax.model.config import ModelConfig
from guided_jax.model.encoder import EncoderForMLM

Params = dict[str, Any]  # nested dict of numpy arrays, as nnx.State.to_pure_dict gives


def init_params(model: ModelConfig, seed: int) -> Params:
    """The parameters a run with ``train.seed=seed`` starts from (its step 0)."""
    return _to_numpy(nnx.state(EncoderForMLM(model, rngs=nnx.Rngs(params=seed)), nnx.Param))


def model_params(model: EncoderForMLM) -> Params:
    """A model's parameters as a pure dict of numpy arrays."""
    return _to_numpy(nnx.state(model, nnx.Param))


def _to_numpy(state: nnx.State) -> Params:
    return jax.tree.map(np.array, nnx.to_pure_dict(state))  # writable copies


def build_model(config: ModelConfig, params: Params) -> EncoderForMLM:
    """An encoder of ``config`` holding ``params``; shapes must match exactly."""
    abstract = nnx.eval_shape(lambda: EncoderForMLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    expected = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(state))
    given = jax.tree.map(lambda x: tuple(np.shape(x)), params)
    if expected != given:
        raise ValueError(
            f"parameters do not fit the model {config}: {_first_difference(expected, given)}"
        )
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jax.numpy.asarray(x), params))
    return nnx.merge(graphdef, state)


def _first_difference(expected: Any, given: Any, path: str = "") -> str:
    if isinstance(expected, dict) and isinstance(given, dict):
        for key in sorted(set(expected) | set(given), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in given:
                return f"{where} is missing"
            if key not in expected:
                return f"{where} is not a parameter of this model"
            found = _first_difference(expected[key], given[key], where)
            if found:
                return found
        return ""
    if expected != given:
        return f"{path} has shape {given}, expected {expected}"
    return ""


def place_params(params: Params, like: nnx.State, shardings: Any) -> nnx.State:
    """``params`` as global arrays laid out like the run's state ``like`` (every process
    holds the whole host copy and contributes its own shards)."""
    state = jax.tree.map(lambda x: x, like)  # a copy to fill
    nnx.replace_by_pure_dict(state, params)

    def place(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, state, shardings)
