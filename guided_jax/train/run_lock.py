"""One run per workdir: a second run on the same workdir would interleave metrics and race for
checkpoints, so process 0 holds the workdir from before it writes anything until it ends.

* On a local or mounted filesystem: an exclusive ``flock`` on ``WORKDIR/.lock``, released by
  the kernel however the process ends, so a killed run never leaves it behind.
* On Cloud Storage, which has no locks: a lease, the object ``WORKDIR/lease.json`` naming its
  owner, which a thread renews every :data:`HEARTBEAT_S` seconds. Every write of it is
  conditional on the generation last read (GCS preconditions ``ifGenerationMatch``, 0 for
  "absent"), so of two runs racing for it exactly one wins.

No decision compares two hosts' clocks:

* Another run calls a lease stale only when it has watched the object's generation stay the
  same for :data:`STALE_AFTER_S` seconds on its own monotonic clock. So a second run waits,
  saying so, and stops as soon as it sees a renewal, or takes the workdir over when it sees
  none (a run that died on another host, a preempted VM). A lease whose process on this very
  machine has ended (same host, boot and pid namespace, so containers that share a hostname
  are told apart) is taken over at once, and one whose process there still runs is refused at
  once: ``kill -9`` and the same command resume, the same command twice is refused.
* The holder fences itself: :meth:`ObjectLease.check`, called before every metrics write and
  every save, fails once its last successful renewal is older than half of
  :data:`STALE_AFTER_S` on its own clock, when the heartbeat thread has stopped, or when
  another run owns the object. A holder stops well before any other run may take over, even
  while GCS refuses its renewals.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from guided_jax import storage
from guided_jax.config.resolve import ConfigError
from guided_jax.train import verdict

LEASE_FILE = "lease.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
POLL_S = 5.0  # how often a waiting run looks at another run's lease (at most)
_ATTEMPTS = 5  # transient failures in a row that acquiring a lease rides out
_READS = 20  # reads that may find the object replaced between its metadata and its bytes


def _clock() -> float:
    """Seconds on a clock that never goes back and also counts time suspended, so a holder
    that was frozen or asleep finds its renewals old when it wakes."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.monotonic()


class Held:
    """What holding a workdir gives the loop: :meth:`check` before each write."""

    def lost(self) -> str | None:
        """Why the workdir is no longer this run's, or None while it is (a flock stays)."""
        return None

    def check(self) -> None:
        """Raises :class:`ConfigError` when the workdir is no longer this run's."""
        why = self.lost()
        if why is not None:
            raise ConfigError(why)


@contextlib.contextmanager
def one_run_per_workdir(workdir: str | os.PathLike, *, chief: bool = True) -> Iterator[Held]:
    """Holds ``workdir`` for the body. Only the ``chief`` process takes it; in a multi-process
    run the others wait for its verdict and stop with its reason when it could not."""
    if not chief:
        verdict.wait_for("workdir_held", "take the workdir", 2 * STALE_AFTER_S)
        yield Held()
        return
    with contextlib.ExitStack() as stack:
        with verdict.shared("workdir_held"):  # refused, or interrupted waiting out a lease
            if storage.is_remote(workdir):
                held: Held = stack.enter_context(
                    ObjectLease(workdir, heartbeat_s=HEARTBEAT_S, stale_after_s=STALE_AFTER_S)
                )
            else:
                stack.enter_context(_file_lock(workdir))
                held = Held()
        yield held


def check_on_every_process(held: Held) -> None:
    """Before a save: process 0's verdict on the workdir, raised on every process, so that
    none waits alone in the save's cross-process barrier for one that has stopped."""
    import jax

    if jax.process_count() == 1:
        held.check()
        return
    import numpy as np
    from jax.experimental import multihost_utils

    why = held.lost() if jax.process_index() == 0 else None
    lost = multihost_utils.broadcast_one_to_all(np.int32(why is not None))
    if why is not None:
        raise ConfigError(why)
    if int(lost):
        raise ConfigError(
            "process 0 no longer holds the workdir (its error says why); stopping without saving"
        )


@contextlib.contextmanager
def _file_lock(workdir: str | os.PathLike) -> Iterator[None]:
    created = _first_missing(os.path.abspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, ".lock")
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ConfigError(
                f"workdir {workdir} is in use by another run ({lock.read().strip() or 'pid ?'}); "
                f"wait for it to end or use another --workdir"
            ) from None
        lock.truncate(0)
        lock.write(f"{_owner()}\n")
        lock.flush()
        try:
            yield
        finally:  # still locked: a run refused on bad input leaves no workdir behind
            if created is not None and _holds_only(created, os.path.abspath(path)):
                shutil.rmtree(created, ignore_errors=True)


def _first_missing(path: str) -> str | None:
    """The outermost directory of ``path`` (itself included) that does not exist yet."""
    missing = None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _holds_only(directory: str, file: str) -> bool:
    found = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    return found == [file]


