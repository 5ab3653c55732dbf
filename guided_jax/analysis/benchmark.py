"""Train-step speed: our model without and with guidance against HF's FlaxRobertaForMaskedLM.

    python -m guided_jax.benchmark --config configs/benchmark.py
    python -m guided_jax.benchmark --config configs/benchmark.py:roberta_12 \
        --config.model.attention=flash

One process, one run, one backend (whatever JAX finds): every arm trains on the same real batches
of the embedded corpus with the same optax optimizer and the same dynamic masking. Arms run in
interleaved rounds, so drift of the machine (clock, other load) hits them alike; compile and
warm-up steps are excluded and the medians of ``--steps`` timed steps are compared. The last line
holds the two ratios the project is judged by, e.g. ``guidance_overhead=1.012x
speedup_vs_hf_flax=1.41x``; ``--results`` appends a row to ``benchmarks/RESULTS.md``.

HF's Flax models need ``transformers`` (4.57.6 is the last release with them), an optional
extra (``pip install -e '.[bench]'``); without it that arm is left out and said so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from guided_jax import sharding
from guided_jax.data.pipeline import train_iterator
from guided_jax.model.hf_config import hf_config
from guided_jax.storage import as_path
from guided_jax.train.inputs import RunInputs, prepare
from guided_jax.train.masking import mlm_loss
from guided_jax.train.optimizer import make_optimizer
from guided_jax.train.step import batch_shape, build_train_program, make_diagnostics_step

# Dense bf16 peak FLOP/s per chip (vendor figures), for model FLOPs utilisation.
PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


@dataclasses.dataclass
class ArmResult:
    name: str
    step_times: list[float]
    tokens_per_step: int
    memory_bytes: int | None

    @property
    def median(self) -> float:
        return statistics.median(self.step_times)

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens_per_step / self.median


@dataclasses.dataclass
class Arm:
    """A compiled step and its (donated) state: ``state = step(state, batch)``."""

    name: str
    step: Callable[[Any, jax.Array], tuple[Any, Any]]
    state: Any
    compiled: Any
    graphdef: nnx.GraphDef | None = None  # our model's, for the diagnostics timing
    times: list[float] = dataclasses.field(default_factory=list)

    def run(self, batches: list[jax.Array], steps: int, record: bool) -> None:
        for i in range(steps):
            batch = batches[i % len(batches)]
            start = time.perf_counter()
            self.state, metrics = self.step(self.state, batch)
            jax.block_until_ready((self.state, metrics))
            if record:
                self.times.append(time.perf_counter() - start)


def peak_flops(device: jax.Device) -> float | None:
    kind = device.device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def model_flops_per_step(inputs: RunInputs) -> float:
    """Useful training FLOPs of one step (forward + backward = 3x forward), matmuls only:
    ``6 N`` per token for the encoder's ``N`` matmul weights and ``12 L n d`` for attention,
    plus the MLM head (dense + decoder) on the selected ~15% of tokens the loss needs (an arm
    that projects every position does that extra work at a lower utilisation)."""
    m, cfg = inputs.model, inputs.config
    tokens, n, d = cfg.train.batch_size * cfg.data.block_size, cfg.data.block_size, m.hidden_size
    encoder = m.num_layers * (4 * d * d + 2 * d * m.intermediate_size)
    head = cfg.data.mlm_probability * (d * d + d * m.vocab_size)
    return tokens * (6 * (encoder + head) + 12 * m.num_layers * n * d)


def compiled_memory(compiled: Any) -> int | None:
    """Arguments + outputs + temporaries - donated aliases: XLA's estimate of a step's peak."""
    analysis = compiled.memory_analysis() if compiled is not None else None
    if analysis is None:
        return None
    return (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def our_arm(name: str, inputs: RunInputs, mesh: jax.sharding.Mesh) -> Arm:
    program = build_train_program(inputs, mesh)
    step = program.train_step
    return Arm(name, step, program.init_state(), step, program.graphdef)


def hf_arm(inputs: RunInputs, mesh: jax.sharding.Mesh) -> Arm | str:
    """HF's FlaxRobertaForMaskedLM with our sizes, optimizer and masking; or why it is absent."""
    try:
        import transformers
    except ImportError:
        return "transformers is not installed (pip install -e '.[bench]')"
    if not hasattr(transformers, "FlaxRobertaForMaskedLM"):
        return f"transformers {transformers.__version__} has no Flax models (use 4.57.6)"
    m, cfg = inputs.model, inputs.config
    if m.model_type != "roberta":
        return f"the HF arm compares RoBERTa models, this config is {m.model_type}"
    hf_model_config = transformers.RobertaConfig(**hf_config(m))
    model = transformers.FlaxRobertaForMaskedLM(
        hf_model_config, seed=cfg.train.seed, dtype=m.compute_dtype, _do_init=True
    )
    tx, _ = make_optimizer(cfg.train)
    objective = inputs.objective

    def loss_fn(params: Any, batch: jax.Array, key: jax.Array) -> jax.Array:
        mask_key, dropout_key = jax.random.split(key)
        masked, selected = objective.mask(mask_key, batch)
        attend = (batch != m.pad_token_id).astype(jnp.int32)
        logits = model(
            masked, attention_mask=attend, params=params, dropout_rng=dropout_key, train=True
        ).logits
        return mlm_loss(logits, batch, selected)

    def train_step(state: tuple[Any, Any, jax.Array], batch: jax.Array):
        params, opt_state, step = state
        key = jax.random.fold_in(jax.random.key(cfg.train.seed), step)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        return (params, opt_state, step + 1), loss

    replicated = NamedSharding(mesh, P())
    params = jax.device_put(model.params, replicated)
    state = (params, tx.init(params), jnp.zeros((), jnp.int32))
    batch_sharding = sharding.batch_sharding(mesh, cfg.train.batch_size)
    shape = jax.ShapeDtypeStruct(
        (cfg.train.batch_size, cfg.data.block_size), jnp.int32, sharding=batch_sharding
    )
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, shape).compile()
    return Arm("hf_flax", compiled, state, compiled)


