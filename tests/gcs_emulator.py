"""A local Cloud Storage for tests: gcp-storage-emulator's in-memory server on a free port of
localhost, and the environment that points gcsfs, google-cloud-storage and TensorStore at it
(set before any of them makes a client, inherited by CLI subprocesses). Nothing reaches the
network.

What the emulator does not do, and real GCS does, :func:`start` adds:
* write, read and delete preconditions: a request with ``ifGenerationMatch`` (0: "the object
  must not exist") that the object's current generation does not match gets 412, as on GCS,
  so a lease's atomic create and takeover are tested as they run there;
* the ``x-goog-generation`` header with an object's bytes. TensorStore needs it to re-read an
  OCDBT manifest it wrote (without it: "Malformed StorageGeneration").

And for fault tests, :func:`lose_responses` makes writes of an object succeed but drop their
response, as a connection reset does, so that the client retries a write that already landed.

It serves one request at a time (so a precondition and the write it guards are atomic), and
renames (moveTo) are slow: nothing here renames.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from http import HTTPStatus

BUCKET = "guided-jax-test"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


_LOST: dict[str, int] = {}  # object name -> writes whose response is dropped


def lose_responses(name: str, count: int = 1) -> None:
    """The next ``count`` successful writes of object ``name`` land but send no response."""
    _LOST[name] = _LOST.get(name, 0) + count


def _object_name(request, storage) -> str | None:
    """The object a request reads or writes (None where the request does not say)."""
    from gcp_storage_emulator.exceptions import NotFound

    if "object_id" in (request.params or {}):
        return request.params["object_id"]
    if "upload_id" in request.query:
        with contextlib.suppress(NotFound):
            return storage.get_resumable_file_obj(request.query["upload_id"][0])["name"]
        return None
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict):
        return (data.get("meta") or data).get("name")
    return None


def _precondition_failed(request, response, storage, name: str | None) -> bool:
    """Answers 412, as GCS does, when ``ifGenerationMatch`` names another generation than the
    object's (0 when it does not exist)."""
    from gcp_storage_emulator.exceptions import NotFound

    wanted = request.query.get("ifGenerationMatch")
    if not wanted or name is None:
        return False
    try:
        current = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
    except NotFound:
        current = "0"
    if wanted[0] == current:
        return False
    response.status = HTTPStatus.PRECONDITION_FAILED
    message = "At least one of the pre-conditions you specified did not hold."
    response.json(
        {"error": {"code": 412, "message": message,
                   "errors": [{"domain": "global", "reason": "conditionNotMet",
                               "message": message}]}}
    )  # fmt: skip
    return True


def _conditional(handler, *, write: bool = False):
    """``handler`` honouring ``ifGenerationMatch`` (and, for a write, :func:`lose_responses`)."""

    def honouring(request, response, storage, *args, **kwargs):
        asks = "ifGenerationMatch" in request.query or (write and any(_LOST.values()))
        name = _object_name(request, storage) if asks else None  # before a write finishes it
        if _precondition_failed(request, response, storage, name):
            return None
        result = handler(request, response, storage, *args, **kwargs)
        if write and response.status == HTTPStatus.OK and _LOST.get(name, 0) > 0:
            _LOST[name] -= 1
            # nothing is sent: the client sees the connection close without a response
            response.close = lambda: setattr(request._request_handler, "close_connection", True)
        return result

    return honouring


def _with_generation(download):
    """``download`` adding the object's generation to the headers of its bytes."""

    def with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        with contextlib.suppress(Exception):  # a missing object: download set 404 already
            found = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = found["generation"]
            response["x-goog-metageneration"] = found["metageneration"]

    return with_generation


def _patch_handlers() -> None:
    """Wraps the emulator's object handlers, both where its router finds them and where they
    call each other (``get`` calls ``download`` for ``alt=media``)."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    if getattr(objects, "guided_jax_patched", False):
        return
    wrapped = {
        objects.download: _conditional(_with_generation(objects.download)),
        objects.get: _conditional(objects.get),
        objects.delete: _conditional(objects.delete),
        objects.insert: _conditional(objects.insert, write=True),
        objects.upload_partial: _conditional(objects.upload_partial, write=True),
        objects.xml_upload: _conditional(objects.xml_upload, write=True),
    }
    for name in ("download", "get", "delete", "insert", "upload_partial", "xml_upload"):
        setattr(objects, name, wrapped[getattr(objects, name)])
    for _, handlers in server.HANDLERS:
        for method, handler in handlers.items():
            handlers[method] = wrapped.get(handler, handler)
    # get (alt=media) calls the module's download, which is now the wrapped one: its own
    # precondition check then sees the same generation again, which is harmless.
    objects.guided_jax_patched = True


@contextlib.contextmanager
def start() -> Iterator[str]:
    """Runs the emulator with bucket :data:`BUCKET`; yields its ``gs://`` URL."""
    url = f"http://localhost:{_free_port()}"
    settings = {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore ignores the variable above
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        # gcsfs would otherwise probe the bucket's type over gRPC, which the emulator lacks,
        # and wait a minute on every call
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    from gcp_storage_emulator.server import RequestHandler, create_server

    _patch_handlers()
    # A client killed mid-request (the kill -9 tests) leaves its connection open; without a
    # socket timeout the single-threaded handler waits on it forever and every later request
    # hangs behind it.
    RequestHandler.timeout = 5
    server = create_server(
        "localhost", int(url.rsplit(":", 1)[1]), in_memory=True, default_bucket=BUCKET
    )
    server.start()
    try:
        yield f"gs://{BUCKET}"
    finally:
        server.stop()  # its thread is not a daemon
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
