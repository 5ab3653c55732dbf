"""A config's whole train step, lowered or compiled for an accelerator this host does not have.

* :func:`lower_train_step` lowers for a TPU or a GPU: does every kernel of the run, Pallas
  included, lower for that platform? No data, tokenizer or accelerator is needed: the step is
  traced from abstract shapes (the vocabulary is the config's, or the size a trained tokenizer
  would have). JAX's Pallas lowering for TPU asks which chip it targets; an abstract mesh whose
  abstract device names the chip says so without one.
* :func:`compile_for_topology` compiles the train and eval steps for a TPU slice with libtpu
  (``pip install "jax[tpu]"`` of the installed jax), as the slice will run them: XLA:TPU and
  Mosaic really run, on a mesh over the slice's compile-only devices
  (``jax.experimental.topologies``), with the shardings the run itself builds
  (:func:`guided_jax.train.step.place_steps`). It reads each chip's memory and FLOPs from the
  compiled program and judges the fit against the chip's HBM. A GPU cannot be compiled for
  without one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from guided_jax import sharding
from guided_jax.config.checks import check_mesh_fits, check_resolved_config
from guided_jax.config.resolve import (
    build_model_config,
    head_spec,
    resolve_config,
    with_global_batch,
)
from guided_jax.data.tokenizer import (
    ROLES,
    SPECIAL_ROLES,
    SPECIAL_TOKENS,
    WORDPIECE_SPECIAL_TOKENS,
)
from guided_jax.kernels import pallas
from guided_jax.train.objective import Objective
from guided_jax.train.plan import RunPlan
from guided_jax.train.step import batch_shape, place_steps, step_functions

PLATFORMS = ("tpu", "cuda")
# The chip each platform is lowered for unless --device_kind names another (its device_kind).
DEVICE_KINDS = {"tpu": "TPU v5 lite", "cuda": "NVIDIA H100 80GB HBM3"}
# How each kind of custom call shows in the lowered StableHLO.
CUSTOM_CALLS = {
    "mosaic (TPU Pallas)": r"custom_call @tpu_custom_call",
    "triton (GPU Pallas)": r"custom_call @__gpu\$xla\.gpu\.triton",
    "mosaic_gpu (GPU Pallas)": r"custom_call @mosaic_gpu",
}


@dataclasses.dataclass(frozen=True)
class Lowered:
    """What was lowered and how it looks."""

    platform: str
    device_kind: str
    attention: str
    devices: int
    custom_calls: dict[str, int]
    stablehlo_bytes: int

    def lines(self) -> list[str]:
        calls = ", ".join(f"{name} {count}" for name, count in self.custom_calls.items())
        return [
            f"train step of attention={self.attention} on {self.devices} x {self.device_kind}",
            f"custom calls: {calls}",
            f"StableHLO: {self.stablehlo_bytes / 1024:.0f} KiB",
            f"lowered platform={self.platform} attention={self.attention} ok",
        ]


def _objective(config: ml_collections.ConfigDict, vocab_size: int, pad_id: int) -> Objective:
    """The objective a tokenizer of the config's kind would give (special ids as our tokenizers
    number them; token-set tokens get ids after them)."""
    specials = SPECIAL_TOKENS if config.data.tokenizer_kind == "bpe" else WORDPIECE_SPECIAL_TOKENS
    ids = {token: index for index, token in enumerate(specials)}
    roles = ROLES[config.data.tokenizer_kind]
    spec = head_spec(config)
    tokens = spec.tokens if spec is not None else ()
    return Objective.from_config(
        config,
        vocab_size=vocab_size,
        mask_id=ids[roles["mask"]],
        special_ids=tuple(ids[roles[r]] for r in SPECIAL_ROLES),
        pad_id=pad_id,
        spec=spec,
        token_ids=tuple(len(specials) + i for i in range(len(tokens))),
    )


def _prepared(config: ml_collections.ConfigDict, batch_devices: int):
    """The resolved and checked config (global batch for ``batch_devices``, some length when
    epochs give it), model and objective of a run with the config's vocabulary or its
    tokenizer's planned size."""
    config, _ = resolve_config(config)
    check_resolved_config(config)
    vocab = config.model.vocab_size if config.model.vocab_size > 0 else None
    vocab = vocab or config.data.tokenizer_vocab_size
    model = build_model_config(config, vocab)
    config = _with_some_length(config)
    objective = _objective(config, model.vocab_size, model.pad_token_id)
    return with_global_batch(config, batch_devices), model, objective


