"""AG against the plain MLM baseline in one command: both arms trained with identical data,
seeds and steps, then ``WORKDIR/report.md`` with a table and plots.

    python -m guided_jax.reproduce --config configs/default.py --workdir runs/compare \
        --config.train.steps=1500 [--finetune_config configs/finetune.py \
        --finetune_config.data.train_file=hate_speech.csv ...]

The arms differ in ``guidance.enabled`` only (``WORKDIR/baseline``, ``WORKDIR/ag``; the
baseline still measures the AG loss at eval). Both keep the checkpoint at 1% of training, so
the report can draw Fig. 1-style attention grids of each model at 0% (the seeded init, the
same for both), 1% and 100%. Every number in the report is read back from the arms'
``metrics.jsonl`` (and the fine-tuning results), also written to ``WORKDIR/report.json``.
Rerunning resumes unfinished arms and rewrites the report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from etils import epath
from matplotlib.figure import Figure

from guided_jax.analysis import attention_maps, figures
from guided_jax.analysis import finetune as finetune_module
from guided_jax.config.checks import step_at_fraction
from guided_jax.storage import as_path, check_location
from guided_jax.train.loop import train_and_evaluate
from guided_jax.train.metrics import read_metrics
from guided_jax.weights.workdir import read_run_config

ARMS = ("baseline", "ag")  # guidance.enabled false / true
LABELS = {"baseline": "baseline (MLM)", "ag": "AG (MLM + guidance)"}
FRACTIONS = (0.0, 0.01, 1.0)  # of training, for the attention grids
DEFAULT_TEXT = "The cat sat on the mat because it was tired."


def snapshot_steps(total: int, fractions: Sequence[float] = FRACTIONS) -> dict[float, int]:
    """The step at each fraction of ``total`` training steps (1% is at least step 1), as
    ``train.keep_steps`` percentages resolve."""
    return {f: 0 if f == 0 else step_at_fraction(f, total) for f in fractions}


def arm_config(config: ml_collections.ConfigDict, arm: str) -> ml_collections.ConfigDict:
    """``config`` with guidance on (``ag``) or off (``baseline``); nothing else differs, and
    both keep the checkpoints the report plots."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    arm_cfg = config.copy_and_resolve_references()
    arm_cfg.guidance.enabled = arm == "ag"
    # Percentages: the run resolves them against its own steps, counted from train.epochs
    # when those are set.
    arm_cfg.train.keep_steps = ",".join(f"{f * 100:g}%" for f in FRACTIONS if f > 0)
    return arm_cfg


def train_arms(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    devices: list[jax.Device] | None = None,
) -> None:
    """Trains (or resumes) both arms into ``WORKDIR/baseline`` and ``WORKDIR/ag``."""
    check_location(workdir, "--workdir")
    if not config.guidance.heads.strip():
        raise ValueError("guidance.heads is empty: the AG arm would have nothing to guide")
    for arm in ARMS:
        print(f"--- {LABELS[arm]}: {as_path(workdir) / arm}")
        train_and_evaluate(arm_config(config, arm), as_path(workdir) / arm, devices=devices)


# ----------------------------------------------------------------------------- numbers


@dataclasses.dataclass(frozen=True)
class ArmSummary:
    """The numbers of one arm, read from its metrics file."""

    final_step: int
    final_eval_step: int
    final_eval_mlm_loss: float
    final_eval_ag_loss: float
    final_train_mlm_loss: float
    eval_curve: list[tuple[int, float]]  # (step, eval_mlm_loss)


