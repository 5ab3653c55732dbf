"""Device mesh, logical-axis rules and the shardings of the train state and batches.

One code path from one CPU to a pod: the mesh has three named axes, ``data`` x ``fsdp`` x
``tensor``; parameters carry ``logical_axes`` metadata (embed, heads, kv, mlp, vocab) that the
rules map onto mesh axes; batches are split over ``data`` x ``fsdp``. XLA's partitioner does
the rest, so the guided heads' statistics are reduced where their heads and examples live.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_AXES = ("embed", "heads", "kv", "mlp", "vocab")

Rules = dict[str, tuple[str, ...]]


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Sizes of ``mesh.data``, ``mesh.fsdp``, ``mesh.tensor``; one of them may be -1 (fill)."""
    sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
    bad = [f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True) if s == 0 or s < -1]
    if bad:
        raise ValueError(f"{', '.join(bad)}: mesh sizes must be positive or -1 (fill)")
    fill = [a for a, s in zip(MESH_AXES, sizes, strict=True) if s == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1 (fill), got {fill}")
    fixed = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % fixed:
            raise ValueError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes, strict=True))} do not divide the "
                f"{num_devices} devices"
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
            f"but {num_devices} are in use; set one axis to -1 to fill"
        )
    return tuple(sizes)


def make_mesh(
    mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """The ``data x fsdp x tensor`` mesh over ``devices`` (default: all devices of all hosts)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def parse_rules(text: str) -> Rules:
    """``"embed:fsdp,heads:tensor,vocab:data+tensor"`` → logical axis → mesh axes.

    Logical axes not named stay replicated."""
    rules: Rules = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        logical, sep, axes = item.partition(":")
        logical = logical.strip()
        mesh_axes = tuple(a.strip() for a in axes.split("+") if a.strip())
        if not sep or logical not in LOGICAL_AXES:
            raise ValueError(
                f"mesh.rules: {item!r} should be LOGICAL:MESH_AXIS[+MESH_AXIS] with LOGICAL one of "
                f"{list(LOGICAL_AXES)}"
            )
        unknown = [a for a in mesh_axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(
                f"mesh.rules: {item!r} names mesh axes {unknown}; expected {list(MESH_AXES)}"
            )
        if logical in rules:
            raise ValueError(f"mesh.rules: logical axis {logical!r} is mapped twice")
        rules[logical] = mesh_axes
    return rules


def logical_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> P:
    """PartitionSpec for an array with these logical axes.

    A mesh axis is used at most once per array (the first dimension asking for it wins) and a
    dimension its mesh axes do not divide stays replicated, so any vocabulary size works."""
    used: set[str] = set()
    spec: list[tuple[str, ...] | None] = []
    for name, size in zip(logical_axes, shape, strict=True):
        axes = tuple(a for a in rules.get(name, ()) if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes)
        else:
            spec.append(None)
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """A NamedSharding for every array of ``tree`` (e.g. a whole train state): variables with
    ``logical_axes`` metadata (parameters and the optimizer moments that mirror them) follow the
    rules; everything else (step counters, keys) is replicated."""

    def sharding(leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            axes = leaf.get_metadata().get("logical_axes")
            shape = leaf.get_value().shape
            spec = P() if axes is None else logical_spec(axes, shape, mesh, rules)
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves that carry their target sharding (for restore/lowering)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def batch_axes_size(mesh: Mesh | jax.sharding.AbstractMesh) -> int:
    """How many devices split a batch's examples (the mesh's ``data x fsdp``)."""
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, rows: int) -> NamedSharding:
    """Examples split over ``data x fsdp``; a batch those do not divide (a short eval batch)
    is replicated instead."""
    return NamedSharding(mesh, P(BATCH_AXES) if rows % batch_axes_size(mesh) == 0 else P())


def batch_shards(rows: int) -> int:
    """Into how many shards the current mesh (``jax.set_mesh``) splits ``rows`` batch rows, as
    :func:`batch_sharding` places them: the groups a computation over rows can work in without
    moving examples between devices."""
    mesh = jax.sharding.get_abstract_mesh()
    shards = 1 if mesh.empty else batch_axes_size(mesh)
    return shards if rows % shards == 0 else 1


@functools.cache  # asked for every step with the same two arguments
def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The rows of a global batch that this process's devices hold (one contiguous range)."""
    index_map = sharding.addressable_devices_indices_map(global_shape)
    starts, stops = [], []
    for index in index_map.values():
        rows = index[0]
        starts.append(rows.start or 0)
        stops.append(global_shape[0] if rows.stop is None else rows.stop)
    start, stop = min(starts), max(stops)
    if sum(b - a for a, b in set(zip(starts, stops, strict=True))) != stop - start:
        raise ValueError(f"this process's rows of {sharding} are not one contiguous range")
    return slice(start, stop)


def global_batch(
    sharding: NamedSharding,
    global_shape: tuple[int, ...],
    read_rows: Callable[[slice], np.ndarray],
) -> jax.Array:
    """Builds a global array from the rows this process reads itself (``read_rows(rows)``)."""
    rows = local_rows(sharding, global_shape)
    local = np.asarray(read_rows(rows))
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def to_host(tree: Any) -> Any:
    """Fully replicated device values → numpy on every process (no cross-host gather)."""

    def fetch(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(fetch, tree)


def memory_summary(compiled: Any) -> str:
    """XLA's per-device memory estimate of a compiled function, e.g. for the log at start."""
    analysis = compiled.memory_analysis()
    if analysis is None:  # some backends cannot tell
        return "memory analysis unavailable on this backend"
    sizes = {
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
    }
    return "memory per device: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items())
