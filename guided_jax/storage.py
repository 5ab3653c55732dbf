"""Where a run's files live: a local (or mounted) directory, or a Cloud Storage prefix
``gs://bucket/path``.

Paths go through :func:`as_path` (``etils.epath``: the local filesystem, or gcsfs for
``gs://``); orbax and TensorStore write checkpoints to either themselves. What only reads
local files (memory-mapped token blocks, the ``tokenizers`` file loaders) reads a copy that
:func:`local_copy` keeps under the temporary directory. Objects cannot be appended to, and
renaming one is a copy: writers on ``gs://`` rewrite whole objects and mark an entry complete
by the object they write last.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pathlib
import shutil
import tempfile

from etils import epath

GCS = "gs://"
# Local copies of gs:// directories (token cache entries, tokenizers), keyed by their URL.
_LOCAL_COPIES = "guided_jax_gcs"


class StorageError(ValueError):
    """A location that cannot hold a run: an unsupported URL, or gs:// without its extra."""


def is_remote(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a Cloud Storage URL."""
    return os.fspath(location).startswith(GCS)


def as_path(location: str | os.PathLike) -> epath.Path:
    """``location`` as a path that reads and writes locally or on Cloud Storage alike."""
    return epath.Path(location)


def check_location(location: str | os.PathLike, flag: str) -> None:
    """Refuses, before anything is written, what ``flag`` cannot name: another URL scheme (a
    ``pathlib`` path would make it a local folder ``s3:/bucket``), a ``gs://`` URL without a
    bucket, or ``gs://`` without gcsfs installed."""
    text = os.fspath(location)
    if "://" in text and not text.startswith(GCS):
        raise StorageError(
            f"{flag} {text!r}: expected a local path or a Cloud Storage URL gs://bucket/path"
        )
    if not text.startswith(GCS):
        return
    if not text[len(GCS) :].split("/")[0]:
        raise StorageError(f"{flag} {text!r} names no bucket; expected gs://bucket/path")
    if importlib.util.find_spec("gcsfs") is None:
        raise StorageError(
            f"{flag} {text!r} is on Cloud Storage, which needs gcsfs: pip install -e '.[gcs]'"
        )


def copy_tree(source: str | os.PathLike, destination: str | os.PathLike, *, last: str = "") -> None:
    """Copies the files under ``source`` to ``destination`` (either may be remote), streaming;
    the file named ``last`` is written after all the others (an entry's completion mark)."""
    src, dst = as_path(source), as_path(destination)
    if not (is_remote(src) or is_remote(dst)):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    for file in sorted(_files(src), key=lambda p: p.name == last):
        target = dst / file.relative_to(src)
        if not is_remote(target):
            target.parent.mkdir(parents=True, exist_ok=True)
        with file.open("rb") as reader, target.open("wb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 24)


def _files(directory: epath.Path) -> list[epath.Path]:
    """The files under ``directory``, at any depth."""
    found = []
    for entry in directory.iterdir():
        found.extend(_files(entry) if entry.is_dir() else [entry])
    return found


def local_copy_dir(location: str | os.PathLike) -> pathlib.Path:
    """Where :func:`local_copy` keeps the files of ``location`` (one directory per URL)."""
    digest = hashlib.sha256(os.fspath(location).encode()).hexdigest()[:20]
    return pathlib.Path(tempfile.gettempdir(), _LOCAL_COPIES, digest)


def local_copy(location: str | os.PathLike) -> pathlib.Path:
    """A local directory with the files of ``location``: itself when local, else a fresh copy
    (written beside it, then swapped in whole, so a reader never sees half of one)."""
    if not is_remote(location):
        return pathlib.Path(location)
    source = as_path(location)
    if not source.is_dir():
        raise FileNotFoundError(f"{os.fspath(location)!r} does not exist")
    target = local_copy_dir(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = pathlib.Path(tempfile.mkdtemp(prefix=f"{target.name}.", dir=target.parent))
    try:
        copy_tree(source, scratch)
        replace_dir(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def replace_dir(new: pathlib.Path, old: pathlib.Path) -> None:
    """Puts the local directory ``new`` at ``old``, replacing what was there. Processes that
    copy the same location at once all succeed: the copies are equal, one of them stays."""
    if old.exists():
        retired = pathlib.Path(tempfile.mkdtemp(prefix=f"{old.name}.old.", dir=old.parent))
        with contextlib.suppress(FileNotFoundError):
            os.replace(old, retired / old.name)
        shutil.rmtree(retired, ignore_errors=True)
    try:
        os.replace(new, old)
    except OSError:  # another process put its copy there first
        if not old.is_dir():
            raise
        shutil.rmtree(new, ignore_errors=True)
