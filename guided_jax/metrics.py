"""Metrics of a run: ``WORKDIR/metrics.jsonl`` (one object per logged step) and TensorBoard
event files under ``WORKDIR/tensorboard``."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from tensorboardX import SummaryWriter


class MetricsWriter:
    """Appends records to both outputs. On resume it drops records past the restored step,
    which the resumed run writes again (TensorBoard is told to purge them too)."""

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0, enabled: bool = True):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._events: SummaryWriter | None = None
        if not enabled:
            return
        restarting = self.path.exists()  # a previous attempt of this run wrote records
        if restarting:
            kept = [r for r in _parse(self.path.read_text()) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._events = SummaryWriter(  # one file per process start: names carry the pid
            str(Path(workdir) / "tensorboard"),
            purge_step=resume_step + 1 if restarting else None,
            filename_suffix=f".{os.getpid()}",
        )

    def write(self, record: Mapping[str, float | int]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        for key, value in record.items():
            if key != "step" and self._events is not None:
                self._events.add_scalar(key, value, global_step=int(record["step"]))

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _parse(text: str) -> list[dict]:
    """Records of a metrics file; a last line cut short by a crash (``kill -9``) is dropped."""
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for index, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if index == len(lines) - 1:
                break
            raise
    return records


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """All records of a run, in order."""
    return _parse((Path(workdir) / "metrics.jsonl").read_text())
