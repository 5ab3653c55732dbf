"""Metrics of a ``gs://`` workdir, on the Cloud Storage emulator (tests/gcs_emulator.py), seen
from the emulator's side: the bytes it receives per log step stay bounded, each object is written
once and records at most once per flush interval, a resume drops later records without rewriting
the history, a ``kill -9`` loses only the records after the last sync, a run that lost the
workdir cannot write over another's records, and TensorBoard gets whole, closed event files."""

from __future__ import annotations

import dataclasses
import itertools
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import gcs_emulator
import pytest
from etils import epath
from test_metrics import read_events, scalars

from guided_jax.storage import copy_tree
from guided_jax.train.metrics import MetricsWriter, has_metrics, read_metrics

# ----------------------------------------------------------------------------- the emulator


@dataclasses.dataclass
class Uploads:
    """What the emulator received: the bytes of every request body, and each object it created
    (name, size, time.monotonic())."""

    bytes: int = 0
    created: list[tuple[str, int, float]] = dataclasses.field(default_factory=list)

    def names(self, folder: str) -> list[str]:
        return [name for name, *_ in self.created if f"/{folder}/" in name]


@pytest.fixture
def uploads(gcs_dir, monkeypatch) -> Uploads:
    """Counts at the emulator's socket and store (which answers a create-only write of an
    object that exists, ``ifGenerationMatch=0``, with 412 as GCS does: tests/gcs_emulator.py)."""
    from gcp_storage_emulator import server, storage

    seen = Uploads()
    read_raw, create_file = server._read_raw_data, storage.Storage.create_file

    def counted_read(handler):
        data = read_raw(handler)
        seen.bytes += len(data or b"")
        return data

    def recorded_create(self, bucket, name, content, *args, **kwargs):
        seen.created.append((name, len(content), time.monotonic()))
        return create_file(self, bucket, name, content, *args, **kwargs)

    monkeypatch.setattr(server, "_read_raw_data", counted_read)
    monkeypatch.setattr(storage.Storage, "create_file", recorded_create)
    return seen


def _put(url: str, text: str) -> None:
    """Writes an object as another writer would (one request, google-cloud-storage)."""
    from google.cloud import storage as gcs

    bucket, name = url[len("gs://") :].split("/", 1)
    gcs.Client().bucket(bucket).blob(name).upload_from_string(text)


def _records(steps, **extra) -> list[dict]:
    """Records shaped like the loop's (about 300 bytes of JSON each)."""
    return [
        {
            "step": s,
            "loss": 10.0 / s,
            "mlm_loss": 9.0 / s,
            "ag_loss": 1.0 / s,
            "ag_loss/next": 0.5 / s,
            "ag_loss/prev": 0.25 / s,
            "ag_weight": 1.0,
            "learning_rate": 1e-4 * s,
            "grad_norm": 2.0 + s,
            "tokens_per_sec": 1000.0 + s,
            **extra,
        }
        for s in steps
    ]


def _jsonl_bytes(records: list[dict]) -> int:
    return sum(len(json.dumps(r)) + 1 for r in records)


# ----------------------------------------------------------------------------- cost


def test_each_log_step_on_gs_uploads_bounded_bytes(gcs_dir, uploads):
    """The old writer rewrote metrics.jsonl whole at each step: 200 steps uploaded ~100 times
    the records, and the second 100 steps three times as much as the first."""
    workdir = f"{gcs_dir}/run"
    records = _records(range(1, 201))
    with MetricsWriter(workdir, flush_every_s=0.2) as writer:
        for record in records:
            writer.write(record)
            if record["step"] % 20 == 0:  # a checkpoint every 20 steps
                writer.sync()
    assert read_metrics(workdir) == records
    own = _jsonl_bytes(records)
    # The records themselves, their TensorBoard events (about as large again), a few objects.
    assert uploads.bytes < 4 * own, (uploads.bytes, own)

    # Worst case, one store per step: what a step costs does not grow with the run.
    workdir = f"{gcs_dir}/synced"
    halves = []
    with MetricsWriter(workdir) as writer:
        for half in (range(1, 101), range(101, 201)):
            before = uploads.bytes
            for record in _records(half):
                writer.write(record)
                writer.sync()
            halves.append(uploads.bytes - before)
    first, second = halves
    assert second < 1.1 * first, halves
    assert len(uploads.names("synced/metrics")) == 200


