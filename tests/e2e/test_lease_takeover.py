"""Losing a ``gs://`` workdir's lease while training (tests/gcs_emulator.py stands in for Cloud
Storage): the run that lost it stops before its next write without saving and says why, the
new owner's checkpoints are the only ones written after the takeover, and in a multi-process
run every process learns process 0's verdict before a save."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import pytest
from google.api_core.exceptions import NotFound, PreconditionFailed, ServiceUnavailable
from google.cloud import storage as gcs

from conftest import REPO, cli_env, run_config
from guided_jax.config.resolve import ConfigError
from guided_jax.train import loop, metrics, run_lock
from guided_jax.train.metrics import read_metrics
from guided_jax.train.run_lock import LEASE_FILE, ObjectLease
from guided_jax.weights.workdir import checkpoint_steps

pytestmark = pytest.mark.slow

OLD_HOST = "old-host"  # where the run that loses the lease runs, as its lease says
STALE = 8.0  # the old run fences itself after STALE / 2 without a renewal


def _lease(workdir: str) -> dict | None:
    """The lease's record (None: no lease), read at the generation just looked up."""
    bucket, _, prefix = workdir[len("gs://") :].partition("/")
    blob = gcs.Client().bucket(bucket).blob(f"{prefix}/{LEASE_FILE}")
    for _ in range(50):
        try:
            blob.reload()
            return json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
        except NotFound:
            return None
        except PreconditionFailed:
            time.sleep(0.01)
    raise AssertionError(f"{workdir}/{LEASE_FILE} could not be read at a stable generation")


