"""Metrics of a run: ``WORKDIR/metrics.jsonl`` (one object per logged step), TensorBoard event
files under ``WORKDIR/tensorboard``, and the one-step-late log that feeds them from the loop.
Both go to a ``gs://`` workdir too (tensorboardX writes event files there itself)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from tensorboardX import SummaryWriter
from tqdm import tqdm

from guided_jax import sharding
from guided_jax.storage import as_path, is_remote


class MetricsWriter:
    """Adds records to both outputs. On resume it drops records past the restored step,
    which the resumed run writes again (TensorBoard is told to purge them too).

    A local metrics.jsonl is appended to; an object (``gs://``) cannot be, so there the writer
    keeps the lines and rewrites the whole object with each record."""

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0, enabled: bool = True):
        self.path = as_path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._events: SummaryWriter | None = None
        self._lines: list[str] | None = [] if is_remote(workdir) else None
        if not enabled:
            return
        restarting = self.path.exists()  # a previous attempt of this run wrote records
        if restarting:
            kept = [r for r in _parse(self.path.read_text()) if r["step"] <= resume_step]
            lines = [json.dumps(r) + "\n" for r in kept]
            self.path.write_text("".join(lines))
            if self._lines is not None:
                self._lines = lines
        self._events = SummaryWriter(  # one file per process start: names carry the pid
            str(as_path(workdir) / "tensorboard"),
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
        line = json.dumps(clean) + "\n"
        if self._lines is None:
            with self.path.open("a") as f:
                f.write(line)
        else:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
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
    return _parse((as_path(workdir) / "metrics.jsonl").read_text())


def summary(last: Mapping[str, float]) -> str:
    """The closing line of a run: its last logged step and scalars (the per-head diagnostics,
    one value per layer and head, stay in metrics.jsonl)."""
    shown = {k: v for k, v in last.items() if k != "step" and not k.startswith("diag/")}
    return f"finished at step {last['step']}: " + " ".join(f"{k}={v:.4g}" for k, v in shown.items())


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
    """Raises FloatingPointError when a loss or the gradient norm is not finite."""
    values = {k: float(v) for k, v in metrics.items()}
    bad = [
        k
        for k in ("loss", "mlm_loss", "ag_loss", "grad_norm")
        if k in values and not math.isfinite(values[k])
    ]
    if bad:
        shown = ", ".join(f"{k}={values[k]}" for k in bad)
        raise FloatingPointError(
            f"non-finite {shown} at step {step}; stopping without saving "
            f"(the last checkpoint is the last good state)"
        )


class MetricsLog:
    """The training loop's log, one step late: a step's device metrics are fetched only after
    the next step was dispatched, so the host never waits for the device to log.

    It owns the writer, the progress bar (with the latest losses), the clock behind
    ``tokens_per_sec`` (which leaves out compilation and eval time) and the pending record."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        start: int,
        total: int,
        tokens_per_step: int,
        enabled: bool = True,
    ):
        self.writer = MetricsWriter(workdir, resume_step=start, enabled=enabled)
        self.bar = tqdm(
            total=total,
            initial=start,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not enabled,
        )
        self.tokens_per_step = tokens_per_step
        self.last: dict[str, float] = {}  # the latest record written
        self._pending: tuple[int, Any, dict[str, float]] | None = None
        self._clock_time, self._clock_step = time.perf_counter(), start

    def restart_clock(self, step: int) -> None:
        """Throughput counts from here (e.g. after the first step, which compiles)."""
        self._clock_time, self._clock_step = time.perf_counter(), step

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation) is not part of the training throughput."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._clock_time += time.perf_counter() - start

    def defer(self, step: int, device_metrics: Any, extra: Mapping[str, float]) -> None:
        """Queues the record of ``step``: device metrics (or None) and host values."""
        self._pending = (step, device_metrics, dict(extra))

    def flush(self) -> None:
        """Writes the queued record, if any (checking that its losses are finite)."""
        if self._pending is None:
            return
        step, device_metrics, extra = self._pending
        self._pending = None
        record: dict[str, float] = {"step": step}
        if device_metrics is not None:
            host = {k: float(v) for k, v in sharding.to_host(device_metrics).items()}
            check_finite(host, step)
            now = time.perf_counter()
            elapsed = max(now - self._clock_time, 1e-9)
            host["tokens_per_sec"] = (step - self._clock_step) * self.tokens_per_step / elapsed
            self._clock_time, self._clock_step = now, step
            record.update(host)
        record.update(extra)
        self.writer.write(record)
        self.last.update(record)
        shown = ("mlm_loss", "ag_loss", "eval_mlm_loss")
        self.bar.set_postfix({k: f"{record[k]:.4g}" for k in shown if k in record})

    def close(self) -> None:
        self.bar.close()
        self.writer.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