def _with_some_length(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with steps counted from epochs stood in for (no corpus is read here): the
    compiled step is the same whatever the schedule's length."""
    if config.train.steps > 0:
        return config
    config = config.copy_and_resolve_references()
    config.train.steps = max(1, config.train.warmup_steps)
    return config


def _abstract_mesh(
    config: ml_collections.ConfigDict, platform: str, devices: int, device_kind: str | None
) -> AbstractMesh:
    """The run's mesh over ``devices`` chips of ``platform`` that no host needs to have."""
    if platform not in PLATFORMS:
        raise ValueError(f"--platform must be one of {list(PLATFORMS)}, got {platform!r}")
    kind = device_kind or DEVICE_KINDS[platform]
    return AbstractMesh(
        sharding.mesh_shape(config.mesh, devices),
        sharding.MESH_AXES,
        axis_types=(AxisType.Auto,) * len(sharding.MESH_AXES),
        abstract_device=AbstractDevice(device_kind=kind, num_cores=1, platform=platform),
    )


def plan_lowering(
    config: ml_collections.ConfigDict,
    *,
    platform: str | None = None,
    devices: int = 1,
    device_kind: str | None = None,
    topology: str | None = None,
) -> RunPlan:
    """The resolved config :func:`lower_train_step` (``platform``) or
    :func:`compile_for_topology` (``topology``) would use; no corpus is read, so steps counted
    from epochs stay uncounted."""
    if topology is not None:
        name = topology_name(topology)
        slice_devices = topology_devices(name)
        mesh = _slice_mesh(config, slice_devices, math.prod(_slice(name)[1]))
        where = f"{len(slice_devices)} devices of {name} ({slice_devices[0].device_kind})"
    else:
        mesh = _abstract_mesh(config, platform or "", devices, device_kind)
        where = f"{devices} x {mesh.abstract_device.device_kind}"
    resolved, model, _ = _prepared(config, sharding.batch_axes_size(mesh))
    check_mesh_fits(resolved, mesh)
    resolved.train.steps = config.train.steps  # not the stand-in: no corpus is read here
    return RunPlan(resolved, dict(mesh.shape), where, model, head_spec(resolved), None)


def lower_train_step(
    config: ml_collections.ConfigDict,
    platform: str,
    *,
    devices: int = 1,
    device_kind: str | None = None,
) -> Lowered:
    """Lowers the train step of ``config`` for ``devices`` chips of ``platform`` (``tpu`` or
    ``cuda``) laid out as ``config.mesh`` says; raises the lowering's error if it fails."""
    mesh = _abstract_mesh(config, platform, devices, device_kind)
    kind = mesh.abstract_device.device_kind
    config, model, objective = _prepared(config, sharding.batch_axes_size(mesh))
    check_mesh_fits(config, mesh)
    with jax.sharding.use_abstract_mesh(mesh), pallas.traced_for(platform):
        _, init_state, step = step_functions(model, objective, config.train)
        state = jax.eval_shape(init_state)
        batch = jax.ShapeDtypeStruct(batch_shape(config), jnp.int32)
        lowered = (
            jax.jit(step, donate_argnums=0)
            .trace(state, batch)
            .lower(lowering_platforms=(platform,))
        )
    text = lowered.as_text()
    calls = {name: len(re.findall(pattern, text)) for name, pattern in CUSTOM_CALLS.items()}
    return Lowered(platform, kind, model.attention, devices, calls, len(text.encode()))


# ----------------------------------------------------------------------------- TPU slices

# Per chip: HBM (GiB) and dense bf16 peak (FLOP/s), as Cloud TPU documents them.
TPU_CHIPS = {
    "v4": (32.0, 275e12),
    "v5e": (16.0, 197e12),
    "v5p": (95.0, 459e12),
    "v6e": (32.0, 918e12),
}
# gcloud's accelerator-type prefix of each generation, and whether its number counts
# TensorCores (two a chip) rather than chips.
_GCLOUD_NAMES = {"v4": ("v4", True), "v5e": ("v5litepod", False), "v5p": ("v5p", True),
                 "v6e": ("v6e", False)}  # fmt: skip


class CompileError(ValueError):
    """XLA:TPU or Mosaic refused the program (e.g. a Pallas block larger than VMEM)."""


def _grid(chips: int, three_d: bool) -> str:
    """The slice shape Cloud TPU gives ``chips`` chips: 2-D slices 2x2, 2x4, 4x4, 4x8, ...;
    3-D ones 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ..."""
    if chips < 1 or chips & (chips - 1) or (three_d and chips < 4):
        least = "at least 4 chips" if three_d else "chips"
        raise ValueError(f"a TPU slice has a power-of-two number of {least}, got {chips}")
    dims = [2, 2, 1] if three_d else [1, 1]
    while math.prod(dims) < chips:
        if len(set(dims)) == 1 or (three_d and dims[2] == 1):
            dims[-1] *= 2  # a square or cube grows along its last axis first
        else:
            dims[max(i for i, d in enumerate(dims) if d == min(dims))] *= 2
    return "x".join(map(str, dims))


def topology_name(text: str) -> str:
    """``GEN:AxB[xC]`` as ``jax.experimental.topologies`` takes it, from itself or from a
    gcloud accelerator type (``v5litepod-64`` or ``v5e-64`` → ``v5e:8x8``, ``v4-32`` →
    ``v4:2x2x4``: v4 and v5p count TensorCores, two a chip)."""
    match = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", text)
    if match:
        generation, dims = match.group(1), [int(d) for d in match.group(2).split("x")]
        three_d = generation in ("v4", "v5p")
        chips = math.prod(dims)
        if len(dims) != (3 if three_d else 2) or chips < 1 or chips & (chips - 1):
            shape = "AxBxC" if three_d else "AxB"
            raise ValueError(
                f"--topology {text!r}: a {generation} slice is {shape} chips, a power of two in "
                f"all (e.g. {generation}:{_grid(4, three_d)})"
            )
        return text
    match = re.fullmatch(r"(v4|v5litepod|v5e|v5p|v6e)-(\d+)", text)
    if not match:
        raise ValueError(
            f"--topology {text!r}: expected a slice such as v5e:2x2, v4:2x2x1 or an accelerator "
            f"type such as v5litepod-16, v4-32 (generations {sorted(TPU_CHIPS)})"
        )
    prefix, count = match.group(1), int(match.group(2))
    generation = "v5e" if prefix == "v5litepod" else prefix
    _, counts_cores = _GCLOUD_NAMES[generation]
    if counts_cores and count % 2:
        raise ValueError(
            f"--topology {text!r}: {prefix}-N counts TensorCores, two a chip, so N is even"
        )
    chips = count // 2 if counts_cores else count
    return f"{generation}:{_grid(chips, generation in ('v4', 'v5p'))}"


def _slice(topology: str) -> tuple[str, list[int]]:
    """The generation and the chip grid of a slice (``v5e:2x4`` → ``"v5e", [2, 4]``)."""
    generation, _, shape = topology_name(topology).partition(":")
    return generation, [int(d) for d in shape.split("x")]


def gcloud_accelerator_type(topology: str) -> str:
    """The accelerator type gcloud names the slice ``topology`` by (``v5e:8x8`` →
    ``v5litepod-64``)."""
    generation, shape = _slice(topology)
    prefix, counts_cores = _GCLOUD_NAMES[generation]
    chips = math.prod(shape)
    return f"{prefix}-{chips * 2 if counts_cores else chips}"


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """XLA's per-device bytes of one compiled step."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int

    @classmethod
    def of(cls, compiled: Any) -> StepMemory:
        analysis = compiled.memory_analysis()
        return cls(
            analysis.argument_size_in_bytes,
            analysis.output_size_in_bytes,
            analysis.alias_size_in_bytes,
            analysis.temp_size_in_bytes,
            analysis.generated_code_size_in_bytes,
        )

    @property
    def total(self) -> int:
        """Live at the peak: arguments, outputs not written over donated arguments,
        temporaries and the program."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


@dataclasses.dataclass(frozen=True)
class CompiledSlice:
    """What compiling a config's steps for a TPU slice showed (memory per chip)."""

    topology: str
    device_kind: str
    chips: int
    processes: int
    attention: str
    mesh: dict[str, int]
    per_device_batch: int
    block_size: int
    train: StepMemory
    eval: StepMemory
    train_flops: float  # per chip and step, as XLA counts them (not inside Pallas kernels)
    compile_s: float
    cores_per_chip: int = 1

    @property
    def generation(self) -> str:
        return self.topology.partition(":")[0]

    @property
    def hbm_gib(self) -> float:
        return TPU_CHIPS[self.generation][0]

    def gib(self, per_device_bytes: int) -> float:
        return per_device_bytes * self.cores_per_chip / 2**30

    @property
    def per_chip_gib(self) -> float:
        return self.gib(max(self.train.total, self.eval.total))

    @property
    def fits(self) -> bool:
        return self.per_chip_gib <= self.hbm_gib

    def lines(self) -> list[str]:
        mesh = " x ".join(f"{axis} {size}" for axis, size in self.mesh.items())

        def row(name: str, m: StepMemory) -> str:
            return (
                f"{name} step per chip: arguments {self.gib(m.arguments):.2f} GiB, outputs "
                f"{self.gib(m.outputs):.2f} GiB (aliased {self.gib(m.aliased):.2f}), temporaries "
                f"{self.gib(m.temporaries):.2f} GiB, total {self.gib(m.total):.2f} GiB"
            )

        verdict = "fits" if self.fits else "does not fit"
        return [
            f"compiled for {self.topology} ({gcloud_accelerator_type(self.topology)}): "
            f"{self.chips} x {self.device_kind}, {self.processes} processes, mesh {mesh}, "
            f"attention={self.attention}, {self.per_device_batch} examples of "
            f"{self.block_size} tokens per chip",
            row("train", self.train),
            row("eval", self.eval),
            f"FLOPs per chip and step: {self.train_flops * self.cores_per_chip:.3e} (XLA's "
            f"count{'; Pallas kernels not included' if self.attention == 'pallas' else ''})",
            f"compile time: {self.compile_s:.1f} s",
            f"compiled topology={self.topology} chips={self.chips} attention={self.attention} "
            f"per_chip_gib={self.per_chip_gib:.2f} of {self.hbm_gib:.1f} {verdict}",
        ]

    def advice(self) -> str:
        """Why it does not fit, and what to change."""
        train = self.train
        return _advice(
            f"the step needs {self.per_chip_gib:.2f} GiB per chip, more than the "
            f"{self.hbm_gib:.0f} GiB of a {self.generation} chip (parameters and optimizer state "
            f"{self.gib(train.arguments):.2f} GiB, activations and temporaries "
            f"{self.gib(train.temporaries):.2f} GiB)",
            self.per_device_batch,
        )


def _advice(why: str, per_device_batch: int) -> str:
    return (
        f"{why}; shard the state with --config.mesh.fsdp=N, lower "
        f"train.per_device_batch_size (now {per_device_batch}) or train.batch_size, raise "
        f"train.grad_accum_steps, or recompute activations with --config.model.remat=full"
    )


@contextlib.contextmanager
def _runtime_logs_hidden() -> Iterator[None]:
    """libtpu, started without a TPU, writes its failed probes of the host straight to the
    process's stderr; they say nothing about the compile, so they are dropped."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _without_persistent_cache() -> Iterator[None]:
    """jax's persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``) would store a TPU
    program compiled here, and reading it back needs a TPU client: these compiles bypass it."""
    from jax.experimental.compilation_cache import compilation_cache

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # jax decides once whether the cache is used
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def _slice_mesh(config: ml_collections.ConfigDict, devices: list[Any], chips: int) -> Any:
    """The run's mesh over the slice's devices. A v4 or v5p slice compiled without a TPU has
    a device per TensorCore, two a chip, which ``jax.make_mesh`` refuses (on the chips JAX
    sees one device a chip): those devices are laid out in their order instead."""
    if len(devices) == chips:
        return sharding.make_mesh(config.mesh, devices)
    shape = sharding.mesh_shape(config.mesh, len(devices))
    grid = np.array(devices, dtype=object).reshape(shape)
    return jax.sharding.Mesh(grid, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def topology_devices(topology: str) -> list[Any]:
    """The compile-only devices of a TPU slice (libtpu needed, no TPU)."""
    from jax.experimental import topologies

    name = topology_name(topology)
    _, shape = _slice(name)
    bounds = {} if math.prod(shape) >= 4 else {"chips_per_host_bounds": (*shape, 1)[:3]}
    # libtpu takes a host-wide lock file for the TPU it drives; compiling drives none, and
    # several compiles (tests, a launcher beside a notebook) may run at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        with _runtime_logs_hidden():
            return list(
                topologies.get_topology_desc(topology_name=name, platform="tpu", **bounds).devices
            )
    except (RuntimeError, ValueError, OSError) as error:
        hint = ""
        if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
            hint = f'; compiling for a TPU needs libtpu: pip install "jax[tpu]=={jax.__version__}"'
        raise ValueError(f"--topology {name}: {str(error).splitlines()[0]}{hint}") from None


def compile_for_topology(config: ml_collections.ConfigDict, topology: str) -> CompiledSlice:
    """Compiles ``config``'s train and eval steps for the TPU slice ``topology`` (a name such
    as ``v5e:2x2`` or a gcloud accelerator type) on the mesh ``config.mesh`` lays over it.
    Raises :class:`CompileError` with the compiler's first lines when XLA:TPU or Mosaic
    refuses the program."""
    name = topology_name(topology)
    devices = topology_devices(name)
    generation, shape = _slice(name)
    chips = math.prod(shape)
    mesh = _slice_mesh(config, devices, chips)
    config, model, objective = _prepared(config, sharding.batch_axes_size(mesh))
    per_device = config.train.batch_size // sharding.batch_axes_size(mesh)
    start = time.perf_counter()
    with jax.set_mesh(mesh), pallas.traced_for("tpu"), _without_persistent_cache():
        placed = place_steps(model, objective, config, mesh)
        try:
            with _runtime_logs_hidden():
                train = placed.train_step.lower(placed.abstract_state, placed.batch).compile()
                index = jax.ShapeDtypeStruct((), jnp.int32)
                evaluate = placed.eval_step.lower(
                    placed.abstract_state.params, placed.batch, index
                ).compile()
        except Exception as error:  # XLA's and Mosaic's errors have no common type
            lines = [line for line in str(error).splitlines() if line.strip()][:6]
            if "out of memory on HBM" in str(error):  # XLA:TPU refuses what cannot fit
                why = f"the step does not fit a {generation} chip: {lines[0]}"
                raise CompileError(_advice(why, per_device)) from None
            raise CompileError(f"compiling for {name} failed: " + "\n".join(lines)) from None
    cost = train.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return CompiledSlice(
        topology=name,
        device_kind=devices[0].device_kind,
        chips=chips,
        processes=len({d.process_index for d in devices}),
        attention=model.attention,
        mesh=dict(mesh.shape),
        per_device_batch=per_device,
        block_size=config.data.block_size,
        train=StepMemory.of(train),
        eval=StepMemory.of(evaluate),
        train_flops=float(cost.get("flops", 0.0)) if cost else 0.0,
        compile_s=time.perf_counter() - start,
        cores_per_chip=len(devices) // chips,
    )
