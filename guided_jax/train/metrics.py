"""Metrics of a run: its records (one JSON object per logged step), TensorBoard event files
under ``WORKDIR/tensorboard``, and the one-step-late log that feeds them from the loop.

A local workdir appends the records to ``WORKDIR/metrics.jsonl``. An object (``gs://``) cannot
be appended to, and rewriting it whole at every log step makes a run upload the square of its
history, so there a background thread stores the records written since its last store as the
next numbered object ``WORKDIR/metrics/segment-NNNNNN.jsonl``: every :data:`FLUSH_EVERY_S`
seconds at most, and before each checkpoint. A resumed run does not rewrite that history either:
it writes ``segment-NNNNNN.resume.json``, and readers drop the records past its step that came
before it. Event files of a ``gs://`` workdir are written locally and stored whole once closed
(every :data:`ROTATE_EVERY_S` seconds and before each checkpoint). :func:`read_metrics` reads
either layout as one ordered stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tensorboardX import SummaryWriter
from tqdm import tqdm

from guided_jax import sharding
from guided_jax.storage import GCS, is_remote

METRICS_FILE = "metrics.jsonl"  # a local workdir's records (and a gs:// one's, before segments)
SEGMENTS_DIR = "metrics"
EVENTS_DIR = "tensorboard"
FLUSH_EVERY_S = 10.0  # a gs:// workdir stores new records at most this often, besides saves
ROTATE_EVERY_S = 600.0  # and closes and stores its event file at least this often
_SEGMENT = re.compile(r"segment-(\d+)\.(jsonl|resume\.json)")
_EVENT_FILES = itertools.count()  # numbers this process's event files, in the order written

Guard = Callable[[], None]  # raises when the workdir is no longer this run's


class _Objects:
    """The files that metrics write in a workdir, a local directory or a ``gs://`` prefix. Each
    is created once and never overwritten: a create that finds other bytes there fails, so a
    run that lost its workdir to another cannot write over the other's records."""

    def __init__(self, workdir: str | os.PathLike):
        self.root = os.fspath(workdir).rstrip("/")
        self.remote = is_remote(self.root)
        if self.remote:
            from google.cloud import storage as gcs  # the gcs extra, checked with the workdir

            bucket, _, prefix = self.root[len(GCS) :].partition("/")
            self._bucket = gcs.Client().bucket(bucket)
            self._prefix = f"{prefix}/" if prefix else ""

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def names(self, folder: str) -> list[str]:
        """The names of the files directly in ``folder``."""
        if self.remote:
            start = f"{self._prefix}{folder}/"
            blobs = self._bucket.client.list_blobs(self._bucket, prefix=start)
            return [b.name[len(start) :] for b in blobs if "/" not in b.name[len(start) :]]
        directory = pathlib.Path(self.root, folder)
        return [p.name for p in directory.iterdir() if p.is_file()] if directory.is_dir() else []

    def exists(self, name: str) -> bool:
        if self.remote:
            return self._bucket.blob(self._prefix + name).exists()
        return pathlib.Path(self.root, name).is_file()

    def read(self, name: str) -> bytes | None:
        """The bytes of ``name``; None when it does not exist."""
        if self.remote:
            from google.api_core.exceptions import NotFound

            try:
                return self._bucket.blob(self._prefix + name).download_as_bytes()
            except NotFound:
                return None
        try:
            return pathlib.Path(self.root, name).read_bytes()
        except FileNotFoundError:
            return None

    def read_listed(self, names: list[str]) -> list[bytes]:
        """The bytes of files just listed (read concurrently from ``gs://``)."""
        with ThreadPoolExecutor(max_workers=16 if self.remote else 1) as pool:
            found = list(pool.map(self.read, names))
        for name, data in zip(names, found, strict=True):
            if data is None:
                raise FileNotFoundError(f"{self.url(name)!r} was listed, then deleted")
        return found  # type: ignore[return-value]

    def create(self, name: str, data: bytes) -> None:
        """Writes ``name`` if it does not exist yet. Finding it with the same bytes is this
        write's own, retried after a lost response; other bytes are another run's."""
        try:
            self._create(name, data)
        except FileExistsError:
            if self.read(name) != data:
                raise FileExistsError(
                    f"{self.url(name)} exists already: another run writes metrics to workdir "
                    f"{self.root}; stopping without writing over its records"
                ) from None

    def _create(self, name: str, data: bytes) -> None:
        if self.remote:
            from google.api_core.exceptions import PreconditionFailed

            try:  # generation 0: only if absent
                self._bucket.blob(self._prefix + name).upload_from_string(
                    data, if_generation_match=0
                )
            except PreconditionFailed:
                raise FileExistsError(self.url(name)) from None
            return
        path = pathlib.Path(self.root, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("xb") as file:
            file.write(data)


@dataclasses.dataclass(frozen=True)
class _Segment:
    """One object of ``WORKDIR/metrics``: records, or the mark of a resume."""

    number: int
    name: str

    @property
    def marks_resume(self) -> bool:
        return self.name.endswith(".resume.json")

    @property
    def path(self) -> str:
        return f"{SEGMENTS_DIR}/{self.name}"


def _segments(objects: _Objects) -> list[_Segment]:
    """The workdir's segments, in the order written."""
    found = []
    for name in objects.names(SEGMENTS_DIR):
        match = _SEGMENT.fullmatch(name)
        if match:
            found.append(_Segment(int(match[1]), name))
    return sorted(found, key=lambda s: (s.number, s.name))


def _resume_name(number: int) -> str:
    return f"{SEGMENTS_DIR}/segment-{number:06d}.resume.json"


def _records_name(number: int) -> str:
    return f"{SEGMENTS_DIR}/segment-{number:06d}.jsonl"


def _resume_step(data: bytes, url: str) -> int:
    """The step a resume mark names: records past it, written before the mark, are dropped."""
    try:
        step = json.loads(data)["resumed_at_step"]
        if not isinstance(step, int):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f'{url}: expected {{"resumed_at_step": STEP}}, found {data[:80]!r}'
        ) from None
    return step