def test_each_object_is_written_once_and_records_at_most_once_per_interval(gcs_dir, uploads):
    workdir = f"{gcs_dir}/run"
    records = _records(range(1, 201))
    start = time.monotonic()
    with MetricsWriter(workdir, flush_every_s=0.5) as writer:
        for record in records:
            writer.write(record)
            time.sleep(0.01)
        writing_ended = time.monotonic()
    assert read_metrics(workdir) == records
    assert all(n == 1 for n in Counter(name for name, *_ in uploads.created).values())
    stored = [t for name, _, t in uploads.created if "/metrics/segment-" in name]
    # The first record at once, then every 0.5 s, then the rest at close.
    assert len(stored) <= (writing_ended - start) / 0.5 + 2, len(stored)
    gaps = [later - earlier for earlier, later in itertools.pairwise(stored[:-1])]
    assert min(gaps) >= 0.45, gaps


# ----------------------------------------------------------------------------- one stream


def test_a_resume_on_gs_drops_later_records_without_rewriting_the_history(
    gcs_dir, uploads, tmp_path
):
    workdir = f"{gcs_dir}/run"
    with MetricsWriter(workdir) as writer:
        for record in _records(range(1, 301)):
            writer.write(record)
    # The run resumes from its checkpoint at step 200: records 201-300 come again.
    before = uploads.bytes
    writer = MetricsWriter(workdir, resume_step=200)
    assert uploads.bytes - before < 1024  # a mark of the resume, not the 90 KB history again
    assert [r["step"] for r in read_metrics(workdir)] == list(range(1, 201))
    with writer:
        for record in _records([201, 202], again=True):
            writer.write(record)
    expected = _records(range(1, 201)) + _records([201, 202], again=True)
    assert read_metrics(workdir) == expected
    # A second resume, before the first one's next checkpoint.
    with MetricsWriter(workdir, resume_step=200) as writer:
        writer.write(_records([201], third=True)[0])
    expected = [*_records(range(1, 201)), *_records([201], third=True)]
    assert read_metrics(workdir) == expected
    assert all(n == 1 for n in Counter(name for name, *_ in uploads.created).values())
    assert not epath.Path(workdir, "metrics.jsonl").exists()

    # A local copy of the workdir reads the same, and a run resumed there keeps its layout.
    local = tmp_path / "copy"
    copy_tree(workdir, local)
    assert has_metrics(local) and read_metrics(local) == expected
    with MetricsWriter(local, resume_step=1) as writer:
        writer.write(_records([2], local=True)[0])
    assert read_metrics(local) == [*_records([1]), *_records([2], local=True)]
    assert not (local / "metrics.jsonl").exists()

    # A restart from scratch (no checkpoint yet) drops everything.
    with MetricsWriter(workdir, resume_step=0):
        pass
    assert has_metrics(workdir) and read_metrics(workdir) == []


def test_a_gs_metrics_jsonl_of_the_old_layout_is_read_first_and_kept(gcs_dir, uploads):
    workdir = f"{gcs_dir}/run"
    old = "".join(json.dumps(r) + "\n" for r in _records(range(1, 5)))
    _put(f"{workdir}/metrics.jsonl", old)
    assert has_metrics(workdir) and read_metrics(workdir) == _records(range(1, 5))
    with MetricsWriter(workdir, resume_step=2) as writer:
        writer.write(_records([3], again=True)[0])
    assert read_metrics(workdir) == [*_records([1, 2]), *_records([3], again=True)]
    assert epath.Path(workdir, "metrics.jsonl").read_text() == old
    assert not any(name.endswith("metrics.jsonl") for name, *_ in uploads.created[1:])


def test_a_bad_resume_mark_is_named(gcs_dir):
    workdir = f"{gcs_dir}/run"
    _put(f"{workdir}/metrics/segment-000000.resume.json", '{"step": 3}\n')
    with pytest.raises(ValueError, match=r"segment-000000\.resume\.json: expected .*resumed_at"):
        read_metrics(workdir)
    assert not has_metrics(f"{gcs_dir}/none")
    with pytest.raises(FileNotFoundError, match=r"none/metrics\.jsonl' does not exist"):
        read_metrics(f"{gcs_dir}/none")


# ----------------------------------------------------------------------------- crashes


_KILLED_WRITER = """
import sys, time
from guided_jax.train.metrics import MetricsWriter

writer = MetricsWriter(sys.argv[1], flush_every_s=3600)
for step in range(1, 16):
    writer.write({"step": step, "loss": 1.0 / step})
    if step == 10:
        writer.sync()  # what the loop does before it saves the checkpoint of step 10
print("written", flush=True)
time.sleep(600)
"""


