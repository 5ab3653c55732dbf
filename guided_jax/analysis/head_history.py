"""Head diagnostics over a run: the ``diag/...`` records of ``metrics.jsonl`` (written with
``train.diagnostics``; see :mod:`guided_jax.guidance.stats`) as layers x heads heat maps of
target mass and entropy at steps spread over training."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from etils import epath
from matplotlib.figure import Figure

from guided_jax.analysis import figures


def history(records: Sequence[dict], quantity: str) -> tuple[list[int], np.ndarray]:
    """Steps and ``[T, L, H]`` values of ``diag/<quantity>/...`` in ``records`` (NaN where a
    head has none, e.g. ``closest`` of a guided head)."""
    prefix = f"diag/{quantity}/"
    logged = [r for r in records if any(k.startswith("diag/mass/") for k in r)]
    if not logged:
        return [], np.zeros((0, 0, 0))
    cells = [k[len("diag/mass/") :] for k in logged[-1] if k.startswith("diag/mass/")]
    layers = 1 + max(int(c[1:].split("H")[0]) for c in cells)
    heads = 1 + max(int(c.split("H")[1]) for c in cells)
    values = np.full((len(logged), layers, heads), np.nan)
    for t, record in enumerate(logged):
        for key, value in record.items():
            if key.startswith(prefix) and value is not None:
                layer, head = key[len(prefix) + 1 :].split("H")
                values[t, int(layer), int(head)] = value
    return [int(r["step"]) for r in logged], values


def plot_history(
    records: Sequence[dict], path: str | os.PathLike, *, panels: int = 6, title: str = ""
) -> epath.Path:
    """Layers x heads heat maps of ``mass`` (top row) and ``entropy`` (bottom row) at up to
    ``panels`` logged steps spread over the run, saved as a PNG."""
    steps, mass = history(records, "mass")
    if not steps:
        raise ValueError(
            "the metrics hold no diagnostics (diag/...); train with --config.train.diagnostics=true"
        )
    _, entropy = history(records, "entropy")
    spread = np.linspace(0, len(steps) - 1, min(max(panels, 1), len(steps)))
    chosen = sorted(set(spread.round().astype(int).tolist()))
    layers, heads = mass.shape[1:]
    figure = Figure(
        figsize=(1.0 + 0.25 * heads * len(chosen), 1.2 + 0.5 * layers), layout="constrained"
    )
    axes = figure.subplots(2, len(chosen), squeeze=False)
    top = max(float(np.nanmax(entropy)), 1e-6)
    for column, t in enumerate(chosen):
        for row, (name, values, vmax, cmap) in enumerate(
            [("mass", mass, 1.0, "viridis"), ("entropy", entropy, top, "magma")]
        ):
            ax = axes[row][column]
            image = ax.imshow(values[t], cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto")
            ax.set_xticks(range(heads), [str(h) for h in range(heads)], fontsize=5)
            ax.set_yticks(range(layers), [str(i) for i in range(layers)], fontsize=5)
            ax.set_title(f"{name}, step {steps[t]}", fontsize=7)
            if column == 0:
                ax.set_ylabel("layer", fontsize=7)
            if row == 1:
                ax.set_xlabel("head", fontsize=7)
            if column == len(chosen) - 1:
                figure.colorbar(image, ax=ax, shrink=0.8)
    return figures.save(figure, path, title)
