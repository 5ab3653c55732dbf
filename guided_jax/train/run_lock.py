"""One run per workdir: a second run on the same workdir would interleave metrics and race for
checkpoints, so process 0 holds the workdir while it trains.

* On a local or mounted filesystem: an exclusive ``flock`` on ``WORKDIR/.lock``, released by
  the kernel however the process ends, so a killed run never leaves it behind.
* On Cloud Storage, which has no locks: a lease, the object ``WORKDIR/lease.json`` naming its
  owner (pid and host) with a heartbeat time that a thread renews every
  :data:`HEARTBEAT_S` seconds. It is created only if absent and renewed or taken over only at
  the generation last read (GCS preconditions ``ifGenerationMatch``), so of two runs racing
  for it exactly one wins. A lease is stale, and taken over with a message, when its heartbeat
  is older than :data:`STALE_AFTER_S` seconds or its process on this same host has ended (a
  ``kill -9``, then the same command). A run whose lease was taken over stops before its next
  checkpoint instead of overwriting the new owner's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from guided_jax import storage
from guided_jax.config.resolve import ConfigError

LEASE_FILE = "lease.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class Held:
    """What holding a workdir gives the loop: :meth:`check` before writing a checkpoint."""

    def check(self) -> None:
        """Raises when the workdir is no longer this run's (a flock cannot be lost)."""


@contextlib.contextmanager
def one_run_per_workdir(workdir: str | os.PathLike, *, chief: bool = True) -> Iterator[Held]:
    """Holds ``workdir`` for the body (only the ``chief`` process takes it)."""
    if not chief:
        yield Held()
    elif storage.is_remote(workdir):
        with ObjectLease(workdir) as lease:
            yield lease
    else:
        with _file_lock(workdir):
            yield Held()


@contextlib.contextmanager
def _file_lock(workdir: str | os.PathLike) -> Iterator[None]:
    with open(os.path.join(workdir, ".lock"), "a+") as lock:
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
        yield


def _owner() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def _process_ended(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class ObjectLease(Held):
    """The lease ``WORKDIR/lease.json`` on Cloud Storage (see the module docstring).

    ``heartbeat_s`` and ``stale_after_s`` default to the documented :data:`HEARTBEAT_S` and
    :data:`STALE_AFTER_S`."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ) -> None:
        from google.cloud import storage as gcs  # the gcs extra, checked with the workdir

        self.workdir = os.fspath(workdir).rstrip("/")
        bucket, _, prefix = self.workdir[len(storage.GCS) :].partition("/")
        self.url = f"{self.workdir}/{LEASE_FILE}"
        self._blob = gcs.Client().bucket(bucket).blob(f"{prefix}/{LEASE_FILE}".lstrip("/"))
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.token = uuid.uuid4().hex
        self.lost_to: str | None = None  # the owner that took the lease over, if one did
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="guided_jax-lease", daemon=True)

    # ---------------------------------------------------------------------------- the object

    def _record(self, acquired: float | None = None) -> str:
        now = time.time()
        return json.dumps(
            {
                "owner": _owner(),
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "token": self.token,
                "acquired": acquired if acquired is not None else now,
                "heartbeat": now,
            }
        )

    def _write(self, generation: int, acquired: float | None = None) -> None:
        """Writes this run's record if the object is still at ``generation`` (0: absent)."""
        self._blob.upload_from_string(
            self._record(acquired), content_type="application/json", if_generation_match=generation
        )

    def _read(self) -> tuple[dict[str, Any] | None, int]:
        """The current record and its generation; ``(None, 0)`` when there is none."""
        from google.api_core.exceptions import NotFound

        try:
            self._blob.reload()
            generation = int(self._blob.generation)
            data = self._blob.download_as_bytes(if_generation_match=generation)
        except NotFound:
            return None, 0
        try:
            record = json.loads(data)
            if not isinstance(record, dict) or not {"owner", "pid", "host", "heartbeat"} <= set(
                record
            ):
                raise ValueError
        except ValueError:
            raise ConfigError(
                f"{self.url} is not a guided_jax lease (expected JSON with owner, pid, host and "
                f"heartbeat); delete it if no run uses workdir {self.workdir}"
            ) from None
        return record, generation

    def _stale(self, held: dict[str, Any]) -> str | None:
        """Why ``held`` may be taken over, or None while its run is alive."""
        age = time.time() - float(held["heartbeat"])
        if age > self.stale_after_s:
            return f"its last heartbeat was {age:.0f} s ago, more than {self.stale_after_s:.0f} s"
        if held["host"] == socket.gethostname() and _process_ended(int(held["pid"])):
            return "its process on this host has ended"
        return None

    # --------------------------------------------------------------------------- the protocol

    def acquire(self) -> None:
        """Creates the lease, or takes over a stale one; refuses a live one, naming its owner."""
        from google.api_core.exceptions import PreconditionFailed

        for _ in range(3):  # the object may change between the read and the write
            held, generation = self._read()
            why = None if held is None else self._stale(held)
            if held is not None and why is None:
                age = time.time() - float(held["heartbeat"])
                raise ConfigError(
                    f"workdir {self.workdir} is in use by another run ({held['owner']}, last "
                    f"heartbeat {age:.0f} s ago, per {self.url}); wait for it to end or use "
                    f"another --workdir (a lease is taken over once its heartbeat is "
                    f"{self.stale_after_s:.0f} s old)"
                )
            try:
                self._write(generation)  # generation 0: only if there is still none
            except PreconditionFailed:
                continue  # another run wrote it since: read who
            if held is not None:
                print(f"took over the lease of workdir {self.workdir} from {held['owner']}: {why}")
            break
        else:
            raise ConfigError(f"workdir {self.workdir}: {self.url} kept changing; try again")
        self._thread.start()

    def _beat(self) -> None:
        """Renews the heartbeat until released; notes when another run owns the lease."""
        from google.api_core.exceptions import GoogleAPIError

        while not self._stop.wait(self.heartbeat_s):
            try:
                held, generation = self._read()
                if held is None or held.get("token") != self.token:
                    self.lost_to = held["owner"] if held else "nobody (the lease was deleted)"
                    return
                self._write(generation, acquired=held.get("acquired"))
            except (GoogleAPIError, ConfigError, OSError):
                continue  # a failed renewal is retried at the next beat

    def check(self) -> None:
        if self.lost_to is not None:
            raise ConfigError(
                f"workdir {self.workdir} was taken over by {self.lost_to} (this run's heartbeat "
                f"in {self.url} went stale); stopping without saving over that run"
            )

    def release(self) -> None:
        """Stops the heartbeat and deletes the lease if it is still this run's."""
        from google.api_core.exceptions import GoogleAPIError

        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(GoogleAPIError, ConfigError):
            held, generation = self._read()
            if held is not None and held.get("token") == self.token:
                self._blob.delete(if_generation_match=generation)

    def __enter__(self) -> ObjectLease:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