def input_pipeline_rate(inputs: RunInputs, seconds: float = 1.0) -> float:
    """Examples per second the input pipeline delivers on the host, alone."""
    cfg = inputs.config
    batches = train_iterator(
        inputs.train_blocks, inputs.train_starts, cfg.train.batch_size, cfg.train.seed
    )
    next(batches)  # starts its reader threads
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        next(batches)
        step += 1
    return step * inputs.config.train.batch_size / (time.perf_counter() - start)


def benchmark(
    config: ml_collections.ConfigDict, *, steps: int, warmup: int, rounds: int, hf: bool
) -> dict[str, Any]:
    """Runs every arm; returns the results (see :func:`report`)."""
    guided_config = config.copy_and_resolve_references()
    guided_config.guidance.enabled = True
    with tempfile.TemporaryDirectory() as workdir:
        inputs = prepare(guided_config, workdir)
    plain = dataclasses.replace(
        inputs, objective=dataclasses.replace(inputs.objective, guided=False)
    )
    mesh = sharding.make_mesh(inputs.config.mesh)
    tokens = inputs.config.train.batch_size * inputs.config.data.block_size
    with jax.set_mesh(mesh):
        arms = [our_arm("ours", plain, mesh), our_arm("ours_guided", inputs, mesh)]
        hf_skipped = "--nohf" if not hf else None
        if hf:
            baseline = hf_arm(inputs, mesh)
            if isinstance(baseline, str):
                hf_skipped = baseline
            else:
                arms.append(baseline)
        batch_sharding = sharding.batch_sharding(mesh, inputs.config.train.batch_size)
        shape = batch_shape(inputs.config)
        cfg = inputs.config
        reader = train_iterator(
            inputs.train_blocks,
            inputs.train_starts,
            cfg.train.batch_size,
            cfg.train.seed,
            rows=sharding.local_rows(batch_sharding, shape),
        )
        batches = [
            sharding.global_batch(batch_sharding, shape, lambda _: next(reader)) for _ in range(4)
        ]
        for arm in arms:
            arm.run(batches, warmup, record=False)
        per_round = -(-steps // rounds)
        for _ in range(rounds):
            for arm in arms:
                arm.run(batches, per_round, record=True)
        diagnostics_ms = diagnostics_time(inputs, arms[1], batches, steps) * 1000
    results = {
        arm.name: ArmResult(arm.name, arm.times, tokens, compiled_memory(arm.compiled))
        for arm in arms
    }
    return dict(
        inputs=inputs,
        arms=results,
        hf_skipped=hf_skipped,
        flops=model_flops_per_step(inputs),
        device=jax.devices()[0],
        device_count=len(jax.devices()),
        input_examples_per_sec=input_pipeline_rate(inputs),
        diagnostics_ms=diagnostics_ms,
    )


def diagnostics_time(inputs: RunInputs, arm: Arm, batches: list[jax.Array], calls: int) -> float:
    """Median seconds of one call of the head diagnostics (``train.diagnostics``) on ``arm``'s
    parameters, which a run makes on its log steps only."""
    step = jax.jit(make_diagnostics_step(inputs.objective, arm.graphdef))
    params = arm.state.params
    jax.block_until_ready(step(params, batches[0]))
    times = []
    for i in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(step(params, batches[i % len(batches)]))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ratios(arms: dict[str, ArmResult]) -> dict[str, float]:
    out = {"guidance_overhead": arms["ours_guided"].median / arms["ours"].median}
    if "hf_flax" in arms:
        out["speedup_vs_hf_flax"] = arms["hf_flax"].median / arms["ours"].median
    return out


def report(results: dict[str, Any]) -> list[str]:
    """Human-readable lines; the last holds the ratios."""
    inputs, arms, device = results["inputs"], results["arms"], results["device"]
    peak = peak_flops(device)
    m = inputs.model
    lines = [
        f"device: {results['device_count']} x {device.device_kind} ({device.platform}), "
        f"jax {jax.__version__}",
        f"model: {m.num_layers} layers, d={m.hidden_size}, {m.num_heads} heads, "
        f"FFN {m.intermediate_size}, vocab {m.vocab_size}, {m.dtype}, attention "
        f"{m.attention}, remat {m.remat}; batch {inputs.config.train.batch_size} x "
        f"{inputs.config.data.block_size}; "
        f"guidance {inputs.spec}",
    ]
    for arm in arms.values():
        mfu = ""
        if peak is not None:
            achieved = results["flops"] / arm.median / results["device_count"]
            mfu = f"  MFU {100 * achieved / peak:.1f}%"
        memory = "n/a" if arm.memory_bytes is None else f"{arm.memory_bytes / 2**20:.0f} MiB"
        lines.append(
            f"{arm.name:>12}: step {1000 * arm.median:8.2f} ms  {arm.tokens_per_sec:10.0f} "
            f"tokens/s  memory {memory}{mfu}  ({len(arm.step_times)} steps)"
        )
    if results["hf_skipped"]:
        lines.append(f"hf_flax: not measured: {results['hf_skipped']}")
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        lines.append(f"device peak memory (all arms): {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
    lines.append(f"input pipeline: {results['input_examples_per_sec']:.0f} examples/s")
    log_every = inputs.config.train.log_every
    share = results["diagnostics_ms"] / (log_every * 1000 * arms["ours_guided"].median)
    lines.append(
        f"head diagnostics: {results['diagnostics_ms']:.1f} ms per log step, "
        f"{100 * share:.2f}% of training time at train.log_every={log_every}"
    )
    lines.append(" ".join(f"{k}={v:.3f}x" for k, v in ratios(arms).items()))
    return lines


def results_row(results: dict[str, Any], shape: str) -> list[str]:
    """The cells of a results row from ``date`` to ``input examples/s``."""
    inputs, arms, device = results["inputs"], results["arms"], results["device"]
    peak = peak_flops(device)
    r = ratios(arms)
    ours, guided = arms["ours"], arms["ours_guided"]
    hf = arms.get("hf_flax")
    mfu = (
        "n/a"
        if peak is None
        else (f"{100 * results['flops'] / guided.median / results['device_count'] / peak:.1f}%")
    )
    memory = "n/a" if guided.memory_bytes is None else f"{guided.memory_bytes / 2**20:.0f} MiB"
    cells = [
        datetime.date.today().isoformat(),
        source_commit(),
        host_machine(),
        f"{results['device_count']}x {device.device_kind}",
        f"jax {jax.__version__}",
        shape,
        f"{inputs.config.train.batch_size}x{inputs.config.data.block_size}",
        "/".join(
            [inputs.model.dtype, inputs.model.attention]
            + ([f"remat={inputs.model.remat}"] if inputs.model.remat != "none" else [])
        ),
        f"{ours.tokens_per_sec:.0f}",
        f"{guided.tokens_per_sec:.0f}",
        "n/a" if hf is None else f"{hf.tokens_per_sec:.0f}",
        f"{1000 * guided.median:.1f}",
        memory,
        mfu,
        f"{r['guidance_overhead']:.3f}x",
        "n/a" if hf is None else f"{r['speedup_vs_hf_flax']:.2f}x",
        f"{results['input_examples_per_sec']:.0f}",
    ]
    return cells


def source_commit() -> str:
    """The checkout's commit (``+changes`` when files differ from it), which the numbers
    belong to; ``unknown`` outside a git checkout."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        if done.returncode:
            raise OSError(done.stderr)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short=10", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "guided_jax")
    except OSError:
        return "unknown"
    return commit + ("+changes" if changed else "")


def host_machine() -> str:
    """The host: its CPU model and core count (an accelerator's name is in the device cell)."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


RESULTS_COLUMNS = (
    "row", "date", "commit", "machine", "device", "jax", "config", "batch", "dtype/attention",
    "ours tok/s", "guided tok/s", "HF Flax tok/s", "guided step ms", "guided memory",
    "guided MFU", "guidance_overhead", "speedup_vs_hf_flax", "input examples/s", "status",
)  # fmt: skip
# What makes two rows measure the same thing: a newer one supersedes the older.
_SAME_MEASUREMENT = ("device", "config", "batch", "dtype/attention")
CURRENT = "current"


def append_results(path: str | os.PathLike, cells: list[str]) -> str:
    """Appends a row (cells ``date`` to ``input examples/s``) as ``R<n>``, the next free
    number, and marks the earlier current rows of the same device, config, batch and
    attention ``superseded by R<n>``. Returns the row's name, which README and notes cite."""
    path = as_path(path)
    header = "| " + " | ".join(RESULTS_COLUMNS) + " |\n" + "|---" * len(RESULTS_COLUMNS) + "|\n"
    if not path.exists() or not path.read_text().strip():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Benchmark results\n\n" + header)
    lines = path.read_text().splitlines()
    rows = [i for i, line in enumerate(lines) if re.match(r"\| R\d+ \|", line)]
    name = f"R{1 + max((int(lines[i].split()[1][1:]) for i in rows), default=0)}"
    new = dict(zip(RESULTS_COLUMNS, [name, *cells, CURRENT], strict=True))
    for i in rows:
        old = dict(zip(RESULTS_COLUMNS, _cells(lines[i]), strict=False))
        same = all(old.get(k) == new[k] for k in _SAME_MEASUREMENT)
        if same and old.get("status") == CURRENT:
            old["status"] = f"superseded by {name}"
            lines[i] = "| " + " | ".join(old.values()) + " |"
    if not any(line.startswith("| row |") for line in lines):
        lines += ["", *header.splitlines()]
    lines.append("| " + " | ".join(new.values()) + " |")
    path.write_text("\n".join(lines) + "\n")
    return name


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]