def test_a_kill_9_loses_only_the_records_after_the_last_sync(gcs_dir):
    workdir = f"{gcs_dir}/run"
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_WRITER), workdir],
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout.readline() == "written\n"
        finally:
            process.send_signal(signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    expected = [{"step": s, "loss": 1.0 / s} for s in range(1, 11)]
    assert read_metrics(workdir) == expected
    with MetricsWriter(workdir, resume_step=10) as writer:  # the rerun, from step 10
        writer.write({"step": 11, "loss": 0.5})
    assert read_metrics(workdir) == [*expected, {"step": 11, "loss": 0.5}]


def test_a_run_that_lost_the_workdir_stops_at_its_next_write(gcs_dir, uploads):
    workdir = f"{gcs_dir}/run"
    lost = threading.Event()

    def guard() -> None:
        if lost.is_set():
            raise RuntimeError("workdir taken over by another run")

    [first, second, third] = _records([1, 2, 3])
    writer = MetricsWriter(workdir, guard=guard)
    writer.write(first)
    writer.sync()
    lost.set()
    writer.write(second)
    with pytest.raises(RuntimeError, match="taken over"):
        writer.sync()
    writer.write(third)  # raised once: the loop is on its way out
    writer.close()
    assert read_metrics(workdir) == [first]
    assert len(uploads.names("tensorboard")) == 1  # the events after it stay unstored too


def test_records_never_overwrite_another_runs_segment(gcs_dir, uploads):
    workdir = f"{gcs_dir}/run"
    [record] = _records([1])

    # The write lands but its response is lost: the client's retry gets 412, and the object
    # holds this run's own bytes, so the write counts as done; stored once.
    gcs_emulator.lose_responses(
        f"{workdir[len('gs://') :].split('/', 1)[1]}/metrics/segment-000000.jsonl"
    )
    with MetricsWriter(workdir) as writer:
        writer.write(record)
    assert read_metrics(workdir) == [record]
    assert len(uploads.names("run/metrics")) == 1

    # With other bytes: another run's records, kept, and this run stops, naming the object.
    other = f"{gcs_dir}/other"
    writer = MetricsWriter(other)
    _put(f"{other}/metrics/segment-000000.jsonl", '{"step": 7}\n')
    writer.write(record)
    with pytest.raises(FileExistsError, match=r"other/metrics/segment-000000\.jsonl exists"):
        writer.sync()
    writer.close()
    assert read_metrics(other) == [{"step": 7}]


# ----------------------------------------------------------------------------- TensorBoard


def _stored_events(workdir: str, tmp_path: Path) -> list[tuple[str, list]]:
    """Each event file of the workdir, in name order (as TensorBoard reads them), parsed."""
    from google.cloud import storage as gcs

    bucket, prefix = workdir[len("gs://") :].split("/", 1)
    files = []
    for blob in gcs.Client().list_blobs(bucket, prefix=f"{prefix}/tensorboard/"):
        local = tmp_path / blob.name.rsplit("/", 1)[1]
        local.write_bytes(blob.download_as_bytes())
        files.append((local.name, read_events(local)))
    return sorted(files, key=lambda file: file[0])


def test_gs_event_files_are_stored_whole_once_closed(gcs_dir, uploads, tmp_path):
    workdir = f"{gcs_dir}/run"
    records = _records(range(1, 9))
    with MetricsWriter(workdir, rotate_every_s=0.3) as writer:
        for record in records[:4]:
            writer.write(record)
        writer.sync()  # a checkpoint closes the file
        assert uploads.names("tensorboard")
        for record in records[4:]:
            time.sleep(0.2)  # and so does age
            writer.write(record)
    files = _stored_events(workdir, tmp_path)
    assert len(files) >= 3 and len(files) == len(uploads.names("tensorboard"))
    assert all(n == 1 for n in Counter(name for name, *_ in uploads.created).values())
    got = [item for _, events in files for item in scalars(events)]
    want = [(k, r["step"], v) for r in records for k, v in r.items() if k != "step"]
    assert [(tag, step) for tag, step, _ in got] == [(tag, step) for tag, step, _ in want]
    assert [v for *_, v in got] == pytest.approx([v for *_, v in want], rel=1e-6)
    assert not any(e.HasField("session_log") for _, events in files for e in events)

    # Resumed at step 3: the first file of the new process purges from step 4, no other does.
    with MetricsWriter(workdir, resume_step=3) as writer:
        writer.write(_records([4])[0])
        writer.sync()
        writer.write(_records([5])[0])
    stored = _stored_events(workdir, tmp_path)
    in_order_written = [name.rsplit("/", 1)[1] for name in uploads.names("tensorboard")]
    assert [name for name, _ in stored] == in_order_written
    new = stored[len(files) :]
    purges = [[e.step for e in events if e.HasField("session_log")] for _, events in new]
    assert purges == [[4], []]
    assert [step for _, events in new for _, step, _ in scalars(events)] == [4] * 9 + [5] * 9
