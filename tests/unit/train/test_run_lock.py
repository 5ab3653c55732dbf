"""The lease that keeps one run per ``gs://`` workdir, against a local Cloud Storage emulator
that honours write preconditions as GCS does (tests/gcs_emulator.py), and the flock of a local
workdir.

Faults are raised into the lease's own requests (a token refresh that fails, 403, 412, 429,
503, a response lost after its write landed). Every read of the lease here is pinned to a
generation, as the code's own reads are: the heartbeat replaces the object every few
milliseconds."""

import copy
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import gcs_emulator
import pytest
from google.api_core.exceptions import (
    Forbidden,
    NotFound,
    PreconditionFailed,
    ServiceUnavailable,
    TooManyRequests,
)
from google.auth.exceptions import RefreshError
from google.cloud import storage as gcs

from conftest import REPO, cli_env
from guided_jax.config.resolve import ConfigError
from guided_jax.train import run_lock
from guided_jax.train.run_lock import LEASE_FILE, ObjectLease, one_run_per_workdir

BEAT = 0.05  # heartbeat of the leases here
STALE = 2.0  # staleness of the leases here: a holder fences itself after STALE / 2
WATCH = 1.0  # staleness of the leases that tests wait out


def _blob(workdir: str) -> gcs.Blob:
    bucket, _, prefix = workdir[len("gs://") :].partition("/")
    return gcs.Client().bucket(bucket).blob(f"{prefix}/{LEASE_FILE}")


def _lease(workdir: str) -> dict | None:
    """The lease's record (None: no lease), read at the generation just looked up."""
    blob = _blob(workdir)
    for _ in range(50):  # the heartbeat may replace the object between the two requests
        try:
            blob.reload()
            return json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
        except NotFound:
            return None
        except PreconditionFailed:
            time.sleep(0.01)
    raise AssertionError(f"{workdir}/{LEASE_FILE} could not be read at a stable generation")


def _write_lease(workdir: str, record: dict) -> None:
    _blob(workdir).upload_from_string(json.dumps(record))


def _ended_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                           capture_output=True, text=True)  # fmt: skip
    return int(child.stdout)


def _run_record(pid: int, **fields) -> dict:
    """Another run's record: on this machine unless ``fields`` say otherwise."""
    record = {**run_lock._machine(), "pid": pid, "pid_start": "", "token": "other",
              "acquired": time.time(), "heartbeat": time.time(), **fields}  # fmt: skip
    return {"owner": f"pid {pid} on {record['host']}", **record}


def _elsewhere(lease: ObjectLease, host: str = "another-host") -> ObjectLease:
    """``lease`` as a run on another host would hold it."""
    lease.machine = {**lease.machine, "host": host}
    return lease


def _faults(lease: ObjectLease, method: str, errors: list, *, forever: bool = False) -> list:
    """Makes ``lease``'s calls of ``method`` on its object raise ``errors``, one per call (the
    last one forever if ``forever``), then make the real call. Returns the times of the calls."""
    real = getattr(lease._blob, method)
    calls: list[float] = []
    queue = list(errors)

    def failing(*args, **kwargs):
        calls.append(time.monotonic())
        if queue:
            error = queue[0] if forever and len(queue) == 1 else queue.pop(0)
            raise copy.copy(error)
        return real(*args, **kwargs)

    setattr(lease._blob, method, failing)
    return calls


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


@pytest.fixture
def held(gcs_dir):
    """A lease this process holds on ``gcs_dir``, released after the test."""
    lease = ObjectLease(gcs_dir, heartbeat_s=BEAT, stale_after_s=STALE)
    lease.acquire()
    yield lease
    lease.release()


# ------------------------------------------------------------------------------ taking it


def test_the_lease_names_its_owner_while_held_and_is_gone_after(gcs_dir):
    before = time.time()
    with one_run_per_workdir(gcs_dir) as held:
        record = _lease(gcs_dir)
        assert record["owner"] == f"pid {os.getpid()} on {socket.gethostname()}"
        assert record["token"] == held.token and record["pid"] == os.getpid()
        with open("/proc/sys/kernel/random/boot_id") as boot:
            assert record["boot_id"] == boot.read().strip()
        assert record["pid_namespace"] == os.readlink("/proc/self/ns/pid")
        assert before <= record["heartbeat"] <= time.time()
        held.check()  # still ours
    assert _lease(gcs_dir) is None