class _Background:
    """Stores records and closed event files from a thread, in the order given: the records
    written since the last store as one new segment at most every ``flush_every_s`` seconds,
    and everything at once on :meth:`sync`. ``guard`` runs before each store. A failure ends
    the thread and is raised by the loop's next call (once)."""

    def __init__(self, objects: _Objects, number: int, flush_every_s: float, guard: Guard | None):
        self._objects, self._number = objects, number
        self._flush_every_s, self._guard = flush_every_s, guard
        self._lines: list[str] = []
        self._files: list[pathlib.Path] = []
        self._asked = self._served = 0  # syncs asked for, and served
        self._closing = False
        self._error: BaseException | None = None
        self._reported = False
        self._stored_at = -math.inf  # the first record is stored at once: a bad bucket shows early
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="guided_jax-metrics", daemon=True)
        self._thread.start()

    def add_line(self, line: str) -> None:
        with self._cond:
            self._raise_failure()
            self._lines.append(line)
            self._cond.notify()

    def add_file(self, path: pathlib.Path) -> None:
        with self._cond:
            self._raise_failure()
            self._files.append(path)
            self._cond.notify()

    def sync(self) -> None:
        """Returns once everything given so far is stored."""
        with self._cond:
            self._raise_failure()
            self._asked += 1
            ticket = self._asked
            self._cond.notify()
            while self._served < ticket and self._error is None:
                self._cond.wait()
            self._raise_failure()

    def close(self) -> None:
        """Stores what is pending and ends the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        with self._cond:
            self._raise_failure()

    def _raise_failure(self) -> None:
        if self._error is not None and not self._reported:
            self._reported = True
            raise self._error

    def _due(self) -> bool:
        if self._closing or self._asked > self._served or self._files:
            return True
        return bool(self._lines) and time.monotonic() - self._stored_at >= self._flush_every_s

    def _wait_s(self) -> float | None:
        if not self._lines:
            return None
        return max(0.0, self._flush_every_s - (time.monotonic() - self._stored_at))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due():
                    self._cond.wait(self._wait_s())
                lines, self._lines = self._lines, []
                files, self._files = self._files, []
                ticket, closing = self._asked, self._closing
            try:
                self._store(lines, files)
            except BaseException as error:  # raised in the loop's thread instead
                with self._cond:
                    self._error = error
                    self._cond.notify_all()
                return
            with self._cond:
                self._served = ticket
                self._cond.notify_all()
            if closing:  # nothing is added after close
                return

    def _store(self, lines: list[str], files: list[pathlib.Path]) -> None:
        if not (lines or files):
            return
        if self._guard is not None:
            self._guard()
        if lines:
            self._objects.create(_records_name(self._number), "".join(lines).encode())
            self._number += 1
            self._stored_at = time.monotonic()
        for path in files:
            self._objects.create(f"{EVENTS_DIR}/{path.name}", path.read_bytes())
            path.unlink()


def _add_scalars(writer: SummaryWriter, record: Mapping[str, float | int]) -> None:
    for key, value in record.items():
        if key != "step":
            writer.add_scalar(key, value, global_step=int(record["step"]))


class _LocalEvents:
    """Event files in a local ``WORKDIR/tensorboard``: one per process start (named by its
    pid), flushed before each checkpoint."""

    def __init__(self, directory: pathlib.Path, purge_step: int | None):
        self._writer = SummaryWriter(
            str(directory), purge_step=purge_step, filename_suffix=f".{os.getpid()}"
        )

    def add(self, record: Mapping[str, float | int]) -> None:
        _add_scalars(self._writer, record)

    def rotate(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _StoredEvents:
    """Event files written under a local temporary directory, closed every ``rotate_every_s``
    seconds and before each checkpoint, and then stored whole by the background thread, each
    once (tensorboardX's own ``gs://`` writer keeps the whole file in memory and uploads it
    again every two minutes). Their names sort in the order written, as TensorBoard reads them."""

    def __init__(self, background: _Background, purge_step: int | None, rotate_every_s: float):
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix="guided_jax_events."))
        self._background, self._rotate_every_s = background, rotate_every_s
        self._writer: SummaryWriter | None = None
        self._opened_at = 0.0
        self._open(purge_step)  # at once: a resumed run stores its purge even if it logs nothing

    def _open(self, purge_step: int | None = None) -> SummaryWriter:
        self._writer = SummaryWriter(
            str(self.directory),
            purge_step=purge_step,
            filename_suffix=f".{os.getpid()}.{next(_EVENT_FILES):06d}",
        )
        self._opened_at = time.monotonic()
        return self._writer

    def add(self, record: Mapping[str, float | int]) -> None:
        _add_scalars(self._writer or self._open(), record)
        if time.monotonic() - self._opened_at >= self._rotate_every_s:
            self.rotate()

    def rotate(self) -> None:
        """Closes the current file, if any, and hands it to the background thread."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        for path in sorted(self.directory.iterdir()):
            self._background.add_file(path)

    def close(self) -> None:
        self.rotate()