def _owner() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _read_proc(path: str) -> str:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot ("" when unknown): with the
    pid, it names one process, whose pid a later one may reuse."""
    stat = _read_proc(f"/proc/{pid}/stat")
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def _machine() -> dict[str, Any]:
    """Where this process runs, as far as its pid means anything: the host, the kernel's boot,
    the pid namespace (containers that share a hostname differ in it) and its start time."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "boot_id": _read_proc("/proc/sys/kernel/random/boot_id"),
        "pid_namespace": namespace,
        "pid_start": _start_time(os.getpid()),
    }


def _on_this_machine(record: dict[str, Any], machine: dict[str, Any]) -> bool:
    """Whether ``record``'s pid names a process of this machine's pid namespace."""
    keys = ("host", "boot_id", "pid_namespace")
    return all(machine[k] and record.get(k) == machine[k] for k in keys)


def _process_ended(pid: int, start: str) -> bool:
    """Whether process ``pid`` that started at ``start`` has ended (its pid may be reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return bool(start) and _start_time(pid) not in ("", start)


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def _permanent(error: BaseException) -> bool:
    """A failure that trying again will not mend: refused permissions, a bad request. Others
    (429, 5xx, timeouts, dropped connections, token refreshes, a 412 lost to a race) may."""
    from google.api_core.exceptions import ClientError

    return isinstance(error, ClientError) and error.code not in (408, 409, 412, 429)


def _warn(message: str) -> None:
    sys.stderr.write(f"guided_jax: {message}\n")
    sys.stderr.flush()


class ObjectLease(Held):
    """The lease ``WORKDIR/lease.json`` on Cloud Storage (see the module docstring).

    The defaults are :data:`HEARTBEAT_S`, :data:`STALE_AFTER_S` and :data:`POLL_S`, read when
    the lease is made."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        heartbeat_s: float | None = None,
        stale_after_s: float | None = None,
        poll_s: float | None = None,
    ) -> None:
        from google.cloud import storage as gcs  # the gcs extra, checked with the workdir

        self.workdir = os.fspath(workdir).rstrip("/")
        bucket, _, prefix = self.workdir[len(storage.GCS) :].partition("/")
        self.url = f"{self.workdir}/{LEASE_FILE}"
        self._blob = gcs.Client().bucket(bucket).blob(f"{prefix}/{LEASE_FILE}".lstrip("/"))
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.stale_after_s = STALE_AFTER_S if stale_after_s is None else stale_after_s
        self.poll_s = min(POLL_S, self.stale_after_s / 20) if poll_s is None else poll_s
        self.token = uuid.uuid4().hex
        self.machine = _machine()
        self._acquired_at = time.time()  # for people reading the record only
        self._renewed: float | None = None  # _clock() before the last write that succeeded
        self._last_error: str | None = None  # of the renewals since then
        self._ended: str | None = None  # why the lease is no longer this run's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="guided_jax-lease", daemon=True)

    # ---------------------------------------------------------------------------- the object

    def _record(self) -> str:
        return json.dumps(
            {
                "owner": f"pid {self.machine['pid']} on {self.machine['host']}",
                **self.machine,
                "token": self.token,
                "stale_after_s": self.stale_after_s,
                # wall-clock times, for people: no run compares them with its own clock
                "acquired": self._acquired_at,
                "heartbeat": time.time(),
            }
        )

    def _write(self, generation: int) -> None:
        """Writes this run's record if the object is still at ``generation`` (0: absent)."""
        self._blob.upload_from_string(
            self._record(), content_type="application/json", if_generation_match=generation
        )

    def _read(self) -> tuple[dict[str, Any] | None, int]:
        """The current record and its generation; ``(None, 0)`` when there is none. The bytes
        are read at the generation just looked up: a read that found the object replaced in
        between (412) reads again."""
        from google.api_core.exceptions import NotFound, PreconditionFailed

        for _ in range(_READS):
            try:
                self._blob.reload()
                generation = int(self._blob.generation)
                data = self._blob.download_as_bytes(if_generation_match=generation)
            except NotFound:
                return None, 0
            except PreconditionFailed:
                continue
            return self._parse(data), generation
        raise PreconditionFailed(f"{self.url} was replaced during each of {_READS} reads")

    def _parse(self, data: bytes) -> dict[str, Any]:
        try:
            record = json.loads(data)
            if not isinstance(record, dict) or not {"owner", "pid", "host"} <= set(record):
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"{self.url} is not a guided_jax lease (expected JSON with owner, pid and "
                f"host); delete it if no run uses workdir {self.workdir}"
            ) from None
        return record

    # ------------------------------------------------------------------------------ acquiring

    def acquire(self) -> None:
        """Creates the lease, or takes over one whose run has ended; refuses a live one,
        naming its owner. Waits (saying so) while that takes watching the lease."""
        from google.api_core.exceptions import PreconditionFailed

        watched: tuple[int, float] | None = None  # (generation, since) of another run's lease
        wrote: float | None = None  # _clock() when this run's latest write began
        failures = 0
        while True:
            try:
                held, generation = self._read()
                if held is not None and held.get("token") == self.token:
                    break  # this run's own write, whose response was lost (its retry got a 412)
                why = None
                if held is not None:
                    why, watched = self._judge(held, generation, watched)
                    if why is None:
                        failures = 0
                        time.sleep(self.poll_s)
                        continue
                wrote = _clock()
                self._write(generation)  # generation 0: only if there is still none
                if held is not None:
                    print(
                        f"took over the lease of workdir {self.workdir} from {held['owner']}: {why}"
                    )
                break
            except ConfigError:
                raise
            except PreconditionFailed as error:  # changed since it was read: read who has it
                failures = self._acquire_failed(error, failures, wait=False)
            except Exception as error:
                failures = self._acquire_failed(error, failures, wait=True)
        self._renewed = wrote
        self._thread.start()

    def _judge(
        self, held: dict[str, Any], generation: int, watched: tuple[int, float] | None
    ) -> tuple[str | None, tuple[int, float] | None]:
        """Why another run's lease may be taken over now (None: not yet), and what is being
        watched; raises when it is live."""
        if _on_this_machine(held, self.machine):
            if _process_ended(int(held["pid"]), str(held.get("pid_start", ""))):
                return "its process on this host has ended", watched
            self._refuse(held, "its process is running on this host")
        stale_after = max(self.stale_after_s, float(held.get("stale_after_s", 0)))
        if watched is None:
            print(
                f"workdir {self.workdir} is held by {held['owner']} (per {self.url}); waiting "
                f"up to {stale_after:.0f} s for its next renewal: without one, its run has "
                f"ended and this run takes the workdir over"
            )
            return None, (generation, _clock())
        if watched[0] != generation:
            self._refuse(held, "its lease was renewed while this run waited")
        if _clock() - watched[1] >= stale_after:
            return f"its lease went {stale_after:.0f} s without a renewal", watched
        return None, watched

    def _refuse(self, held: dict[str, Any], evidence: str) -> None:
        raise ConfigError(
            f"workdir {self.workdir} is in use by another run ({held['owner']}, {evidence}, "
            f"per {self.url}); wait for it to end or use another --workdir (a lease is taken "
            f"over once it goes {self.stale_after_s:.0f} s without a renewal, or at once when "
            f"its process on this host has ended)"
        )

    def _acquire_failed(self, error: Exception, failures: int, *, wait: bool) -> int:
        """Counts a failed request while acquiring; raises once retrying is pointless."""
        failures += 1
        if _permanent(error) or failures >= _ATTEMPTS:
            raise ConfigError(
                f"workdir {self.workdir}: could not take the lease {self.url} "
                f"({_describe(error)}); a run needs to read, create and overwrite objects "
                f"there (roles/storage.objectUser on the bucket)"
            ) from error
        if wait:
            time.sleep(self.poll_s)
        return failures

    # ------------------------------------------------------------------------------- holding

    def _beat(self) -> None:
        """Renews the lease until released. A renewal that may succeed later (429, 5xx, a
        timeout, a token refresh, a 412 lost to a race) is logged and tried again at the next
        beat: the fence in :meth:`lost` ends the lease if none succeeds in time. A refused
        renewal (403), a lease now another run's, or anything that escapes a renewal ends the
        lease at once. Each is logged."""
        try:
            while not self._stop.wait(self.heartbeat_s) and self._ended is None:
                self._renew()
        except BaseException as error:
            self._end(f"its heartbeat stopped on an error ({_describe(error)})")

    def _renew(self) -> None:
        attempt = _clock()
        try:
            held, generation = self._read()
            if held is None or held.get("token") != self.token:
                owner = held["owner"] if held else "nobody (the lease was deleted)"
                self._end(f"it was taken over by {owner}")
                return
            self._write(generation)
        except ConfigError as error:
            self._end(str(error))
            return
        except Exception as error:
            if _permanent(error):
                self._end(f"renewing it failed ({_describe(error)})")
                return
            self._last_error = _describe(error)
            _warn(
                f"renewing the lease {self.url} failed ({self._last_error}); trying again "
                f"in {self.heartbeat_s:g} s"
            )
            return
        self._renewed, self._last_error = attempt, None

    def _end(self, why: str) -> None:
        if self._ended is None:
            self._ended = why
            if not self._stop.is_set():
                _warn(f"the lease {self.url} is no longer this run's: {why}")

    def lost(self) -> str | None:
        why = self._ended
        if why is None and self._renewed is not None:
            age = _clock() - self._renewed
            if age > self.stale_after_s / 2:
                error = f"; last error: {self._last_error}" if self._last_error else ""
                why = (
                    f"its last renewal was {age:.0f} s ago, more than half of the "
                    f"{self.stale_after_s:.0f} s after which another run may take it over{error}"
                )
        if why is None and not self._thread.is_alive():
            why = "its heartbeat has stopped" if self._renewed is not None else "never taken"
        if why is None:
            return None
        return (
            f"workdir {self.workdir} is no longer this run's ({self.url}: {why}); stopping "
            f"without saving"
        )

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease if it is still this run's (if that fails,
        the next run waits for the lease to go stale)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            held, generation = self._read()
            if held is not None and held.get("token") == self.token:
                self._blob.delete(if_generation_match=generation)
        except Exception as error:  # the run's own outcome matters more than this
            _warn(f"could not delete the lease {self.url} ({_describe(error)})")

    def __enter__(self) -> ObjectLease:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
