"""MetricsWriter's two outputs, read back independently: ``metrics.jsonl`` and the TensorBoard
event files (TFRecord framing parsed here, CRCs checked, events decoded with tensorboardX's
protos); resume truncation and purge; ``read_metrics`` on crashed and corrupt files."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import pytest
from tensorboardX.proto import event_pb2

from guided_jax.train.metrics import MetricsWriter, read_metrics, summary

# ----------------------------------------------------------------------------- event files


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: independent of tensorboardX's table implementation."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: Path) -> list[event_pb2.Event]:
    """Every record of a TFRecord file: u64 length, u32 masked CRC of the length, payload,
    u32 masked CRC of the payload (all little-endian)."""
    data = path.read_bytes()
    events, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert header_crc == _masked_crc(header), f"bad length CRC at byte {pos} of {path}"
        payload = data[pos + 12 : pos + 12 + length]
        assert len(payload) == length, f"record at byte {pos} of {path} is cut short"
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert payload_crc == _masked_crc(payload), f"bad payload CRC at byte {pos} of {path}"
        event = event_pb2.Event()
        event.ParseFromString(payload)
        events.append(event)
        pos += 16 + length
    return events


def event_files(workdir: Path) -> list[Path]:
    return sorted((workdir / "tensorboard").glob("events.out.tfevents.*"))


def scalars(events: list[event_pb2.Event]) -> list[tuple[str, int, float]]:
    """``(tag, step, value)`` of every scalar summary, in file order."""
    return [
        (value.tag, event.step, value.simple_value)
        for event in events
        if event.HasField("summary")
        for value in event.summary.value
    ]


def _next_second() -> None:
    """tensorboardX names event files by the second and host and opens them with mode "wb":
    two writers started within one second write the same file. Wait for a new second so a
    test's second writer gets its own file, as a resumed run (seconds later) does."""
    time.sleep(1.0 - time.time() % 1.0 + 0.02)


# ----------------------------------------------------------------------------- tests


def _records(steps) -> list[dict]:
    return [
        {"step": s, "loss": 10.0 / s, "learning_rate": 1e-3 * s, "ag_loss/next": 0.1 * s}
        for s in steps
    ]


def test_writes_jsonl_and_tensorboard_scalars(tmp_path: Path) -> None:
    records = _records([1, 2, 3])
    records.append({"step": 3, "eval_mlm_loss": 4.25})  # a second record of the same step
    with MetricsWriter(tmp_path) as writer:
        for record in records:
            writer.write(record)

    assert read_metrics(tmp_path) == records
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == len(records)

    [path] = event_files(tmp_path)
    events = read_events(path)
    assert events[0].file_version == "brain.Event:2"
    assert not any(e.HasField("session_log") for e in events)  # a fresh run purges nothing
    got = scalars(events)
    want = [(k, r["step"], v) for r in records for k, v in r.items() if k != "step"]
    assert [(tag, step) for tag, step, _ in got] == [(tag, step) for tag, step, _ in want]
    assert [value for *_, value in got] == pytest.approx([value for *_, value in want], rel=1e-6)
    assert all(e.wall_time > 0 for e in events)


def test_non_finite_values_are_null_in_jsonl(tmp_path: Path) -> None:
    record = {"step": 7, "loss": math.nan, "grad_norm": math.inf, "ag_loss": -math.inf, "x": 1.5}
    with MetricsWriter(tmp_path) as writer:
        writer.write(record)
    line = (tmp_path / "metrics.jsonl").read_text()
    # Strict JSON: no NaN/Infinity literals that other tools refuse.
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
        "step": 7,
        "loss": None,
        "grad_norm": None,
        "ag_loss": None,
        "x": 1.5,
    }
    assert read_metrics(tmp_path) == [json.loads(line)]
    # TensorBoard keeps the actual values (it plots NaN/inf itself).
    values = {tag: value for tag, _, value in scalars(read_events(event_files(tmp_path)[0]))}
    assert math.isnan(values["loss"])
    assert values["grad_norm"] == math.inf and values["ag_loss"] == -math.inf
    assert values["x"] == 1.5