class MetricsWriter:
    """Adds records to both outputs. On resume it drops records past the restored step, which
    the resumed run writes again (TensorBoard is told to purge them too).

    The records of a local workdir go to ``metrics.jsonl`` as they come; those of a ``gs://``
    workdir (or of a local copy of one) go to segments, stored by a background thread (see the
    module docstring): :meth:`sync` returns once all are stored. ``guard`` runs before each
    write to the workdir and raises when it is no longer this run's."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        resume_step: int = 0,
        enabled: bool = True,
        flush_every_s: float = FLUSH_EVERY_S,
        rotate_every_s: float = ROTATE_EVERY_S,
        guard: Guard | None = None,
    ):
        self.enabled, self._guard = enabled, guard
        self._events: _LocalEvents | _StoredEvents | None = None
        self._background: _Background | None = None
        self._appended: pathlib.Path | None = None  # the local metrics.jsonl, in that layout
        if not enabled:
            return
        objects = _Objects(workdir)
        segments = _segments(objects)
        if objects.remote or segments:
            restarting = bool(segments) or objects.exists(METRICS_FILE)
            number = segments[-1].number + 1 if segments else 0
            if restarting:
                self._check_guard()
                mark = json.dumps({"resumed_at_step": resume_step}) + "\n"
                objects.create(_resume_name(number), mark.encode())
                number += 1
            self._background = _Background(objects, number, flush_every_s, guard)
        else:
            self._appended = pathlib.Path(objects.root, METRICS_FILE)
            restarting = self._appended.exists()  # a previous attempt of this run wrote records
            if restarting:
                kept = [r for r in _parse(self._appended.read_text()) if r["step"] <= resume_step]
                self._appended.write_text("".join(json.dumps(r) + "\n" for r in kept))
        purge_step = resume_step + 1 if restarting else None
        if self._background is not None and objects.remote:
            self._events = _StoredEvents(self._background, purge_step, rotate_every_s)
        else:
            self._events = _LocalEvents(pathlib.Path(objects.root, EVENTS_DIR), purge_step)

    def _check_guard(self) -> None:
        if self._guard is not None:
            self._guard()

    def write(self, record: Mapping[str, float | int]) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        line = json.dumps(clean) + "\n"
        if self._background is not None:
            self._background.add_line(line)
        elif self._appended is not None:
            self._check_guard()
            with self._appended.open("a") as f:
                f.write(line)
        if self._events is not None:
            self._events.add(record)

    def sync(self) -> None:
        """Returns once every record written so far is stored, and the events with them (a
        checkpoint follows: a run resumed from it must not miss the records before it)."""
        if self._events is not None:
            self._events.rotate()
        if self._background is not None:
            self._background.sync()

    def close(self) -> None:
        """Stores what is pending; raises a failure to store that was not raised yet."""
        events, self._events = self._events, None
        background, self._background = self._background, None
        try:
            if events is not None:
                events.close()
            if background is not None:
                background.close()
        finally:
            if isinstance(events, _StoredEvents):
                shutil.rmtree(events.directory, ignore_errors=True)

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


def has_metrics(workdir: str | os.PathLike) -> bool:
    """Whether ``workdir`` holds records, in either layout."""
    objects = _Objects(workdir)
    return bool(_segments(objects)) or objects.exists(METRICS_FILE)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """All records of a run, in order: ``metrics.jsonl`` (if any), then the segments, each
    resume mark dropping the records before it that are past its step."""
    objects = _Objects(workdir)
    segments = _segments(objects)
    first = objects.read(METRICS_FILE)
    if first is None and not segments:
        raise FileNotFoundError(f"{objects.url(METRICS_FILE)!r} does not exist")
    records = _parse(first.decode()) if first is not None else []
    texts = objects.read_listed([s.path for s in segments])
    for segment, data in zip(segments, texts, strict=True):
        if segment.marks_resume:
            step = _resume_step(data, objects.url(segment.path))
            records = [r for r in records if r["step"] <= step]
        else:
            records.extend(_parse(data.decode()))
    return records


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
        guard: Guard | None = None,
    ):
        self.writer = MetricsWriter(workdir, resume_step=start, enabled=enabled, guard=guard)
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

    def sync(self) -> None:
        """Writes the queued record and returns once every record is stored (before a save)."""
        self.flush()
        self.writer.sync()

    def close(self) -> None:
        self.bar.close()
        self.writer.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
