"""What fits on which TPU slice: every configs/reference.py preset compiled with XLA:TPU (libtpu,
no TPU needed) for a few slices, in bfloat16 on blocks of 512 tokens, with dense and Pallas
attention, at 4 examples per device and at the largest power-of-two batch per device that fits;
the table goes to docs/TPU.md.

    python benchmarks/tpu_fit.py
    python benchmarks/tpu_fit.py --presets roberta_4,roberta_8 --topologies v5e:2x2 \
        --attentions dense --max_batch 64

Each compile (one preset, slice, attention and batch; roberta presets take minutes) is kept as a
JSON file in ``--cache``, so an interrupted run resumes where it stopped and the whole grid can be
measured over several invocations, or at once on a large host with ``--jobs N`` worker
processes (one per cell: a worker the system kills for memory fails its own cell only); the table
is rewritten after every cell from all the cache holds for the default grid plus what the flags
name (``--no_compile`` only rewrites it).

The batch search compiles 4 and 8 examples per device, predicts the largest power of two that
fits the chip's HBM from the line through their memory, and bisects over powers of two (up to
``--max_batch``) until a batch fits and its double does not; below 4 it halves until one fits.
Where another slice has a finished search, the batch after 4 comes from it instead of from 8: on
the same chip, its largest batch (data parallelism compiles the same program per chip, so a pod
slice often needs only 4, that batch and its double); on another chip, the largest power of two
its memory growth per example keeps within this chip's HBM, from this chip's memory at 4.
A program XLA:TPU or Mosaic refuses counts as not fitting. Memory and FLOPs are XLA's estimates
from the compiled program (:func:`guided_jax.train.lowering.compile_for_topology`); tokens/s is a
projection at 40% of the chip's bf16 peak, from the dense step's FLOPs also for Pallas (XLA
cannot count inside the kernels).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence

import jax

from guided_jax.config import MODEL_PRESETS, load_config
from guided_jax.train.lowering import (
    TPU_CHIPS,
    CompiledSlice,
    CompileError,
    StepMemory,
    compile_for_topology,
    topology_name,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
PRESETS = tuple(MODEL_PRESETS)  # configs/reference.py takes each as its argument
TOPOLOGIES = ("v4:2x2x1", "v5e:2x2", "v5e:16x16", "v5p:2x2x1", "v6e:2x2")
ATTENTIONS = ("dense", "pallas")
DTYPE = "bfloat16"
START_BATCH = 4  # the reference's --per_device_train_batch_size
DEFAULT_MAX_BATCH = 256
DEFAULT_BLOCK_SIZE = 512
DEFAULT_CACHE = REPO / "benchmarks" / "tpu_fit_cache"
UTILISATION = 0.4  # of the chip's bf16 peak, for the tokens/s projection
WRAP = {"width": 100, "break_long_words": False, "break_on_hyphens": False}  # the doc's prose
# Sharding the state (mesh.fsdp) against data parallelism alone, on the pod slice, dense, batch 4
FSDP_TOPOLOGY = "v5e:16x16"
FSDP_PRESETS = ("roberta_12", "bert_48")
FSDP_SIZES = (1, 16, 256)


# ----------------------------------------------------------------------------- one compile


@dataclasses.dataclass(frozen=True)
class Cell:
    """One preset on one slice with one attention kernel (the batch is searched)."""

    preset: str  # a configs/reference.py preset, or a config spec such as configs/tiny.py
    topology: str
    attention: str
    block_size: int  # 0: the config's own
    fsdp: int = 1  # mesh.fsdp: chips each parameter and optimizer state is sharded over

    @property
    def spec(self) -> str:
        if ".py" in self.preset:
            path, colon, arg = self.preset.partition(":")
            if not pathlib.Path(path).exists() and (REPO / path).exists():
                path = str(REPO / path)
            return f"{path}{colon}{arg}"
        return f"{REPO / 'configs' / 'reference.py'}:{self.preset}"

    def config(self, batch: int):
        config = load_config(self.spec)
        config.model.dtype = DTYPE
        config.model.attention = self.attention
        if self.block_size:
            config.data.block_size = self.block_size
        config.train.per_device_batch_size = batch
        if self.fsdp != 1:
            config.mesh.fsdp = self.fsdp
        return config

    def file(self, cache: pathlib.Path, batch: int) -> pathlib.Path:
        preset = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.preset)
        block = f"n{self.block_size}" if self.block_size else "nconfig"
        topology = self.topology.replace(":", "-")
        fsdp = f"__fsdp{self.fsdp}" if self.fsdp != 1 else ""
        return cache / f"{preset}__{topology}__{self.attention}__b{batch}__{block}{fsdp}.json"


@functools.cache
def code_commit() -> str:
    """The commit of the code this process compiles with, taken once, when it starts (each job
    calls it first, in this process or a worker): the checkout may change while a long run goes
    on."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if git("status", "--porcelain", "--", "guided_jax", "configs"):
        commit += " with uncommitted changes"
    return commit