def summarize_arm(workdir: str | os.PathLike) -> ArmSummary:
    """The last eval and train numbers of a finished arm."""
    records = read_metrics(workdir)
    evals = [r for r in records if r.get("eval_mlm_loss") is not None]
    trains = [r for r in records if r.get("mlm_loss") is not None]
    if not evals or not trains:
        raise ValueError(
            f"{as_path(workdir) / 'metrics.jsonl'} has no eval_mlm_loss or mlm_loss records; the "
            f"report needs train.eval_every > 0 and a held-out split"
        )
    return ArmSummary(
        final_step=records[-1]["step"],
        final_eval_step=evals[-1]["step"],
        final_eval_mlm_loss=evals[-1]["eval_mlm_loss"],
        final_eval_ag_loss=evals[-1]["eval_ag_loss"],
        final_train_mlm_loss=trains[-1]["mlm_loss"],
        eval_curve=[(r["step"], r["eval_mlm_loss"]) for r in evals],
    )


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first eval step whose MLM loss is at most ``target`` (None if none is)."""
    return next((step for step, loss in curve if loss <= target), None)


def summarize(workdir: str | os.PathLike) -> dict[str, Any]:
    """Both arms' numbers and the steps AG needs to reach the baseline's final eval loss."""
    arms = {arm: summarize_arm(as_path(workdir) / arm) for arm in ARMS}
    target = arms["baseline"].final_eval_mlm_loss
    reach = steps_to_reach(arms["ag"].eval_curve, target)
    return {
        "arms": {arm: dataclasses.asdict(s) for arm, s in arms.items()},
        "ag_steps_to_baseline_final": reach,
        "speedup": arms["baseline"].final_eval_step / reach if reach else None,
    }


# ----------------------------------------------------------------------------- plots


def _figure() -> tuple[Figure, Any]:
    figure = Figure(figsize=(6.0, 3.6), layout="constrained")
    return figure, figure.subplots()


def plot_mlm_loss(workdir: epath.Path, path: epath.Path) -> epath.Path:
    """Train (lines) and eval (markers) MLM loss of both arms against the step."""
    figure, ax = _figure()
    for arm, color in zip(ARMS, ("tab:gray", "tab:blue"), strict=True):
        records = read_metrics(workdir / arm)
        train_points = [(r["step"], r["mlm_loss"]) for r in records if "mlm_loss" in r]
        eval_points = [(r["step"], r["eval_mlm_loss"]) for r in records if "eval_mlm_loss" in r]
        if train_points:
            ax.plot(*zip(*train_points, strict=True), color=color, lw=1, label=f"{LABELS[arm]}")
        if eval_points:
            ax.plot(*zip(*eval_points, strict=True), "o--", color=color, ms=4, label="  eval")
    ax.set_xlabel("step")
    ax.set_ylabel("MLM loss (nats)")
    ax.set_title("MLM loss: AG vs baseline")
    ax.legend(fontsize=8)
    return figures.save(figure, path)


def plot_ag_loss(workdir: epath.Path, path: epath.Path) -> epath.Path:
    """The AG arm's training AG loss, and both arms' AG loss at eval (log scale)."""
    figure, ax = _figure()
    ag_records = read_metrics(workdir / "ag")
    points = [(r["step"], r["ag_loss"]) for r in ag_records if r.get("ag_loss")]
    if points:
        ax.plot(*zip(*points, strict=True), color="tab:blue", lw=1, label="AG arm, train")
    for arm, color in zip(ARMS, ("tab:gray", "tab:blue"), strict=True):
        evals = [(r["step"], r.get("eval_ag_loss")) for r in read_metrics(workdir / arm)]
        evals = [(s, v) for s, v in evals if v]  # records without an eval hold None
        if evals:
            ax.plot(*zip(*evals, strict=True), "o--", color=color, ms=4, label=f"{arm}, eval")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("AG loss")
    ax.set_title("Attention-guidance loss (the baseline is only measured)")
    ax.legend(fontsize=8)
    return figures.save(figure, path)


def plot_attention(workdir: epath.Path, text: str, total_steps: int) -> dict[str, dict[str, str]]:
    """Attention grids of both arms at each snapshot: ``{arm: {"0%": file, ...}}``."""
    files: dict[str, dict[str, str]] = {}
    for arm in ARMS:
        files[arm] = {}
        for fraction, step in snapshot_steps(total_steps).items():
            name = f"attention_{arm}_step{step}.png"
            attention_maps.draw(
                workdir / arm,
                text,
                workdir / name,
                step=step,
                title=f"{LABELS[arm]}: step {step} ({fraction:.0%} of training)",
            )
            files[arm][f"{fraction:.0%}"] = name
    return files


# ----------------------------------------------------------------------------- report


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _downstream_rows(finetune: dict[str, Any] | None) -> list[str]:
    """Each arm's chosen rate and mean ± std per metric, and the paired difference AG -
    baseline per seed (the same seeds in both arms); marked when either arm was cut short."""
    if not finetune:
        return []
    task, results = finetune["task"], [finetune[arm] for arm in ARMS]
    doubt = " (not conclusive: cut short)" if _cut_short(finetune) else ""
    rates = [_rate(r) for r in results]
    rows = [f"| {task}: learning rate, chosen on validation per arm | {rates[0]} | {rates[1]} |"]
    for metric in results[0]["metrics"]:
        cells = [f"{_number(m['mean'])} ± {_number(m['std'])}"
                 for m in (r["metrics"][metric] for r in results)]  # fmt: skip
        rows.append(f"| {task}: eval {metric} (mean ± std){doubt} | {cells[0]} | {cells[1]} |")
        paired = paired_difference(results[0], results[1], metric)
        rows.append(
            f"| {task}: eval {metric}, AG - baseline paired by seed (mean ± std over "
            f"{len(paired['values'])}){doubt} | | {_number(paired['mean'])} ± "
            f"{_number(paired['std'])} |"
        )
    return rows


def _rate(results: dict[str, Any]) -> str:
    rate = results.get("learning_rate")
    return "—" if rate is None else f"{rate:g}"


def paired_difference(baseline: dict[str, Any], ag: dict[str, Any], metric: str) -> dict[str, Any]:
    """AG - baseline eval ``metric`` seed by seed, with their mean and sample std."""
    scores = [{r["seed"]: r["eval"][metric] for r in arm["runs"]} for arm in (baseline, ag)]
    if scores[0].keys() != scores[1].keys():
        raise ValueError(f"the arms were fine-tuned with other seeds: {[list(s) for s in scores]}")
    return finetune_module.mean_std([scores[1][seed] - scores[0][seed] for seed in scores[0]])


def _cut_short(finetune: dict[str, Any]) -> list[str]:
    """Each arm's warnings of fine-tuning cut short."""
    return [f"{arm}: {w}" for arm in ARMS for w in finetune[arm].get("warnings", [])]


