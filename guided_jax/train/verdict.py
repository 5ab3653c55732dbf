"""Process 0's word to the others. In a run of several processes only process 0 takes the
workdir and prepares its files; the others wait for its verdict in JAX's coordination service
(a key-value store, not a collective, which would time out or hang while process 0 waits out
another run's lease or tokenizes the corpus) and, when it failed, stop with its reason instead
of a timeout in a barrier."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from guided_jax.config.resolve import ConfigError

OK = ""


def _client() -> Any:
    """JAX's coordination client when this process is one of several, else None."""
    from orbax.checkpoint import multihost

    if not multihost.is_jax_distributed_client_initialized():
        return None
    return multihost.get_jax_distributed_client()


@contextlib.contextmanager
def shared(key: str) -> Iterator[None]:
    """Process 0, around the work: ``key`` done when the body ends, or failed with the first
    line of what it raised (raised on here too)."""
    try:
        yield
    except BaseException as error:
        _share(key, (str(error).splitlines() or [""])[0] or type(error).__name__)
        raise
    _share(key, OK)


def _share(key: str, why: str) -> None:
    client = _client()
    if client is not None:
        client.key_value_set(f"guided_jax/{key}", why)


def wait_for(key: str, what: str, timeout_s: float) -> None:
    """The other processes: returns once process 0 shared ``key`` as done; raises
    :class:`ConfigError` "process 0 could not ``what``: its reason" when it failed."""
    client = _client()
    if client is None:
        return
    why = client.blocking_key_value_get(f"guided_jax/{key}", int(timeout_s * 1000))
    if why != OK:
        raise ConfigError(f"process 0 could not {what}: {why}")
