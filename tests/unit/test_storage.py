"""Runs on Cloud Storage (guided_jax.storage), against a local emulator: which locations a flag
takes, copies that mark completion last, local copies of ``gs://`` directories, and a run's
inputs prepared in a ``gs://`` workdir and read back by another process."""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile

import numpy as np
import pytest
from etils import epath
from google.cloud import storage as gcs

from guided_jax import storage
from guided_jax.data import token_cache
from guided_jax.data.text import CorpusError
from guided_jax.storage import StorageError, check_location, copy_tree, local_copy
from guided_jax.train.inputs import prepare


@pytest.fixture
def own_tempdir(tmp_path, monkeypatch):
    """Local copies (and every other temporary file) of the test under its tmp_path."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def test_a_flag_takes_local_paths_and_gs_urls_only(monkeypatch):
    check_location("runs/a", "--workdir")
    check_location("gs://bucket/runs/a", "--workdir")
    with pytest.raises(StorageError, match=r"^--out 's3://b/x': expected a local path or a Cloud"):
        check_location("s3://b/x", "--out")
    with pytest.raises(StorageError, match=r"^--workdir 'gs:///x' names no bucket"):
        check_location("gs:///x", "--workdir")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a)
    )
    with pytest.raises(StorageError, match=r"needs gcsfs: pip install -e '\.\[gcs\]'"):
        check_location("gs://bucket/runs/a", "--workdir")
    check_location("runs/a", "--workdir")  # local paths need nothing more


def test_copies_write_the_completion_mark_last_and_local_copies_follow_the_bucket(
    gcs_dir, tmp_path, own_tempdir
):
    source = tmp_path / "entry"
    (source / "sub").mkdir(parents=True)
    files = {"meta.json": b"{}", "a.bin": b"\x00\x01" * 1000, "sub/b.txt": b"text", "z": b"z"}
    for name, data in files.items():
        (source / name).write_bytes(data)
    copy_tree(source, gcs_dir, last="meta.json")
    bucket, prefix = gcs_dir[len("gs://") :].split("/", 1)
    generations = {
        blob.name[len(prefix) + 1 :]: blob.generation
        for blob in gcs.Client().bucket(bucket).list_blobs(prefix=prefix)
    }
    assert set(generations) == set(files)
    assert generations["meta.json"] > max(g for n, g in generations.items() if n != "meta.json")

    copy = local_copy(gcs_dir)
    assert copy.is_relative_to(own_tempdir)
    assert {str(p.relative_to(copy)): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == (
        files
    )
    epath.Path(gcs_dir, "z").unlink()
    epath.Path(gcs_dir, "a.bin").write_bytes(b"new")
    again = local_copy(gcs_dir)
    assert again == copy and not (copy / "z").exists() and (copy / "a.bin").read_bytes() == b"new"
    assert local_copy(tmp_path / "entry") == tmp_path / "entry"  # local: itself
    with pytest.raises(FileNotFoundError, match="missing"):
        local_copy(f"{gcs_dir}/missing")


def test_a_gs_workdir_holds_the_inputs_that_every_process_reads(
    tiny_config, gcs_dir, own_tempdir, monkeypatch
):
    first = prepare(tiny_config, gcs_dir)
    workdir = epath.Path(gcs_dir)
    assert {p.name for p in workdir.iterdir()} == {"config.json", "tokenizer", "token_cache"}
    assert json.loads((workdir / "config.json").read_text()) == json.loads(first.config.to_json())
    (entry,) = (workdir / "token_cache").iterdir()
    assert {p.name for p in entry.iterdir()} == {"blocks.bin", "meta.json"}
    stored = np.frombuffer((entry / "blocks.bin").read_bytes(), np.int32)
    np.testing.assert_array_equal(
        stored.reshape(-1, tiny_config.data.block_size),
        np.concatenate([first.train_blocks, first.eval_blocks]),
    )

    # Another host: no local copies, reads what process 0 wrote, tokenizes nothing.
    shutil.rmtree(own_tempdir)
    own_tempdir.mkdir()

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(token_cache, "build", no_tokenizing)
    other = prepare(tiny_config, gcs_dir, write=False)
    np.testing.assert_array_equal(other.train_blocks, first.train_blocks)
    np.testing.assert_array_equal(other.eval_blocks, first.eval_blocks)
    assert other.tokenizer.encode_batch(["a cat sees"]) == first.tokenizer.encode_batch(
        ["a cat sees"]
    )
    assert other.tokenizer.directory.is_relative_to(own_tempdir)

    # A damaged entry in the bucket is named, not trained on.
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta, "num_blocks": meta["num_blocks"] + 1}))
    with pytest.raises(CorpusError, match=rf"token cache '{entry}' is damaged"):
        token_cache.load(str(entry))
    assert storage.is_remote(entry)