def plot_validation_curves(finetune: dict[str, Any], path: epath.Path) -> epath.Path:
    """Each arm's validation score per epoch, one line per seed (selected protocol)."""
    figure = Figure(figsize=(8.0, 3.4), layout="constrained")
    axes = figure.subplots(1, len(ARMS), sharey=True)
    for ax, arm in zip(axes, ARMS, strict=True):
        results = finetune[arm]
        metric = results.get("selection_metric") or "loss"
        per_epoch = results.get("steps_per_epoch") or 1
        for run in results["runs"]:
            points = [(h["step"] / per_epoch, h[metric]) for h in run["history"] if metric in h]
            if points:
                ax.plot(*zip(*points, strict=True), "o-", ms=3, label=f"seed {run['seed']}")
        ax.set_title(f"{LABELS[arm]}, lr {_rate(results)}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {metric}")
        ax.legend(fontsize=7)
    return figures.save(figure, path, title=f"Fine-tuning on {finetune['task']}: validation")


def write_report(
    workdir: str | os.PathLike,
    config: ml_collections.ConfigDict,
    *,
    text: str = DEFAULT_TEXT,
    finetune: dict[str, Any] | None = None,
    command: str | None = None,
) -> epath.Path:
    """Reads both arms' metrics and writes ``report.md``, ``report.json`` and the PNGs."""
    workdir = as_path(workdir)
    summary = summarize(workdir)
    arms = summary["arms"]
    total = read_run_config(workdir / ARMS[0]).train.steps  # counted from epochs if set
    mlm_png = plot_mlm_loss(workdir, workdir / "mlm_loss.png").name
    ag_png = plot_ag_loss(workdir, workdir / "ag_loss.png").name
    grids = plot_attention(workdir, text, total)
    reach = summary["ag_steps_to_baseline_final"]
    speed = f" ({summary['speedup']:.2f}x fewer steps)" if summary["speedup"] else ""
    b, a = arms["baseline"], arms["ag"]
    rows = [
        "| | baseline | AG |",
        "|---|---|---|",
        f"| final eval MLM loss (step {b['final_eval_step']} / {a['final_eval_step']}) | "
        f"{_number(b['final_eval_mlm_loss'])} | {_number(a['final_eval_mlm_loss'])} |",
        f"| final train MLM loss | {_number(b['final_train_mlm_loss'])} | "
        f"{_number(a['final_train_mlm_loss'])} |",
        f"| final eval AG loss | {_number(b['final_eval_ag_loss'])} | "
        f"{_number(a['final_eval_ag_loss'])} |",
        f"| steps to reach the baseline's final eval MLM loss | {b['final_eval_step']} | "
        f"{reach if reach is not None else 'not reached'}{speed} |",
        *_downstream_rows(finetune),
    ]
    snapshot_header = " | ".join(grids["baseline"])
    grid_rows = [
        f"| {LABELS[arm]} | "
        + " | ".join(f"![{arm} {k}]({v})" for k, v in grids[arm].items())
        + " |"
        for arm in ARMS
    ]
    guidance = config.guidance
    lines = [
        "# AG vs baseline",
        "",
        f"Both arms trained from one config with identical data, seed ({config.train.seed}) "
        f"and steps ({total}); the AG arm adds the guidance "
        f"loss (heads `{guidance.heads}`, scale {guidance.scale}). Numbers are read from "
        f"`baseline/metrics.jsonl` and `ag/metrics.jsonl`.",
        "",
        *([f"Command: `{command}`", ""] if command else []),
        *rows,
        "",
        f"![MLM loss]({mlm_png})",
        "",
        f"![AG loss]({ag_png})",
        "",
        f'Attention maps for "{text}" (rows: layers, columns: heads; guided heads are titled '
        "with their pattern):",
        "",
        f"| | {snapshot_header} |",
        "|---|" + "---|" * len(grids["baseline"]),
        *grid_rows,
        "",
    ]
    if finetune:
        curves = plot_validation_curves(finetune, workdir / "finetune_validation.png").name
        lines += [
            f"Fine-tuning ({finetune['task']}): {finetune['seeds']} seeds each, the same seeds "
            f"and learning-rate candidates for both arms, each arm's rate chosen on its own "
            f"validation; scores on the eval split; per-seed results in `finetune_baseline/` "
            f"and `finetune_ag/`.",
            "",
            f"![fine-tuning validation]({curves})",
            "",
        ]
        warnings = _cut_short(finetune)
        if warnings:
            lines += [
                "**Not conclusive**: fine-tuning was still improving when it ended, so the "
                "downstream rows may rank under-trained models:",
                "",
                *[f"- {w}" for w in warnings],
                "",
            ]
    report = workdir / "report.md"
    report.write_text("\n".join(lines))
    summary.update(plots={"mlm_loss": mlm_png, "ag_loss": ag_png, "attention": grids})
    if finetune:
        summary["finetune"] = finetune
        summary["plots"]["finetune_validation"] = curves
        summary["finetune_conclusive"] = not _cut_short(finetune)
    (workdir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    return report


def finetune_arms(
    workdir: str | os.PathLike, finetune_config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """Fine-tunes each arm's final checkpoint on the same task with the same seeds."""
    results: dict[str, Any] = {}
    for arm in ARMS:
        out = as_path(workdir) / f"finetune_{arm}"
        results[arm] = finetune_module.run(finetune_config, as_path(workdir) / arm, out)
    results["task"] = results["ag"]["task"]
    results["seeds"] = len(results["ag"]["runs"])
    return results


def reproduce(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    text: str = DEFAULT_TEXT,
    finetune_config: ml_collections.ConfigDict | None = None,
    devices: list[jax.Device] | None = None,
    command: str | None = None,
) -> epath.Path:
    """Trains both arms, fine-tunes them if a task is given, and writes the report."""
    train_arms(config, workdir, devices=devices)
    finetune = finetune_arms(workdir, finetune_config) if finetune_config is not None else None
    return write_report(workdir, config, text=text, finetune=finetune, command=command)