def test_resume_drops_later_records_and_purges_them_in_tensorboard(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path) as writer:
        for record in _records(range(1, 6)):
            writer.write(record)
    _next_second()
    # The run resumes from its checkpoint at step 3: records 4 and 5 will be written again.
    with MetricsWriter(tmp_path, resume_step=3) as writer:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        for record in _records([4]):
            writer.write({**record, "loss": 99.0})

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[:3] == _records([1, 2, 3]) and records[3]["loss"] == 99.0

    old, new = event_files(tmp_path)
    old_events, new_events = read_events(old), read_events(new)
    assert {step for _, step, _ in scalars(old_events)} == {1, 2, 3, 4, 5}  # left as written
    # tensorboardX's purge_step: a file_version event and a SessionLog START at the purge step,
    # which makes TensorBoard drop every earlier-file event at or after that step.
    purge = [e for e in new_events if e.HasField("session_log")]
    assert len(purge) == 1
    assert purge[0].session_log.status == event_pb2.SessionLog.START
    assert purge[0].step == 4
    assert any(e.file_version == "brain.Event:2" and e.step == 4 for e in new_events)
    # The purge comes before the resumed run's scalars.
    index = new_events.index(purge[0])
    assert not any(e.HasField("summary") for e in new_events[:index])
    got = {tag: (step, value) for tag, step, value in scalars(new_events)}
    assert got == {
        "loss": (4, 99.0),
        "learning_rate": (4, pytest.approx(4e-3)),
        "ag_loss/next": (4, pytest.approx(0.4)),
    }


def test_restart_from_scratch_purges_tensorboard_too(tmp_path: Path) -> None:
    """A run that crashed before its first checkpoint restarts at step 0: its JSONL records are
    dropped, and TensorBoard must drop the old events as well (else both runs' points show)."""
    with MetricsWriter(tmp_path) as writer:
        for record in _records([1, 2]):
            writer.write(record)
    _next_second()
    with MetricsWriter(tmp_path, resume_step=0) as writer:
        assert read_metrics(tmp_path) == []
        writer.write(_records([1])[0])
    _, new = event_files(tmp_path)
    purge = [e for e in read_events(new) if e.HasField("session_log")]
    assert [(e.session_log.status, e.step) for e in purge] == [(event_pb2.SessionLog.START, 1)]


def test_read_metrics_drops_a_cut_short_last_line(tmp_path: Path) -> None:
    good = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}]
    text = "".join(json.dumps(r) + "\n" for r in good)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 3, "lo')  # kill -9 mid-write
    assert read_metrics(tmp_path) == good
    # A writer resuming such a file keeps the good records and starts a clean line.
    with MetricsWriter(tmp_path, resume_step=2) as writer:
        writer.write({"step": 3, "loss": 1.5})
    assert read_metrics(tmp_path) == [*good, {"step": 3, "loss": 1.5}]


def test_read_metrics_raises_on_a_corrupt_line_in_the_middle(tmp_path: Path) -> None:
    lines = ['{"step": 1, "loss": 2.5}', '{"step": 2, "lo', '{"step": 3, "loss": 2.0}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(json.JSONDecodeError):
        read_metrics(tmp_path)
    # Resuming must not silently rewrite (and so lose) such a file either.
    with pytest.raises(json.JSONDecodeError):
        MetricsWriter(tmp_path, resume_step=3)
    assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines) + "\n"


def test_disabled_writer_writes_nothing(tmp_path: Path) -> None:
    existing = '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.0}\n'
    (tmp_path / "metrics.jsonl").write_text(existing)
    with MetricsWriter(tmp_path, resume_step=1, enabled=False) as writer:
        writer.write({"step": 2, "loss": 1.0})
        writer.write({"step": 3, "loss": math.nan})
    assert (tmp_path / "metrics.jsonl").read_text() == existing  # not truncated, not appended
    assert not (tmp_path / "tensorboard").exists()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with MetricsWriter(fresh, enabled=False) as writer:
        writer.write({"step": 1, "loss": 1.0})
    assert list(fresh.iterdir()) == []


def test_the_closing_summary_leaves_head_diagnostics_to_the_metrics_file() -> None:
    last = {
        "step": 8,
        "ag_loss": 0.0123456,
        "diag/mass/L0H0": 0.5,
        "loss": 6.0,
        "eval_mlm_loss": 5.5,
    }
    assert summary(last) == "finished at step 8: ag_loss=0.01235 loss=6 eval_mlm_loss=5.5"
