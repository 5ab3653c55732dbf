"""The lease that keeps one run per ``gs://`` workdir, against a local Cloud Storage emulator.

The emulator ignores write preconditions, so these tests cover what a lease decides from
what it reads (refuse, take over, notice a takeover, release), not the atomicity of its
conditional writes, which real GCS provides."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
from etils import epath

from guided_jax.config.resolve import ConfigError
from guided_jax.train.run_lock import LEASE_FILE, ObjectLease, one_run_per_workdir


def _lease(workdir: str) -> dict:
    """The lease's record, read as the code reads it: one download pinned to the generation
    just looked up (a read through a filesystem layer learns the size of one version and may
    fetch the bytes of the next, which the heartbeat writes every few milliseconds here)."""
    from google.api_core.exceptions import NotFound, PreconditionFailed
    from google.cloud import storage as gcs

    bucket, _, prefix = workdir[len("gs://") :].partition("/")
    blob = gcs.Client().bucket(bucket).blob(f"{prefix}/{LEASE_FILE}")
    for _ in range(20):  # the heartbeat may replace the object between the two requests
        try:
            blob.reload()
            return json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
        except (NotFound, PreconditionFailed):
            time.sleep(0.01)
    raise AssertionError(f"{workdir}/{LEASE_FILE} could not be read at a stable generation")


def _write_lease(workdir: str, **record) -> None:
    epath.Path(workdir, LEASE_FILE).write_text(json.dumps(record))


def _ended_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                           capture_output=True, text=True)  # fmt: skip
    return int(child.stdout)


def _other_run(pid: int, host: str, heartbeat: float) -> dict:
    return {"owner": f"pid {pid} on {host}", "pid": pid, "host": host, "token": "other",
            "acquired": heartbeat, "heartbeat": heartbeat}  # fmt: skip


def test_the_lease_names_its_owner_while_held_and_is_gone_after(gcs_dir):
    before = time.time()
    with one_run_per_workdir(gcs_dir) as held:
        record = _lease(gcs_dir)
        assert record["owner"] == f"pid {os.getpid()} on {socket.gethostname()}"
        assert record["token"] == held.token
        assert before <= record["heartbeat"] <= time.time()
        held.check()  # still ours
    assert not epath.Path(gcs_dir, LEASE_FILE).exists()


def test_a_live_lease_is_refused_naming_its_owner(gcs_dir):
    _write_lease(gcs_dir, **_other_run(os.getpid(), socket.gethostname(), time.time() - 20))
    with pytest.raises(ConfigError) as refused:
        ObjectLease(gcs_dir).acquire()
    message = str(refused.value)
    assert message.startswith(f"workdir {gcs_dir} is in use by another run (pid {os.getpid()} on ")
    assert re.search(r"last heartbeat 2\d s ago", message) and "300 s old" in message
    assert _lease(gcs_dir)["token"] == "other"  # untouched

    # a live process on another host, with a recent heartbeat: refused too
    _write_lease(gcs_dir, **_other_run(_ended_pid(), "another-host", time.time()))
    with pytest.raises(ConfigError, match=r"in use by another run \(pid \d+ on another-host"):
        ObjectLease(gcs_dir).acquire()


@pytest.mark.parametrize(
    ("host", "age", "why"),
    [
        ("another-host", 400, "its last heartbeat was 400 s ago, more than 300 s"),
        (socket.gethostname(), 1, "its process on this host has ended"),
    ],
)
def test_a_stale_lease_is_taken_over_with_a_message(gcs_dir, capsys, host, age, why):
    pid = _ended_pid()
    _write_lease(gcs_dir, **_other_run(pid, host, time.time() - age))
    lease = ObjectLease(gcs_dir)
    lease.acquire()
    try:
        assert capsys.readouterr().out == (
            f"took over the lease of workdir {gcs_dir} from pid {pid} on {host}: {why}\n"
        )
        assert _lease(gcs_dir)["token"] == lease.token
    finally:
        lease.release()


def test_the_heartbeat_renews_and_a_takeover_stops_the_run(gcs_dir):
    lease = ObjectLease(gcs_dir, heartbeat_s=0.05)
    lease.acquire()
    try:
        first = _lease(gcs_dir)["heartbeat"]
        deadline = time.monotonic() + 30
        while _lease(gcs_dir)["heartbeat"] == first:
            assert time.monotonic() < deadline, "the heartbeat was never renewed"
            time.sleep(0.05)
        assert _lease(gcs_dir)["acquired"] == pytest.approx(first)
        # another run takes the lease over (as it would after this one's heartbeat went stale)
        _write_lease(gcs_dir, **_other_run(4242, "another-host", time.time()))
        while lease.lost_to is None:
            assert time.monotonic() < deadline, "the takeover was never noticed"
            time.sleep(0.05)
        with pytest.raises(ConfigError, match=r"was taken over by pid 4242 on another-host"):
            lease.check()
    finally:
        lease.release()
    assert _lease(gcs_dir)["token"] == "other", "release deleted another run's lease"


def test_an_object_that_is_no_lease_is_refused(gcs_dir):
    epath.Path(gcs_dir, LEASE_FILE).write_text("not json")
    with pytest.raises(ConfigError, match=r"lease.json is not a guided_jax lease"):
        ObjectLease(gcs_dir).acquire()