def _provenance() -> dict[str, str]:
    """Versions, commit and date a compile is recorded with."""
    try:
        libtpu = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        libtpu = "unknown"
    return {
        "jax": jax.__version__,
        "libtpu": libtpu,
        "commit": code_commit(),
        "date": datetime.date.today().isoformat(),
    }


def measure(cell: Cell, batch: int) -> dict:
    """Compiles ``cell`` at ``batch`` examples per device: the cache record."""
    config = cell.config(batch)
    record: dict = {
        "preset": cell.preset,
        "topology": cell.topology,
        "attention": cell.attention,
        "per_device_batch": batch,
        "block_size": int(config.data.block_size),
        "dtype": DTYPE,
        **_provenance(),
    }
    try:
        compiled = compile_for_topology(config, cell.topology)
    except CompileError as error:
        return {**record, "status": "compile_error", "error": str(error)}
    return {
        **record,
        "status": "ok",
        "compiled": dataclasses.asdict(compiled),
        "per_chip_gib": compiled.per_chip_gib,
        "hbm_gib": compiled.hbm_gib,
        "fits": compiled.fits,
        "flops_per_chip": compiled.train_flops * compiled.cores_per_chip,
    }


def compiled_slice(record: dict) -> CompiledSlice | None:
    """The :class:`CompiledSlice` a cache record holds (None for a refused compile)."""
    if record["status"] != "ok":
        return None
    fields = dict(record["compiled"])
    fields["train"] = StepMemory(**fields["train"])
    fields["eval"] = StepMemory(**fields["eval"])
    return CompiledSlice(**fields)


def fits(record: dict) -> bool:
    compiled = compiled_slice(record)
    return compiled is not None and compiled.fits


# ----------------------------------------------------------------------------- batch search


@dataclasses.dataclass
class Search:
    """The batches tried for one cell, the largest that fits, and whether the search ended."""

    records: dict[int, dict]
    best: int | None = None
    finished: bool = False
    capped: bool = False  # the largest fitting batch is --max_batch


def memory(record: dict) -> tuple[float, float] | None:
    """A compiled record's per-chip GiB and its chip's HBM (None for a refused compile)."""
    if record["status"] != "ok":
        return None
    return record["per_chip_gib"], record["hbm_gib"]


def devices_per_chip(record: dict) -> int:
    """TPU devices JAX shows per chip in a compiled record's slice (2 on v4: its two cores)."""
    return record["compiled"]["cores_per_chip"]


def predicted(records: dict[int, dict], best: int) -> int:
    """The largest power-of-two batch the line through the two largest fitting batches' memory
    keeps within HBM (memory grows with the batch by its activations): at least ``best``."""
    points = sorted(
        (batch, *known) for batch, r in records.items() if fits(r) and (known := memory(r))
    )[-2:]
    if len(points) < 2:
        return best
    (b0, m0, _), (b1, m1, hbm) = points
    slope = (m1 - m0) / (b1 - b0)
    if slope <= 0:
        return best
    batch = best
    while m1 + slope * (batch * 2 - b1) <= hbm:
        batch *= 2
    return batch


Guess = Callable[[dict], int]  # the start batch's record -> the batch to try next


