"""Append-only JSONL metrics, one object per logged step."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path


class MetricsWriter:
    """Writes ``WORKDIR/metrics.jsonl``; on resume drops records past the restored step, which
    the resumed run writes again."""

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0, enabled: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: Mapping[str, float | int]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """All records of a run, in order."""
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
