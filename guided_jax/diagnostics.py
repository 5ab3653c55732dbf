"""What each attention head does while training: per guided head, the attention mass on its
target; per unguided head, the built-in pattern it is closest to; per head, its entropy.

On log steps the training loop (``train.diagnostics=True``) calls the jitted function of
:func:`make_diagnostics_step` with the step's parameters and batch; its scalars join the step's
record in ``metrics.jsonl`` and TensorBoard:

* ``diag/mass/L{l}H{h}``: mean over real query rows that have a target of the attention on the
  head's target keys (guided heads), or on the closest built-in pattern's (unguided heads);
* ``diag/closest/L{l}H{h}``: that pattern's index in :data:`BUILTIN` (unguided heads only);
* ``diag/entropy/L{l}H{h}``: mean attention entropy of a real query row, in nats.

Cost model: one deterministic forward pass of the batch (no dropout, no MLM head: its logits are
unused and XLA drops them) that returns every layer's ``[B, H, n, n]`` maps, plus ``O(L·H·B·n²)``
elementwise reductions: about a third of a training step (forward + backward + update), paid
once every ``train.log_every`` steps, so ≈ 0.35 / log_every of the training time (0.7% at the
reference's 50). The training step itself is compiled without it and costs the same.

    python -m guided_jax.diagnostics --workdir runs/x   # heat maps over time: runs/x/heads.png
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.figure import Figure

from guided_jax import documents
from guided_jax.guidance import Guide, PatternGroup, Spec, target_predicate, token_masks
from guided_jax.metrics import read_metrics

# Built-in patterns an unguided head is compared with, in code order.
BUILTIN = ("self", "next", "prev", "first")
QUANTITIES = ("mass", "entropy", "closest")


def _pattern_mask(group: Any, n: int, masks: jax.Array | None) -> jax.Array:
    """``[B or 1, n, n]`` bool: where the target of ``group`` is nonzero."""
    target = target_predicate(group, n, masks)
    if target.ndim == 4:  # a token set: [B, 1, 1, n], the same keys for every row
        return jnp.broadcast_to(target[:, 0], (target.shape[0], n, n))
    return target[None]


def _row_mass(probs: jax.Array, on: jax.Array, query_mask: jax.Array) -> jax.Array:
    """Mean over batch and real rows that have a target of ``Σ_{on} A``: ``probs``
    ``[B, k, n, n]``, ``on`` ``[B or 1, n, n]`` → ``[k]``."""
    mass = jnp.sum(jnp.where(on[:, None], probs, 0.0), axis=-1)  # [B, k, n]
    rows = (jnp.any(on, axis=-1) & query_mask).astype(jnp.float32)[:, None]  # [B, 1, n]
    rows = jnp.broadcast_to(rows, mass.shape)
    return jnp.sum(mass * rows, axis=(0, 2)) / jnp.maximum(jnp.sum(rows, axis=(0, 2)), 1.0)


def head_diagnostics(
    attentions: Sequence[jax.Array],
    spec: Spec | None,
    query_mask: jax.Array,
    masks: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """``mass``, ``entropy`` (float ``[L, H]``) and ``closest`` (int ``[L, H]``, -1 for guided
    heads) of every layer's post-softmax maps ``[B, H, n, n]``. ``query_mask`` ``[B, n]`` marks
    the real tokens; ``masks`` are the spec's token masks (:func:`~guided_jax.guidance.token_masks`)
    when it has token-set groups."""
    guide = None if spec is None else Guide(spec, masks)
    query = query_mask.astype(bool)
    real_rows = jnp.maximum(jnp.sum(query.astype(jnp.float32)), 1.0)
    mass, entropy, closest = [], [], []
    for layer, probs in enumerate(attentions):
        probs = probs.astype(jnp.float32)
        n, heads = probs.shape[-1], probs.shape[1]
        plogp = jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0)
        row_entropy = -jnp.sum(plogp, axis=-1)  # [B, H, n]
        entropy.append(jnp.sum(row_entropy * query[:, None], axis=(0, 2)) / real_rows)
        builtin = jnp.stack(
            [_row_mass(probs, _pattern_mask(PatternGroup(p, 1), n, None), query) for p in BUILTIN]
        )  # [4, H]
        best = jnp.argmax(builtin, axis=0).astype(jnp.int32)
        layer_mass = jnp.max(builtin, axis=0)
        layer_closest = best
        layer_guide = None if guide is None else guide.for_layer(layer)
        if layer_guide is not None:
            token_index = 0
            guided = np.zeros(heads, bool)
            for group, (lo, hi) in zip(
                layer_guide.spec.groups, layer_guide.spec.head_ranges, strict=True
            ):
                group_masks = None
                if group.pattern == "token":
                    group_masks = layer_guide.masks[token_index]
                    token_index += 1
                on = _pattern_mask(group, n, group_masks)
                layer_mass = layer_mass.at[lo:hi].set(_row_mass(probs[:, lo:hi], on, query))
                guided[lo:hi] = True
            layer_closest = jnp.where(guided, -1, best)
        mass.append(layer_mass)
        closest.append(layer_closest)
    return {
        "mass": jnp.stack(mass),
        "entropy": jnp.stack(entropy),
        "closest": jnp.stack(closest),
    }


def flat_metrics(values: dict[str, jax.Array], spec: Spec | None = None) -> dict[str, jax.Array]:
    """``diag/<quantity>/L{l}H{h}`` scalars; ``closest`` only for unguided heads."""
    layers, heads = values["mass"].shape
    out = {}
    for layer in range(layers):
        layer_spec = None if spec is None else spec.for_layer(layer)
        guided = 0 if layer_spec is None else layer_spec.num_guided_heads
        for head in range(heads):
            where = f"L{layer}H{head}"
            out[f"diag/mass/{where}"] = values["mass"][layer, head]
            out[f"diag/entropy/{where}"] = values["entropy"][layer, head]
            if head >= guided:
                out[f"diag/closest/{where}"] = values["closest"][layer, head]
    return out


def make_diagnostics_step(
    exp: Any, graphdef: nnx.GraphDef
) -> Callable[[nnx.State, jax.Array], dict[str, jax.Array]]:
    """``(params, batch) -> {diag/...: scalar}`` for ``jax.jit`` (see the module docstring for
    what it computes and costs). ``exp`` is the run's :class:`~guided_jax.experiment.Experiment`
    (its spec may be None: a baseline's heads are all compared with the built-in patterns)."""
    spec = exp.spec
    pad_id = exp.model.pad_token_id

    def diagnostics_step(params: nnx.State, batch: jax.Array) -> dict[str, jax.Array]:
        model = nnx.merge(graphdef, params)
        batch, segment_ids = documents.split_batch(batch)  # [B, 2, n]: data.document_masks
        attend = batch != pad_id
        _, aux = model(
            batch, attention_mask=attend, return_attentions=True, segment_ids=segment_ids
        )
        masks = token_masks(batch, exp.token_ids) if exp.token_ids else None
        values = head_diagnostics(aux["attentions"], spec, attend, masks)
        return flat_metrics(values, spec)

    return diagnostics_step


# ----------------------------------------------------------------------------- heat maps


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
) -> Path:
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
    if title:
        figure.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def main(argv: list[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    values = flags.FLAGS
    workdir = Path(values.workdir)
    try:
        if not (workdir / "metrics.jsonl").is_file():
            raise FileNotFoundError(f"{str(workdir / 'metrics.jsonl')!r} does not exist")
        out = values.out or workdir / "heads.png"
        path = plot_history(read_metrics(workdir), out, panels=values.panels, title=workdir.name)
    except (ValueError, OSError) as error:
        sys.exit(f"guided_jax.diagnostics: error: {error}")
    print(f"wrote {path}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "Pretraining workdir trained with train.diagnostics.")
    flags.DEFINE_string("out", None, "PNG to write (default: WORKDIR/heads.png).")
    flags.DEFINE_integer("panels", 6, "How many logged steps to draw.")
    flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
