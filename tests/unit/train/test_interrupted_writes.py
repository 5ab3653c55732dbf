"""Directories written file by file are marked complete by the file their readers check, written
last: a copy cut short between files is redone, never loaded."""

from __future__ import annotations

import filecmp
import json

import pytest
from etils import epath

from guided_jax import weights
from guided_jax.data.tokenizer import CONFIG_FILE
from guided_jax.train.inputs import prepare
from guided_jax.weights import hf
from guided_jax.weights.hf import export, read_hf_dir

CASED = "The Cat and the CAT sat on Mats."


def test_a_tokenizer_copy_cut_short_is_trained_again(tiny_config, tmp_path):
    """Cut after vocab.txt, a cased WordPiece would load with do_lower_case's default (True)
    and re-tokenize everything lowercased; the rerun trains it again instead."""
    tiny_config.data.update(tokenizer_kind="wordpiece", tokenizer_vocab_size=200)
    workdir = tmp_path / "run"
    first = prepare(tiny_config, workdir)
    saved = json.loads((workdir / "tokenizer" / CONFIG_FILE).read_text())
    assert saved["do_lower_case"] is False
    (workdir / "tokenizer" / CONFIG_FILE).unlink()  # preempted before the last file

    again = prepare(tiny_config, workdir)
    assert json.loads((workdir / "tokenizer" / CONFIG_FILE).read_text()) == saved
    for tokenizer in (first.tokenizer, again.tokenizer):  # both keep the case
        assert tokenizer.encode_batch([CASED]) != tokenizer.encode_batch([CASED.lower()])


def test_an_export_cut_short_is_refused_and_redone(tiny_run, tmp_path, monkeypatch):
    loaded = weights.load(tiny_run)
    model, tokenizer = loaded.model, loaded.tokenizer
    complete = export(model, tokenizer, tmp_path / "complete")
    out = tmp_path / "out"
    written = epath.Path.write_bytes

    def cut_after_the_vocabulary(path, data):
        written(path, data)
        if path.name == "vocab.json":
            raise OSError("preempted")

    monkeypatch.setattr(epath.Path, "write_bytes", cut_after_the_vocabulary)
    with pytest.raises(OSError, match="preempted"):
        export(model, tokenizer, out)
    monkeypatch.undo()
    assert (out / hf.WEIGHTS_FILE).is_file() and not (out / "config.json").exists()
    with pytest.raises(ValueError, match=r"has no config\.json"):
        read_hf_dir(out)  # refused, never half loaded

    export(model, tokenizer, out)  # the guard takes its own partial export and redoes it
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in complete.iterdir())
    assert all(filecmp.cmp(out / p.name, p, shallow=False) for p in complete.iterdir())
