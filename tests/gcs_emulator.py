"""A local Cloud Storage for tests: gcp-storage-emulator's in-memory server on a free port of
localhost, and the environment that points gcsfs, google-cloud-storage and TensorStore at it
(set before any of them makes a client, inherited by CLI subprocesses). Nothing reaches the
network.

What the emulator does not do, and real GCS does:
* it ignores write preconditions (``ifGenerationMatch``), so a lease's atomic create cannot be
  shown here, only its refusal and takeover paths;
* it sends no ``x-goog-generation`` header with an object's bytes. TensorStore needs it to
  re-read an OCDBT manifest it wrote (without it: "Malformed StorageGeneration"), so
  :func:`start` adds it;
* it serves one request at a time, and renames (moveTo) are slow: nothing here renames.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

BUCKET = "guided-jax-test"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def _send_generation_headers() -> None:
    """Adds an object's generation to the headers of its download (JSON API, ``alt=media``)."""
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.download, "sends_generation", False):
        return
    download = objects.download

    def with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        with contextlib.suppress(Exception):  # a missing object: download set 404 already
            found = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = found["generation"]
            response["x-goog-metageneration"] = found["metageneration"]

    with_generation.sends_generation = True
    objects.download = with_generation


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
    from gcp_storage_emulator.server import create_server

    _send_generation_headers()
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
