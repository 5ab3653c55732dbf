"""PNG figures with matplotlib's object API (a ``Figure`` rendered by Agg): no display, no global
pyplot state, the same resolution for every plot of the project."""

from __future__ import annotations

import io
import os

from etils import epath
from matplotlib.figure import Figure

from guided_jax.storage import as_path, is_remote

DPI = 110


def save(figure: Figure, path: str | os.PathLike, title: str = "") -> epath.Path:
    """Writes ``figure`` (with ``title`` on top, if any) to the PNG ``path`` (local, creating
    its folder, or ``gs://``); returns the path."""
    if title:
        figure.suptitle(title, fontsize=9)
    path = as_path(path)
    if not is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=DPI)
    path.write_bytes(png.getvalue())
    return path
