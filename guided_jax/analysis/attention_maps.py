"""Attention maps of a checkpoint for one sentence, drawn as a layers x heads grid (as in the
AG paper's Fig. 1), so one can see whether guided heads attend to their patterns.

Columns of guided heads are titled with their pattern (from the run's ``guidance.heads``).
Uses matplotlib's object API (a ``Figure`` rendered by Agg), so no display is needed.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from matplotlib.figure import Figure

from guided_jax import weights
from guided_jax.analysis import figures
from guided_jax.config.resolve import head_spec
from guided_jax.data.tokenizer import Tokenizer
from guided_jax.guidance import HeadSpec
from guided_jax.model import EncoderForMLM
from guided_jax.storage import as_path

# Tick labels are drawn only for sentences this short; longer ones would be unreadable.
_MAX_LABELLED_TOKENS = 24


def encode_sentence(tokenizer: Tokenizer, text: str, max_tokens: int) -> list[int]:
    """``<s> text </s>`` (or ``[CLS] text [SEP]``), cut to ``max_tokens`` ids."""
    if not text.strip():
        raise ValueError("--text is empty; give a sentence to draw the attention of")
    if max_tokens < 3:
        raise ValueError(f"--max_tokens must be at least 3, got {max_tokens}")
    body = tokenizer.encode_batch([text])[0][: max_tokens - 2]
    return [tokenizer.bos_id, *body, tokenizer.eos_id]


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """A short printable label for each id (BPE's leading-space marker dropped)."""
    return [tokenizer.decode([i]).strip() or "␣" for i in ids]


def attention_maps(model: EncoderForMLM, ids: list[int]) -> np.ndarray:
    """Every layer's attention probabilities for one sequence: ``[layers, heads, n, n]``."""
    if len(ids) > model.config.max_block_size:
        ids = ids[: model.config.max_block_size]
    _, aux = model(jnp.asarray([ids], jnp.int32), return_attentions=True)
    return np.stack([np.asarray(a[0], np.float32) for a in aux["attentions"]])


def head_titles(config: ml_collections.ConfigDict | None, num_heads: int) -> list[str]:
    """``head h`` plus the pattern it is guided to, when the run's config names one."""
    titles = [f"head {h}" for h in range(num_heads)]
    if config is None:
        return titles
    spec = head_spec(config) if config.guidance.heads.strip() else None
    if not isinstance(spec, HeadSpec):  # none, or per-layer heads (no one title per column)
        return titles
    for group, (start, stop) in zip(spec.groups, spec.head_ranges, strict=True):
        for h in range(start, min(stop, num_heads)):
            titles[h] += f"\n→ {group.name}"
    return titles


def plot_attention_grid(
    maps: np.ndarray,
    tokens: list[str],
    path: str | os.PathLike,
    *,
    title: str = "",
    head_names: list[str] | None = None,
) -> epath.Path:
    """Draws ``maps`` ``[layers, heads, n, n]`` (rows: query tokens, columns: keys) as a grid
    of heat maps, one row per layer, and saves it as a PNG."""
    layers, heads, n, _ = maps.shape
    size = 1.5 if n <= _MAX_LABELLED_TOKENS else 1.2
    figure = Figure(figsize=(0.6 + size * heads, 0.5 + size * layers), layout="constrained")
    axes = figure.subplots(layers, heads, squeeze=False)
    names = head_names or [f"head {h}" for h in range(heads)]
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer][head]
            ax.imshow(maps[layer, head], cmap="viridis", vmin=0.0)  # per-map colour scale
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(names[head], fontsize=7)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=7)
    if n <= _MAX_LABELLED_TOKENS and layers * heads <= 64:
        bottom = axes[layers - 1][0]
        bottom.set_xticks(range(n), tokens, rotation=90, fontsize=4)
        bottom.set_yticks(range(n), tokens, fontsize=4)
    return figures.save(figure, path, title)


def draw(
    source: str | os.PathLike,
    text: str,
    out: str | os.PathLike | None = None,
    *,
    step: int | None = None,
    max_tokens: int = 32,
    title: str | None = None,
) -> epath.Path:
    """Loads ``source`` (a workdir's checkpoint ``step``, or a HuggingFace directory), draws its
    attention for ``text`` and returns the PNG's path (default ``SOURCE/attention_stepN.png``)."""
    loaded = weights.load(source, step)
    ids = encode_sentence(loaded.tokenizer, text, max_tokens)
    maps = attention_maps(loaded.model, ids)
    name = f"attention_step{loaded.step}.png" if loaded.step is not None else "attention.png"
    where = "" if loaded.step is None else f", step {loaded.step}"
    return plot_attention_grid(
        maps,
        token_labels(loaded.tokenizer, ids),
        out or as_path(source) / name,
        title=title if title is not None else f"{as_path(source).name}{where}",
        head_names=head_titles(loaded.run_config, maps.shape[1]),
    )