def test_a_lease_whose_process_runs_on_this_machine_is_refused_at_once(gcs_dir):
    _write_lease(gcs_dir, _run_record(os.getpid(), pid_start=run_lock._start_time(os.getpid())))
    start = time.monotonic()
    with pytest.raises(ConfigError) as refused:
        ObjectLease(gcs_dir, stale_after_s=60).acquire()
    assert time.monotonic() - start < 5, "refused only after waiting"
    assert str(refused.value) == (
        f"workdir {gcs_dir} is in use by another run (pid {os.getpid()} on "
        f"{socket.gethostname()}, its process is running on this host, per {gcs_dir}/"
        f"{LEASE_FILE}); wait for it to end or use another --workdir (a lease is taken over "
        f"once it goes 60 s without a renewal, or at once when its process on this host has "
        f"ended)"
    )
    assert _lease(gcs_dir)["token"] == "other"  # untouched


@pytest.mark.parametrize(
    "pid_of",
    [
        pytest.param(lambda: (_ended_pid(), ""), id="ended"),
        # this test's own pid, but a process that started at another time: a reused pid
        pytest.param(lambda: (os.getpid(), "1"), id="pid-reused"),
    ],
)
def test_a_lease_whose_process_on_this_machine_ended_is_taken_over_at_once(gcs_dir, capsys, pid_of):
    pid, start_time = pid_of()
    _write_lease(gcs_dir, _run_record(pid, pid_start=start_time))
    lease = ObjectLease(gcs_dir, heartbeat_s=BEAT, stale_after_s=60)
    started = time.monotonic()
    lease.acquire()
    try:
        assert time.monotonic() - started < 5
        assert capsys.readouterr().out == (
            f"took over the lease of workdir {gcs_dir} from pid {pid} on "
            f"{socket.gethostname()}: its process on this host has ended\n"
        )
        assert _lease(gcs_dir)["token"] == lease.token
    finally:
        lease.release()


@pytest.mark.parametrize("differs", ["pid_namespace", "boot_id"])
def test_a_lease_from_another_container_of_this_host_is_watched_not_judged_by_its_pid(
    gcs_dir, capsys, differs
):
    """Containers sharing the hostname (``--net=host``) have pids of their own: the ended pid
    says nothing, so the lease is taken over only after going WATCH s without a renewal."""
    pid = _ended_pid()
    _write_lease(gcs_dir, _run_record(pid, **{differs: "other"}))
    lease = ObjectLease(gcs_dir, heartbeat_s=BEAT, stale_after_s=WATCH)
    started = time.monotonic()
    lease.acquire()
    try:
        assert time.monotonic() - started >= WATCH
        assert capsys.readouterr().out == (
            f"workdir {gcs_dir} is held by pid {pid} on {socket.gethostname()} (per {gcs_dir}/"
            f"{LEASE_FILE}); waiting up to 1 s for its next renewal: without one, its run has "
            f"ended and this run takes the workdir over\n"
            f"took over the lease of workdir {gcs_dir} from pid {pid} on "
            f"{socket.gethostname()}: its lease went 1 s without a renewal\n"
        )
    finally:
        lease.release()


def test_a_lease_renewed_while_watched_is_refused_without_waiting_it_out(gcs_dir):
    holder = _elsewhere(ObjectLease(gcs_dir, heartbeat_s=BEAT, stale_after_s=30))
    holder.acquire()
    try:
        started = time.monotonic()
        with pytest.raises(ConfigError, match=r"its lease was renewed while this run waited"):
            ObjectLease(gcs_dir, stale_after_s=30, poll_s=BEAT).acquire()
        assert time.monotonic() - started < 10
        assert _lease(gcs_dir)["token"] == holder.token
    finally:
        holder.release()


def test_the_holders_staleness_counts_when_it_is_the_longer(gcs_dir):
    """A reader configured with a shorter staleness waits as long as the holder's own."""
    _write_lease(gcs_dir, _run_record(_ended_pid(), host="another-host", stale_after_s=2 * WATCH))
    lease = ObjectLease(gcs_dir, heartbeat_s=BEAT, stale_after_s=WATCH / 4)
    started = time.monotonic()
    lease.acquire()
    lease.release()
    assert time.monotonic() - started >= 2 * WATCH


_SKEWED_READER = """
import sys, time
skew = float(sys.argv[2])
real = time.time
time.time = lambda: real() + skew  # this host's wall clock is off by skew seconds
from guided_jax.config.resolve import ConfigError
from guided_jax.train.run_lock import ObjectLease
lease = ObjectLease(sys.argv[1], heartbeat_s=0.05, stale_after_s=float(sys.argv[3]))
started = time.monotonic()
try:
    lease.acquire()
except ConfigError as refused:
    print(f"refused after {time.monotonic() - started:.2f} s: {refused}")
else:
    print(f"took it after {time.monotonic() - started:.2f} s")
    lease.release()
"""


