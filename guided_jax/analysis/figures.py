"""PNG figures with matplotlib's object API (a ``Figure`` rendered by Agg): no display, no global
pyplot state, the same resolution for every plot of the project."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

DPI = 110


def save(figure: Figure, path: str | os.PathLike, title: str = "") -> Path:
    """Writes ``figure`` (with ``title`` on top, if any) to the PNG ``path``, creating its
    folder; returns the path."""
    if title:
        figure.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path