def search(get: Callable[[int], dict | None], max_batch: int, guess: Guess | None = None) -> Search:
    """The largest power-of-two batch per device that fits, found with few compiles: 4 (or
    ``max_batch`` if smaller), then what ``guess`` makes of its record (:func:`guess_for`) or
    else 8 and the batch the line through their memory predicts, then a bisection over powers
    of two until a fitting batch's double does not fit (or is over ``max_batch``); below 4,
    halving until one fits. ``get(batch)`` gives a batch's record, or None when it is not
    measured (the search then stops unfinished)."""
    result = Search({})

    def tried(batch: int) -> dict | None:
        record = get(batch)
        if record is not None:
            result.records[batch] = record
        return record

    batch = min(START_BATCH, max_batch)
    record = tried(batch)
    if record is None:
        return result
    if fits(record):
        low, high = batch, None  # fits; smallest known not to fit
        result.best = low
        first = min(guess(record), max_batch) if guess is not None else None
        while low * 2 <= max_batch and (high is None or high > low * 2):
            if high is None and first is not None and first > low:
                batch, first = first, None
            elif high is None:
                batch = min(max(low * 2, predicted(result.records, low)), max_batch)
            else:  # the power of two halfway (in exponent) between low and high
                batch = 2 ** ((low.bit_length() + high.bit_length() - 2) // 2)
            record = tried(batch)
            if record is None:
                return result
            if fits(record):
                low = result.best = batch
            else:
                high = batch
        result.capped = high is None
    else:
        batch //= 2
        while batch >= 1:
            record = tried(batch)
            if record is None:
                return result
            if fits(record):
                result.best = batch
                break
            batch //= 2
    result.finished = True
    return result


def settled(records: dict[int, dict], max_batch: int) -> Search:
    """What a cell's records show, in whatever order they were compiled (with or without a
    guess): the largest batch that fits, final once its double is known not to fit or would be
    over ``max_batch`` (a power of two), or once nothing down to 1 fits."""
    records = dict(sorted(records.items()))
    fitting = [batch for batch, record in records.items() if fits(record)]
    if not fitting:
        return Search(records, finished=1 in records)
    best = max(fitting)
    if best >= max_batch:
        return Search(records, best, finished=True, capped=True)
    return Search(records, best, finished=best * 2 in records)  # which cannot fit: best is max


def batches(max_batch: int) -> list[int]:
    """The batches a search may compile: powers of two up to ``max_batch``."""
    return [2**i for i in range(max_batch.bit_length())]


def cached_records(cell: Cell, cache: pathlib.Path, max_batch: int) -> dict[int, dict]:
    read = cached(cell, cache)
    return {batch: record for batch in batches(max_batch) if (record := read(batch)) is not None}


def guess_for(cell: Cell, cache: pathlib.Path, max_batch: int) -> Guess | None:
    """What ``cell``'s search tries after 4, from finished searches on the other slices in
    TOPOLOGIES: the largest batch the same chip fits in another slice (data parallelism compiles
    the same program per chip); else the largest power of two that another chip's growth in
    memory per example, added to this chip's memory at 4, keeps within its HBM; else None."""
    generation = cell.topology.partition(":")[0]
    growth = None  # GiB per example per device, on another chip
    for topology in TOPOLOGIES:
        if topology == cell.topology:
            continue
        other = dataclasses.replace(cell, topology=topology)
        found = settled(cached_records(other, cache, max_batch), max_batch)
        if not found.finished or found.best is None:
            continue
        if topology.partition(":")[0] == generation:
            best = found.best
            return lambda start: best
        points = [
            (batch, known[0] / devices_per_chip(record))
            for batch, record in found.records.items()
            if fits(record) and (known := memory(record))
        ][:2]
        if growth is None and len(points) == 2:
            (b0, m0), (b1, m1) = points
            growth = (m1 - m0) / (b1 - b0)
    if growth is None or growth <= 0:
        return None
    per_example = growth  # a float from here on, for the closure

    def from_growth(start: dict) -> int:
        first = batch = start["per_device_batch"]
        if (known := memory(start)) is None:
            return batch
        gib, hbm = known
        slope = per_example * devices_per_chip(start)  # GiB per chip per example per device
        while gib + slope * (batch * 2 - first) <= hbm:
            batch *= 2
        return batch

    return from_growth


def cached(cell: Cell, cache: pathlib.Path) -> Callable[[int], dict | None]:
    def get(batch: int) -> dict | None:
        path = cell.file(cache, batch)
        return json.loads(path.read_text()) if path.exists() else None

    return get


def measured(cell: Cell, cache: pathlib.Path) -> Callable[[int], dict]:
    """Like :func:`cached`, compiling (and caching) what the cache lacks."""
    read = cached(cell, cache)

    def get(batch: int) -> dict:
        record = read(batch)
        if record is not None:
            return record
        record = measure(cell, batch)
        path = cell.file(cache, batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")  # --jobs may race to write it
        partial.write_text(json.dumps(record, indent=1) + "\n")
        partial.replace(path)  # a killed run leaves no half-written record
        print(f"{Job(cell).label}, b{batch}: {summary(record)}", flush=True)
        return record

    return get


def summary(record: dict) -> str:
    compiled = compiled_slice(record)
    if compiled is None:
        return "compiler refused: " + record["error"].splitlines()[0]
    verdict = "fits" if compiled.fits else "does not fit"
    return (
        f"{compiled.per_chip_gib:.3g} GiB of {compiled.hbm_gib:g} {verdict}, "
        f"{record['flops_per_chip']:.3e} FLOPs per chip, compiled in {compiled.compile_s:.0f} s"
    )


# ----------------------------------------------------------------------------- the table


def tokens_per_chip_per_s(compiled: CompiledSlice, flops_per_device: float) -> float:
    """Tokens a chip would train per second at UTILISATION of its bf16 peak, given the step's
    FLOPs per device: tokens per device per step / (FLOPs per device / FLOP/s per device)."""
    devices = math.prod(compiled.mesh.values())
    batch_devices = compiled.mesh.get("data", 1) * compiled.mesh.get("fsdp", 1)
    tokens_per_device = compiled.per_device_batch * compiled.block_size * batch_devices / devices
    peak_per_device = TPU_CHIPS[compiled.generation][1] / compiled.cores_per_chip
    step_s = flops_per_device / (UTILISATION * peak_per_device)
    return tokens_per_device * compiled.cores_per_chip / step_s


def si(value: float, unit: str) -> str:
    """``value`` to 3 significant digits with an SI prefix: 1.23 TFLOP, 48.1k tokens/s."""
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            number = f"{value / scale:.3g}"
            return f"{number} {prefix}{unit}" if unit == "FLOP" else f"{number}{prefix} {unit}"
    return f"{value:.3g} {unit}"


def dense_flops(cell: Cell, cache: pathlib.Path, batch: int) -> tuple[float, bool] | None:
    """The dense step's FLOPs per device at ``batch``: measured, or (second item True) on the
    line through the two nearest measured batches; None when the cache has neither."""
    read = cached(dataclasses.replace(cell, attention="dense"), cache)
    known: dict[int, float] = {}
    for b in (2**i for i in range(16)):
        record = read(b)
        compiled = compiled_slice(record) if record is not None else None
        if compiled is not None and compiled.train_flops > 0:
            known[b] = compiled.train_flops
    if batch in known:
        return known[batch], False
    if len(known) < 2:
        return None
    (b0, f0), (b1, f1) = sorted(known.items(), key=lambda item: abs(item[0] - batch))[:2]
    return f0 + (f1 - f0) * (batch - b0) / (b1 - b0), True


def cell_text(cell: Cell, cache: pathlib.Path, max_batch: int) -> tuple[str, list[dict]]:
    """A table cell (the start batch, then the largest batch that fits) and the records it
    shows."""
    found = settled(cached_records(cell, cache, max_batch), max_batch)
    start = min(START_BATCH, max_batch)
    if start not in found.records:
        return "—", []

    def line(batch: int) -> str:
        record = found.records[batch]
        compiled = compiled_slice(record)
        if compiled is None:
            return f"b{batch}: refused by the compiler"
        text = f"b{batch}: {compiled.per_chip_gib:.3g} GiB, {si(record['flops_per_chip'], 'FLOP')}"
        if not compiled.fits:
            return text + " ✗"
        if batch != found.best or not found.finished:
            return text
        text = "**max** " + text + (" (cap)" if found.capped else "")
        if cell.attention == "dense":
            flops: tuple[float, bool] | None = (compiled.train_flops, False)
        else:
            flops = dense_flops(cell, cache, batch)
        if flops is None:
            return text + ", — tokens/s"
        mark = "‡" if flops[1] else ("†" if cell.attention != "dense" else "")
        rate = si(tokens_per_chip_per_s(compiled, flops[0]), "tokens/s")
        return f"{text}, {rate}{mark}"

    lines = [line(start)]
    if not found.finished:
        lines.append(f"search unfinished (cache ends at b{max(found.records)})")
    elif found.best is None:
        lines.append("fits no batch")
    elif found.best != start:
        lines.append(line(found.best))
    return "<br>".join(lines), list(found.records.values())


def fsdp_table(cache: pathlib.Path, block: int) -> tuple[str, list[dict]]:
    """Per-chip memory of FSDP_PRESETS on FSDP_TOPOLOGY at START_BATCH, dense, with the state
    sharded over each of FSDP_SIZES chips (1: replicated, data parallelism alone)."""
    rows = [
        "| preset | mesh | parameters and optimizer state | activations and temporaries "
        "| per chip | FLOPs per chip |",
        "|---|---|---|---|---|---|",
    ]
    used = []
    for preset in FSDP_PRESETS:
        for size in FSDP_SIZES:
            cell = Cell(preset, FSDP_TOPOLOGY, "dense", block, size)
            record = cached(cell, cache)(START_BATCH)
            compiled = compiled_slice(record) if record is not None else None
            if compiled is None:
                why = "—" if record is None else "refused by the compiler"
                rows.append(f"| {preset} | fsdp {size} | {why} | | | |")
                continue
            used.append(record)
            mesh = ", ".join(f"{axis} {n}" for axis, n in compiled.mesh.items() if n > 1)
            verdict = "" if compiled.fits else " ✗"
            rows.append(
                f"| {preset} | {mesh} | {compiled.gib(compiled.train.arguments):.3g} GiB | "
                f"{compiled.gib(compiled.train.temporaries):.3g} GiB | "
                f"{compiled.per_chip_gib:.3g} GiB{verdict} | "
                f"{si(record['flops_per_chip'], 'FLOP')} |"
            )
    chips = math.prod(int(d) for d in FSDP_TOPOLOGY.partition(":")[2].split("x"))
    text = (
        f"## Sharding the state: fsdp on {FSDP_TOPOLOGY}\n\n"
        + textwrap.fill(
            f"The same dense train step on all {chips} chips of {FSDP_TOPOLOGY} at "
            f"{START_BATCH} examples per chip, with the parameters and optimizer state "
            f"replicated (fsdp 1: data parallelism alone) or sharded over `mesh.fsdp` chips "
            f"(`--config.mesh.fsdp=N`; the batch is still split over every chip). Train step "
            f"per chip: arguments (parameters and optimizer state), temporaries (activations, "
            f"gradients and the rest), and the total as in the tables above.",
            **WRAP,
        )
        + "\n\n"
        + "\n".join(rows)
        + "\n"
    )
    return text, used


def _shown(path: pathlib.Path) -> str:
    """``path`` relative to the repository where it is inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _ordered(defaults: Sequence[str], extra: Sequence[str]) -> list[str]:
    return list(dict.fromkeys([*defaults, *extra]))


def write_table(args: argparse.Namespace, failures: Sequence[str]) -> None:
    presets = _ordered(PRESETS, args.presets)
    topologies = _ordered(TOPOLOGIES, args.topologies)
    attentions = _ordered(ATTENTIONS, args.attentions)
    cache, block = args.cache, args.block_size
    used: list[dict] = []
    tables: list[str] = []
    for attention in attentions:
        header = ["preset"] + [
            f"{t} ({math.prod(int(d) for d in t.partition(':')[2].split('x'))} chips, "
            f"{TPU_CHIPS[t.partition(':')[0]][0]:g} GiB)"
            for t in topologies
        ]
        rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for preset in presets:
            texts, blocks = [], set()
            for topology in topologies:
                cell = Cell(preset, topology, attention, block)
                text, records = cell_text(cell, cache, args.max_batch)
                texts.append(text)
                used += records
                blocks |= {r["block_size"] for r in records}
            label = preset  # with its block size where it is not --block_size
            if blocks and blocks != {block}:
                label += f" (n={', '.join(map(str, sorted(blocks)))})"
            rows.append(f"| {label} | " + " | ".join(texts) + " |")
        title = "Dense attention" if attention == "dense" else f"{attention.capitalize()} attention"
        tables.append(f"## {title}\n\n" + "\n".join(rows) + "\n")
    sharded, records = fsdp_table(cache, block)
    tables.append(sharded)
    used += records

    def seen(key: str) -> str:
        return ", ".join(sorted({r[key] for r in used})) or "none yet"

    days = sorted({r["date"] for r in used})
    dates = " to ".join(dict.fromkeys([days[0], days[-1]])) if days else "no date yet"
    n = f"blocks of {block} tokens" if block else "each config's own block size"
    command = "python benchmarks/tpu_fit.py"
    if args.max_batch != DEFAULT_MAX_BATCH:
        command += f" --max_batch {args.max_batch}"
    if block != DEFAULT_BLOCK_SIZE:
        command += f" --block_size {block}"
    cache_name = _shown(cache)
    if cache_name != _shown(DEFAULT_CACHE):
        command += f" --cache {cache_name}"
    intro = [
        f"Each [configs/reference.py](../configs/reference.py) preset's train and eval steps, "
        f"compiled for TPU slices by XLA:TPU and Mosaic (libtpu) on a CPU host with "
        f"`guided_jax.train.lowering.compile_for_topology`: {DTYPE}, {n}, the config's mesh "
        f"(`data=-1`: every device splits the batch) and shardings, dense and Pallas attention. "
        f"**All figures are compiler estimates** from XLA's memory and cost analysis of the "
        f"compiled programs, not measurements on a TPU.",
        f"* Compiled with jax {seen('jax')}, libtpu {seen('libtpu')}, at commit "
        f"{seen('commit')}, on {dates}.",
        f"* Each cell: `bB: memory, FLOPs` at B = {START_BATCH} examples per device (the "
        f"reference's batch) and, marked **max**, at the largest power-of-two batch per device "
        f"that fits, up to {args.max_batch} (`(cap)` when the cap stopped it): compiled at "
        f"{START_BATCH}, then at a first guess (the largest batch of the same chip in another "
        f"slice; else what another chip's memory growth per example allows; else "
        f"{START_BATCH * 2}, then the batch the line through the memory so far predicts), then "
        f"bisected over powers of two until a batch fits and its double does not (or halved "
        f"below {START_BATCH}); a program the compiler refuses counts as not fitting. "
        f"Memory: GiB per chip, the larger of the train and eval "
        f"steps (arguments + outputs not aliased to donated arguments + temporaries + code); ✗: "
        f"more than the chip's HBM. FLOPs: per chip and train step as XLA counts them; Pallas "
        f"kernels are opaque to XLA, so Pallas FLOPs leave out attention.",
        f"* tokens/s (at **max**) is a **projection**, not a measurement: the tokens each chip "
        f"trains per step over the time the step's FLOPs take at {UTILISATION:.0%} of the "
        f"chip's bf16 peak. †: a Pallas cell's projection uses the dense step's FLOPs at the "
        f"same batch (the dense step is compiled at that batch for it); ‡: where the dense "
        f"step has no compile at that batch (Pallas fits a batch dense does not), the dense "
        f"FLOPs extrapolated along the line through the two nearest compiled dense batches (an "
        f"estimate: XLA's count is close to, not exactly, linear in the batch, and grows where "
        f"the compiler recomputes activations to fit).",
        "* —: not measured (no compile of it in the cache); `search unfinished`: the cache "
        "holds only the search's first batches.",
        "HBM and dense bf16 peak per chip (`TPU_CHIPS` in guided_jax/train/lowering.py, as Cloud "
        "TPU documents them):",
    ]
    chips = ["| generation | HBM | bf16 peak |", "|---|---|---|"] + [
        f"| {generation} | {hbm:g} GiB | {peak / 1e12:g} TFLOP/s |"
        for generation, (hbm, peak) in TPU_CHIPS.items()
    ]
    regenerate = (
        f"Regenerate it with the command below. Each compile is cached in `{cache_name}/` (one "
        f"JSON file per preset, slice, attention and batch), so a run can stop and resume, and "
        f"the grid can be measured over several invocations with `--presets`, `--topologies` "
        f"and `--attentions`, or at once on a many-core host with `--jobs N` (N compiles in "
        f"worker processes; each keeps about 1.5 cores and 4-14 GiB of memory busy):"
    )
    parts = [
        "# What fits on which TPU slice",
        textwrap.fill(intro[0], **WRAP),
        "\n".join(textwrap.fill(item, subsequent_indent="  ", **WRAP) for item in intro[1:-1]),
        textwrap.fill(intro[-1], **WRAP),
        "\n".join(chips),
        textwrap.fill(regenerate, **WRAP),
        f"    {command}",
        *tables,
    ]
    if failures:
        parts.append("Not measured because of an error in the last run:")
        parts.append("\n".join(f"* {failure}" for failure in failures))
    text = "\n\n".join(part.rstrip("\n") for part in parts) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


# ----------------------------------------------------------------------------- command line


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--presets", type=_list, default=list(PRESETS),
        help="configs/reference.py presets, or config specs such as configs/tiny.py (comma "
        "separated; default: every reference preset)",
    )  # fmt: skip
    parser.add_argument(
        "--topologies", type=_list, default=list(TOPOLOGIES),
        help="TPU slices (v5e:2x2) or gcloud accelerator types (v5litepod-4), comma separated",
    )  # fmt: skip
    parser.add_argument(
        "--attentions", type=_list, default=list(ATTENTIONS),
        help="dense and/or pallas (pallas also compiles dense at its largest batch, for FLOPs)",
    )  # fmt: skip
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "docs" / "TPU.md")
    parser.add_argument(
        "--cache", type=pathlib.Path, default=DEFAULT_CACHE,
        help="directory of one JSON file per compile (preset, slice, attention, batch)",
    )  # fmt: skip
    parser.add_argument(
        "--max_batch", type=int, default=DEFAULT_MAX_BATCH,
        help="largest batch per device the search tries (a power of two)",
    )  # fmt: skip
    parser.add_argument(
        "--block_size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help="tokens per example (0: the config's own)",
    )
    parser.add_argument(
        "--no_compile", action="store_true", help="only rewrite --out from the cache"
    )
    parser.add_argument(
        "--jobs", type=int, default=1,
        help="cells compiled at once, each in its own process (a compile keeps about 1.5 "
        "cores and 4-14 GiB of memory busy: cores / 2 on a large host)",
    )  # fmt: skip
    parser.add_argument("--job", help=argparse.SUPPRESS)  # one job, in a worker process
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.max_batch < 1 or args.max_batch & (args.max_batch - 1):
        parser.error(f"--max_batch must be a power of two, got {args.max_batch}")
    if unknown := sorted(set(args.attentions) - set(ATTENTIONS)):
        parser.error(f"--attentions: unknown {unknown}, expected {list(ATTENTIONS)}")
    if unknown := [p for p in args.presets if ".py" not in p and p not in PRESETS]:
        parser.error(f"--presets: unknown {unknown}, expected {list(PRESETS)} or a config file")
    try:
        args.topologies = [topology_name(t) for t in args.topologies]
    except ValueError as error:
        parser.error(str(error))
    return args


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work: a cell's batch search, or one batch of it (the fsdp comparison)."""

    cell: Cell
    batch: int = 0  # 0: search the largest batch that fits

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, fields: dict) -> Job:
        return cls(Cell(**fields["cell"]), fields["batch"])

    @property
    def label(self) -> str:
        cell = self.cell
        sharded = f", fsdp {cell.fsdp}" if cell.fsdp != 1 else ""
        return f"{cell.preset} on {cell.topology}, {cell.attention}{sharded}"


def jobs(args: argparse.Namespace) -> list[Job]:
    """What the flags ask for, dense before Pallas (Pallas cells' tokens/s use dense FLOPs)."""
    todo = [
        Job(Cell(preset, topology, attention, args.block_size))
        for preset in args.presets
        for topology in args.topologies
        for attention in sorted(args.attentions, key=lambda a: a != "dense")
    ]
    if FSDP_TOPOLOGY in args.topologies and "dense" in args.attentions:
        todo += [
            Job(Cell(preset, FSDP_TOPOLOGY, "dense", args.block_size, size), START_BATCH)
            for preset in FSDP_PRESETS
            if preset in args.presets
            for size in FSDP_SIZES
        ]
    return todo


def run_job(job: Job, cache: pathlib.Path, max_batch: int) -> str | None:
    """Compiles what the cache lacks for ``job``; the failure (a bug, not a verdict: nothing
    is cached for it), or None."""
    code_commit()  # the code this process imported at its start
    try:
        if job.batch:
            measured(job.cell, cache)(job.batch)
        else:
            guess = guess_for(job.cell, cache, max_batch)
            found = search(measured(job.cell, cache), max_batch, guess)
            if job.cell.attention != "dense" and found.best is not None:
                # The projection's FLOPs: XLA counts none inside Pallas kernels.
                dense = dataclasses.replace(job.cell, attention="dense")
                measured(dense, cache)(found.best)
    except Exception as error:
        first = (str(error).splitlines() or [""])[0]
        return f"{job.label}: {type(error).__name__}: {first}"
    return None


def run_in_child(job: Job, args: argparse.Namespace) -> str | None:
    """:func:`run_job` in a Python process of its own: a worker the system kills, for memory
    say, fails its own job only, and each job's compiles start from a fresh heap. Its progress
    lines pass through; its failure is its last line."""
    command = [
        sys.executable, str(pathlib.Path(__file__).resolve()), "--job", json.dumps(job.to_json()),
        f"--cache={args.cache}", f"--max_batch={args.max_batch}",
    ]  # fmt: skip
    child = subprocess.run(command, stdout=None, stderr=subprocess.PIPE, text=True)
    if child.returncode == 0:
        return None
    if child.returncode < 0:
        killer = signal.Signals(-child.returncode).name
        return (
            f"{job.label}: worker process killed by {killer} (out of memory, say: fewer "
            "--jobs leave each compile more); its finished compiles are cached"
        )
    lines = [line for line in child.stderr.splitlines() if line.strip()]
    return (lines or [f"{job.label}: worker process exited with {child.returncode}"])[-1]


def run_jobs(todo: Sequence[Job], args: argparse.Namespace) -> Iterator[str | None]:
    """Each job's outcome as it ends: in this process, or ``--jobs`` at a time in worker
    processes (each compile is its own XLA:TPU program; they share nothing but the cache)."""
    if args.jobs == 1:
        yield from (run_job(job, args.cache, args.max_batch) for job in todo)
        return
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as workers:
        running = [workers.submit(run_in_child, job, args) for job in todo]
        for future in concurrent.futures.as_completed(running):
            yield future.result()


def main(argv: Sequence[str] | None = None) -> int:
    """Measures what the cache lacks, cell by cell, rewriting the table after each; 1 if a
    cell failed other than by not fitting."""
    args = parse(argv)
    if args.job:  # a worker of run_in_child
        failure = run_job(Job.from_json(json.loads(args.job)), args.cache, args.max_batch)
        if failure is not None:
            print(failure, file=sys.stderr)
        return 1 if failure else 0
    failures: list[str] = []
    if not args.no_compile:
        for failure in run_jobs(jobs(args), args):
            if failure is not None:
                failures.append(failure)
                print(f"error: {failure}", file=sys.stderr, flush=True)
            write_table(args, failures)
    write_table(args, failures)
    print(f"wrote {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