class _Takeover:
    """Watches both runs: which lease wrote when, which run saved which step when. The old run
    waits after its first save until the new one has taken its lease over; from the moment
    that save ends, GCS refuses the old run's renewals (as it would refuse a run that lost
    its permissions, or one frozen or cut off for longer than the staleness). Every metrics
    object either run tries to store is noted with the run and the time."""

    def __init__(self, monkeypatch) -> None:
        self.leases: dict[str, ObjectLease] = {}
        self.taken_over_at: float | None = None
        self.saves: list[tuple[str, int, float]] = []  # (run, step, when the save began)
        self.stored: list[tuple[str, str, float]] = []  # (run, metrics object, when tried)
        self.old_saved, self.go_on, self.renewals_fail = (threading.Event() for _ in range(3))
        machine, write, save = run_lock._machine, ObjectLease._write, loop.save
        start_background = metrics._Background.__init__

        def where() -> dict:
            found = machine()
            return {**found, "host": OLD_HOST} if _run() == "old" else found

        def write_lease(lease: ObjectLease, generation: int) -> None:
            self.leases.setdefault(lease.machine["host"], lease)
            if lease.machine["host"] == OLD_HOST and self.renewals_fail.is_set():
                raise ServiceUnavailable("the old run's renewals are refused")
            write(lease, generation)
            if lease.machine["host"] != OLD_HOST and self.taken_over_at is None:
                self.taken_over_at = time.monotonic()

        def save_step(manager, step, *args, **kwargs) -> None:
            self.saves.append((_run(), step, time.monotonic()))
            save(manager, step, *args, **kwargs)
            manager.wait_until_finished()
            if _run() == "old" and not self.old_saved.is_set():
                self.renewals_fail.set()
                self.old_saved.set()
                assert self.go_on.wait(300), "the new run never took the lease over"

        def background(writer, objects, *args, **kwargs) -> None:
            run, create = _run(), objects.create  # the thread that starts it is its run's

            def noted(name: str, data: bytes) -> None:
                self.stored.append((run, name, time.monotonic()))  # tried, whatever it finds
                create(name, data)

            objects.create = noted
            start_background(writer, objects, *args, **kwargs)

        monkeypatch.setattr(metrics._Background, "__init__", background)
        monkeypatch.setattr(run_lock, "_machine", where)
        monkeypatch.setattr(ObjectLease, "_write", write_lease)
        monkeypatch.setattr(loop, "save", save_step)

    def release_the_old_run_once_it_lost(self) -> None:
        """Lets the old run go on once the new one holds the lease and the old one's
        heartbeat has seen that."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            old = self.leases.get(OLD_HOST)
            if self.taken_over_at is not None and old is not None and old._ended is not None:
                break
            time.sleep(0.01)
        self.go_on.set()


def _run() -> str:
    return "old" if threading.current_thread().name == "old-run" else "new"


def test_a_takeover_during_training_stops_the_old_run_before_it_writes_again(
    gcs_dir, run_corpus, monkeypatch, capsys
):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(run_lock, "STALE_AFTER_S", STALE)
    workdir = f"{gcs_dir}/run"
    config = run_config(run_corpus)
    config.train.update(steps=30, checkpoint_every=10, eval_every=0)
    devices = jax.devices()[:1]
    watch = _Takeover(monkeypatch)
    outcome: list = []

    def old_run() -> None:
        try:
            outcome.append(loop.train_and_evaluate(config, workdir, devices=devices))
        except BaseException as error:  # reported by the test
            outcome.append(error)

    old = threading.Thread(target=old_run, name="old-run", daemon=True)
    old.start()
    deadline = time.monotonic() + 300
    while not watch.old_saved.wait(0.1):
        assert old.is_alive() and time.monotonic() < deadline, outcome
    releaser = threading.Thread(target=watch.release_the_old_run_once_it_lost, daemon=True)
    releaser.start()
    started = time.monotonic()
    last = loop.train_and_evaluate(config, workdir, devices=devices)  # the same command, again
    old.join(timeout=300)
    assert not old.is_alive(), "the old run went on"

    # The new run waited for the lease to go STALE without a renewal, then took it over.
    owner = f"pid {os.getpid()} on {socket.gethostname()}"
    printed = capsys.readouterr().out
    assert (
        f"took over the lease of workdir {workdir} from pid {os.getpid()} on {OLD_HOST}: its "
        f"lease went {STALE:.0f} s without a renewal\n"
    ) in printed
    assert watch.taken_over_at - started >= STALE
    # The old run stopped, saying why, and saved nothing after its first checkpoint.
    (error,) = outcome
    assert isinstance(error, ConfigError), error
    assert str(error) == (
        f"workdir {workdir} is no longer this run's ({workdir}/{LEASE_FILE}: it was taken over "
        f"by {owner}); stopping without saving"
    )
    assert [(run, step) for run, step, _ in watch.saves if run == "old"] == [("old", 10)]
    # Every save after the takeover is the new run's, and so is every checkpoint after step 10.
    after = [(run, step) for run, step, when in watch.saves if when > watch.taken_over_at]
    assert after == [("new", 20), ("new", 30)]
    assert [step for step in checkpoint_steps(workdir) if step > 10] == [20, 30]
    # The old run tried to store no metrics after the takeover (its next store refused), and
    # the new one stored its own.
    stored = {run for run, _, when in watch.stored if when > watch.taken_over_at}
    assert stored == {"new"}, watch.stored
    # One stream of records: the old run's up to its checkpoint, then the new run's.
    assert [record["step"] for record in read_metrics(workdir)] == list(range(1, 31))
    assert last["step"] == 30
    assert _lease(workdir) is None  # released by its owner


_PROCESS = """
import pathlib, sys, time
import jax
index, port, workdir, marks = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"127.0.0.1:{port}", 2, index)
from guided_jax.config.resolve import ConfigError
from guided_jax.train import run_lock
run_lock.HEARTBEAT_S = 0.05
with run_lock.one_run_per_workdir(workdir, chief=index == 0) as held:
    run_lock.check_on_every_process(held)
    print("holding", flush=True)
    pathlib.Path(marks, f"holding.{index}").touch()
    deadline = time.monotonic() + 120
    while index == 0 and held.lost() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        run_lock.check_on_every_process(held)  # before a save
    except ConfigError as stop:
        sys.exit(f"stopped: {stop}")
    print("would save", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_every_process_stops_before_a_save_once_process_0_lost_the_lease(gcs_dir, tmp_path):
    workdir = f"{gcs_dir}/run"
    port = _free_port()
    command = [sys.executable, "-c", _PROCESS]
    processes = [
        subprocess.Popen(
            [*command, str(index), str(port), workdir, str(tmp_path)],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    try:
        deadline = time.monotonic() + 120
        # Both processes hold the run (past the first check on every process) before the
        # takeover.
        while not all((tmp_path / f"holding.{index}").exists() for index in range(2)):
            assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
            assert time.monotonic() < deadline, "the processes never held the workdir"
            time.sleep(0.05)
        held = _lease(workdir)
        assert held is not None
        bucket, _, prefix = workdir[len("gs://") :].partition("/")
        other = {**held, "owner": "pid 4242 on another-host", "token": "other"}
        gcs.Client().bucket(bucket).blob(f"{prefix}/{LEASE_FILE}").upload_from_string(
            json.dumps(other)
        )  # another run took it over
        results = [p.communicate(timeout=120) for p in processes]
    finally:
        for process in processes:
            process.kill()
    (out0, err0), (out1, err1) = results
    assert [p.returncode for p in processes] == [1, 1], (err0[-2000:], err1[-2000:])
    for out in (out0, out1):  # (stdout also has the collectives library's own lines)
        assert "holding" in out.splitlines() and "would save" not in out, out
    assert (
        f"stopped: workdir {workdir} is no longer this run's ({workdir}/{LEASE_FILE}: it was "
        f"taken over by pid 4242 on another-host); stopping without saving"
    ) in err0
    assert (
        "stopped: process 0 no longer holds the workdir (its error says why); stopping "
        "without saving"
    ) in err1


@pytest.mark.parametrize("where", ["local", "gs"])
def test_a_run_refused_the_workdir_writes_nothing_there(where, gcs_dir, tmp_path, run_corpus):
    """The workdir is taken before the run's config, tokenizer or data are written to it."""
    workdir = f"{gcs_dir}/run" if where == "gs" else str(tmp_path / "run")
    config = run_config(run_corpus)
    with run_lock.one_run_per_workdir(workdir):  # another run of this host holds it
        with pytest.raises(ConfigError, match=r"is in use by another run \(pid \d+ on "):
            loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
        if where == "gs":
            bucket, _, prefix = workdir[len("gs://") :].partition("/")
            names = [b.name for b in gcs.Client().list_blobs(bucket, prefix=f"{prefix}/")]
            assert names == [f"{prefix}/{LEASE_FILE}"]
        else:
            assert os.listdir(workdir) == [".lock"]