def _skewed_reader(workdir: str, skew: float, stale: float) -> tuple[str, float]:
    """What a run on a host whose clock is ``skew`` seconds off makes of the lease."""
    result = subprocess.run(
        [sys.executable, "-c", _SKEWED_READER, workdir, str(skew), str(stale)],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    found = re.match(r"(refused|took it) after ([\d.]+) s", last)
    assert found, result.stdout
    return last, float(found[2])


def test_a_skewed_clock_neither_steals_a_live_lease_nor_keeps_a_dead_one(gcs_dir):
    # A live holder on another host, read by a host whose clock runs 10 minutes fast (to a
    # clock comparison, a heartbeat 10 minutes old).
    holder = _elsewhere(ObjectLease(gcs_dir, heartbeat_s=BEAT, stale_after_s=30))
    holder.acquire()
    try:
        verdict, _ = _skewed_reader(gcs_dir, +600, 2.0)
        assert "refused" in verdict and "its lease was renewed while this run waited" in verdict
        assert _lease(gcs_dir)["token"] == holder.token
        holder.check()
    finally:
        holder.release()

    # A dead holder's lease, written just now by its clock, read by a host whose clock runs 10
    # minutes slow (to a clock comparison, a heartbeat from the future).
    _write_lease(gcs_dir, _run_record(_ended_pid(), host="another-host"))
    verdict, waited = _skewed_reader(gcs_dir, -600, 2.0)
    assert verdict.startswith("took it") and 2.0 <= waited < 30


def _racers(workdir: str, count: int) -> tuple[list[ObjectLease], list]:
    """``count`` runs acquiring the lease at once: each reads, then all write together."""
    leases = [ObjectLease(workdir, heartbeat_s=BEAT, stale_after_s=60) for _ in range(count)]
    together = threading.Barrier(count, timeout=60)
    waited: set[int] = set()
    for index, lease in enumerate(leases):

        def write(generation: int, index=index, real=lease._write) -> None:
            if index not in waited:
                waited.add(index)
                together.wait()  # every racer has read the object before any writes
            real(generation)

        lease._write = write
    outcomes: list = [None] * count

    def race(index: int) -> None:
        try:
            leases[index].acquire()
            outcomes[index] = "won"
        except ConfigError as refused:
            outcomes[index] = refused
        except Exception as error:
            outcomes[index] = error

    threads = [threading.Thread(target=race, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return leases, outcomes


@pytest.mark.parametrize("before", ["no lease", "a lease whose process ended"])
def test_of_racing_acquirers_exactly_one_wins(gcs_dir, capsys, before):
    if before != "no lease":
        _write_lease(gcs_dir, _run_record(_ended_pid()))
    leases, outcomes = _racers(gcs_dir, 4)
    try:
        winners = [
            lease for lease, outcome in zip(leases, outcomes, strict=True) if outcome == "won"
        ]
        assert len(winners) == 1, outcomes
        for outcome in outcomes:
            if outcome != "won":
                assert isinstance(outcome, ConfigError), outcome
                assert "is in use by another run" in str(outcome)
        assert _lease(gcs_dir)["token"] == winners[0].token
        time.sleep(5 * BEAT)
        winners[0].check()
        assert _lease(gcs_dir)["token"] == winners[0].token
    finally:
        for lease in leases:
            lease.release()
    assert capsys.readouterr().out.count("took over") == (before != "no lease")


# ------------------------------------------------------------------------- faults, acquiring


def test_a_create_whose_response_was_lost_counts_as_acquired(gcs_dir):
    """The write lands, its response is lost, the client retries and gets 412: the record
    found then is this run's own."""
    gcs_emulator.lose_responses(_blob(gcs_dir).name)
    lease = ObjectLease(gcs_dir, heartbeat_s=BEAT, stale_after_s=STALE)
    writes = _faults(lease, "upload_from_string", [])
    lease.acquire()
    try:
        assert len(writes) == 1  # one write call: the client's retry got the 412
        assert _lease(gcs_dir)["token"] == lease.token
        time.sleep(5 * BEAT)
        lease.check()
    finally:
        lease.release()
    assert _lease(gcs_dir) is None


def test_a_lease_replaced_between_its_metadata_and_its_bytes_is_read_again(gcs_dir):
    """The read is pinned to the generation just looked up: a replacement in between gets a
    412 from storage, and the lease is read again, now as the newer run's."""
    _write_lease(gcs_dir, _run_record(_ended_pid()))
    lease = ObjectLease(gcs_dir, heartbeat_s=BEAT, stale_after_s=60)
    live = _run_record(os.getpid(), pid_start=run_lock._start_time(os.getpid()), token="newer")
    real, downloads = lease._blob.download_as_bytes, []

    def replaced_first(*args, **kwargs):
        if len(downloads) == 0:
            _write_lease(gcs_dir, live)  # another run takes the stale lease in between
        downloads.append(time.monotonic())
        return real(*args, **kwargs)

    lease._blob.download_as_bytes = replaced_first
    with pytest.raises(ConfigError, match=r"its process is running on this host"):
        lease.acquire()
    assert len(downloads) >= 2
    assert _lease(gcs_dir)["token"] == "newer"


@pytest.mark.parametrize(
    "error",
    [TooManyRequests("rate limit"), ServiceUnavailable("backend"),
     RefreshError("metadata server unavailable")],
    ids=["429", "503", "refresh"],
)  # fmt: skip
def test_acquiring_rides_out_transient_failures(gcs_dir, error):
    lease = ObjectLease(gcs_dir, heartbeat_s=BEAT, stale_after_s=STALE, poll_s=0.01)
    writes = _faults(lease, "upload_from_string", [error, error])
    lease.acquire()
    try:
        assert len(writes) == 3
        assert _lease(gcs_dir)["token"] == lease.token
    finally:
        lease.release()


def test_acquiring_stops_on_a_refusal_or_when_failures_persist(gcs_dir):
    lease = ObjectLease(gcs_dir, poll_s=0.01)
    writes = _faults(lease, "upload_from_string", [Forbidden("no storage.objects.create")])
    with pytest.raises(ConfigError) as refused:
        lease.acquire()
    assert len(writes) == 1  # no retry: more of the same would not help
    assert str(refused.value) == (
        f"workdir {gcs_dir}: could not take the lease {gcs_dir}/{LEASE_FILE} (Forbidden: 403 "
        f"no storage.objects.create); a run needs to read, create and overwrite objects there "
        f"(roles/storage.objectUser on the bucket)"
    )

    lease = ObjectLease(gcs_dir, poll_s=0.01)
    reads = _faults(lease, "reload", [TooManyRequests("rate limit")], forever=True)
    with pytest.raises(ConfigError, match=r"could not take the lease .*\(TooManyRequests: 429"):
        lease.acquire()
    assert len(reads) == run_lock._ATTEMPTS
    assert _lease(gcs_dir) is None


def test_an_object_that_is_no_lease_is_refused(gcs_dir):
    _blob(gcs_dir).upload_from_string("not json")
    with pytest.raises(ConfigError, match=r"lease.json is not a guided_jax lease"):
        ObjectLease(gcs_dir).acquire()


# --------------------------------------------------------------------------- holding it


def test_the_heartbeat_renews_and_a_takeover_ends_the_lease(held, gcs_dir, capsys):
    first = _lease(gcs_dir)
    _wait_for(lambda: _lease(gcs_dir)["heartbeat"] != first["heartbeat"], "a renewal")
    assert _lease(gcs_dir)["acquired"] == first["acquired"]
    held.check()
    # another run writes the lease (as it would after this one's renewals stopped)
    _write_lease(gcs_dir, _run_record(4242, host="another-host"))
    _wait_for(lambda: held.lost() is not None, "the takeover is noticed")
    with pytest.raises(ConfigError) as stopped:
        held.check()
    assert str(stopped.value) == (
        f"workdir {gcs_dir} is no longer this run's ({gcs_dir}/{LEASE_FILE}: it was taken over "
        f"by pid 4242 on another-host); stopping without saving"
    )
    assert "no longer this run's: it was taken over by pid 4242" in capsys.readouterr().err
    held.release()
    assert _lease(gcs_dir)["token"] == "other", "release deleted another run's lease"


def _renewals(lease: ObjectLease, gcs_dir: str, count: int = 3) -> None:
    """Waits for ``count`` more renewals of ``lease``."""
    for _ in range(count):
        seen = _lease(gcs_dir)["heartbeat"]
        _wait_for(lambda seen=seen: _lease(gcs_dir)["heartbeat"] != seen, "a renewal")


@pytest.mark.parametrize(
    ("method", "error"),
    [
        ("reload", RefreshError("metadata server unavailable")),
        ("upload_from_string", TooManyRequests("rate limit")),
        ("upload_from_string", PreconditionFailed("raced")),
        ("download_as_bytes", PreconditionFailed("replaced")),
    ],
    ids=["refresh", "429", "412-write", "412-read"],
)
def test_a_renewal_that_fails_once_is_logged_and_the_next_one_keeps_the_lease(
    held, gcs_dir, capsys, method, error
):
    calls = _faults(held, method, [error])
    _wait_for(lambda: len(calls) >= 1, "the fault is raised")
    _renewals(held, gcs_dir)
    held.check()
    assert _lease(gcs_dir)["token"] == held.token
    logged = capsys.readouterr().err
    if method == "download_as_bytes":  # the read is taken again at once: nothing to report
        assert logged == ""
    else:
        assert f"renewing the lease {gcs_dir}/{LEASE_FILE} failed ({type(error).__name__}" in (
            logged
        )


@pytest.mark.parametrize(
    "error",
    [TooManyRequests("rate limit"), RefreshError("metadata server unavailable")],
    ids=["429", "refresh"],
)
def test_renewals_that_keep_failing_end_the_lease_after_half_its_staleness(held, gcs_dir, error):
    method = "reload" if isinstance(error, RefreshError) else "upload_from_string"
    calls = _faults(held, method, [error], forever=True)
    _wait_for(lambda: len(calls) >= 1, "the fault is raised")
    held.check()  # a failed renewal alone does not end the lease
    _wait_for(lambda: held.lost() is not None, "the lease ends", timeout=10 * STALE)
    assert len(calls) >= 3, "the lease ended without renewals being tried again"
    with pytest.raises(ConfigError) as stopped:
        held.check()
    message = str(stopped.value)
    assert message.startswith(f"workdir {gcs_dir} is no longer this run's ({gcs_dir}/")
    assert re.search(r"its last renewal was [\d.]+ s ago, more than half of the 2 s after which "
                     rf"another run may take it over; last error: {type(error).__name__}: ",
                     message)  # fmt: skip
    assert message.endswith("); stopping without saving")


def test_a_refused_renewal_ends_the_lease_at_once(held, gcs_dir, capsys):
    calls = _faults(held, "upload_from_string", [Forbidden("no storage.objects.delete")],
                    forever=True)  # fmt: skip
    _wait_for(lambda: held.lost() is not None, "the lease ends")
    with pytest.raises(ConfigError, match=r"renewing it failed \(Forbidden: 403 no storage"):
        held.check()
    time.sleep(5 * BEAT)
    assert len(calls) == 1, "renewals went on after a 403"
    assert "is no longer this run's: renewing it failed (Forbidden: 403" in capsys.readouterr().err


def test_a_heartbeat_that_stops_on_an_unexpected_error_ends_the_lease(held, gcs_dir, capsys):
    def broken() -> None:
        raise KeyboardInterrupt  # escapes every handler of a renewal

    held._renew = broken
    _wait_for(lambda: held.lost() is not None, "the lease ends")
    with pytest.raises(ConfigError, match=r"its heartbeat stopped on an error \(KeyboardInter"):
        held.check()
    assert "its heartbeat stopped on an error (KeyboardInterrupt)" in capsys.readouterr().err


def test_a_holder_whose_heartbeat_thread_is_gone_is_no_longer_held(held, gcs_dir):
    held._stop.set()  # the thread ends without a word, as a killed thread would
    held._thread.join()
    with pytest.raises(ConfigError, match=r"\(.*lease\.json: its heartbeat has stopped\)"):
        held.check()


# ------------------------------------------------------------------------ a local workdir


def test_a_local_workdir_is_locked_and_one_refused_before_writing_is_not_left_behind(tmp_path):
    workdir = tmp_path / "runs" / "run"
    with pytest.raises(RuntimeError), one_run_per_workdir(workdir):
        assert (workdir / ".lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}\n"
        in_use = rf"workdir {workdir} is in use by another run \(pid"
        with pytest.raises(ConfigError, match=in_use), one_run_per_workdir(workdir):
            pass
        raise RuntimeError("refused on bad input")
    assert not (tmp_path / "runs").exists()

    workdir.mkdir(parents=True)  # a directory that was there before stays
    with pytest.raises(RuntimeError), one_run_per_workdir(workdir):
        raise RuntimeError("refused on bad input")
    assert workdir.is_dir()
    with one_run_per_workdir(workdir):
        (workdir / "config.json").write_text("{}")
    assert sorted(p.name for p in workdir.iterdir()) == [".lock", "config.json"]
