"""The GLUE setup command the docs give, ``tfds build glue/cola --file_format=array_record``, run
as a user runs it (a fresh process) on a local glue/cola builder with a few rows of our own
(tests/fixtures/tfds_glue, no network), writes what fine-tuning reads: the builder's rows.
Without ``--file_format=array_record`` TFDS writes TFRecord, which fine-tuning refuses in one line
naming the directory and the command that fixes it; the command in each GLUE error works as
written.

The ``tfds`` script needs TensorFlow, Apache Beam and mlcroissant to start; tests/tfds_build.py
runs it where they are installed and, elsewhere, its ``build`` command with the same arguments."""

import re
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from guided_jax.config import load_config
from guided_jax.data.tables import GLUE_TASKS, FinetuneError, Task, load_task

FIXTURES = REPO / "tests" / "fixtures" / "tfds_glue"
BUILDER = FIXTURES / "glue"  # TFDS's glue/cola reading CoLA/*.tsv beside it
TFRECORD = FIXTURES / "tfrecord"  # what `tfds build glue/cola` writes without the flag
DOCS = ("README.md", "configs/finetune.py", "docs/REPRODUCING.md")
DOCUMENTED = re.compile(r"tfds build glue/[^`\n]*")
IN_ERROR = re.compile(r"`(tfds build [^`]*)`")
SPLITS = ("test", "train", "validation")  # GLUE's, sorted


def _documented(doc: str) -> list[list[str]]:
    """The ``tfds build glue/...`` command lines in ``doc``, split as a shell splits them."""
    return [shlex.split(command) for command in DOCUMENTED.findall((REPO / doc).read_text())]


def _build(command: list[str], *extra: str) -> None:
    """``command`` (``tfds build glue/cola ...``) run in a fresh process, on the local builder."""
    assert command[:3] == ["tfds", "build", "glue/cola"], command
    argv = ["build", str(BUILDER), *command[3:], *extra]
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "tfds_build.py"), *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _read_cola(data_dir) -> Task:
    """glue/cola as fine-tuning reads it from ``data_dir``."""
    config = load_config(str(REPO / "configs" / "finetune.py"))
    config.task = "glue/cola"
    config.data.tfds_data_dir = str(data_dir)
    return load_task(config)


def _tsv_rows(file_name: str) -> list[tuple[str, int]]:
    """(sentence, label) of a CoLA TSV without a header (source, label, mark, sentence), sorted."""
    lines = (BUILDER / "CoLA" / file_name).read_text(encoding="utf-8").splitlines()
    return sorted((line.split("\t")[3], int(line.split("\t")[1])) for line in lines)


def _rows(*splits) -> list[tuple[str, int]]:
    return sorted(
        (text, label)
        for split in splits
        for (text,), label in zip(split.texts, split.labels.tolist(), strict=True)
    )


def _assert_reads_the_builders_rows(data_dir) -> None:
    task = _read_cola(data_dir)
    # fine-tuning holds validation out of GLUE's train split and scores on its validation split
    assert _rows(task.train, task.validation) == _tsv_rows("train.tsv")
    assert _rows(task.eval) == _tsv_rows("dev.tsv")
    assert len(task.validation) == 1 and task.label_names == ["0", "1"]


def _error_command(message: str) -> list[str]:
    assert "\n" not in message, message
    (command,) = IN_ERROR.findall(message)
    return shlex.split(command)


def test_every_documented_glue_command_writes_array_record():
    for doc in DOCS:
        commands = _documented(doc)
        assert commands, f"{doc} gives no `tfds build glue/...` command"
        for command in commands:
            assert command[:2] == ["tfds", "build"], (doc, command)
            assert command[2].removeprefix("glue/") in GLUE_TASKS, (doc, command)
            assert "--file_format=array_record" in command[3:], (doc, command)
            others = [a for a in command[3:] if a != "--file_format=array_record"]
            assert all(a.startswith("--data_dir=") for a in others), (doc, command)


def test_the_readme_command_builds_what_finetune_reads(tmp_path):
    [command] = _documented("README.md")
    assert not any(a.startswith("--data_dir") for a in command)  # TFDS's default: ours is tmp
    _build(command, f"--data_dir={tmp_path}")
    shards = sorted(p.name for p in (tmp_path / "glue" / "cola" / "2.0.0").glob("glue-*"))
    assert shards == [f"glue-{split}.array_record-00000-of-00001" for split in SPLITS]
    _assert_reads_the_builders_rows(tmp_path)


def test_tfrecord_is_refused_naming_the_directory_and_the_command_that_fixes_it(tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(TFRECORD, data_dir)
    version_dir = data_dir / "glue" / "cola" / "2.0.0"
    shards = sorted(p.name for p in version_dir.glob("glue-*"))
    assert shards == [f"glue-{split}.tfrecord-00000-of-00001" for split in SPLITS]
    with pytest.raises(FinetuneError) as caught:
        _read_cola(data_dir)
    message = str(caught.value)
    assert f"{str(version_dir)!r} holds glue/cola as tfrecord" in message
    assert "delete that directory" in message
    command = _error_command(message)
    assert command == [
        "tfds", "build", "glue/cola", f"--data_dir={data_dir}", "--file_format=array_record"
    ]  # fmt: skip
    shutil.rmtree(version_dir)
    _build(command)
    _assert_reads_the_builders_rows(data_dir)


def test_unprepared_glue_names_the_command_that_prepares_it(tmp_path):
    data_dir = tmp_path / "nothing here"  # a space: the command quotes it
    with pytest.raises(FinetuneError) as caught:
        _read_cola(data_dir)
    message = str(caught.value)
    assert f"glue/cola is not prepared in {str(data_dir)!r}" in message
    assert "set data.tfds_data_dir" in message
    command = _error_command(message)
    assert command == [
        "tfds", "build", "glue/cola", f"--data_dir={data_dir}", "--file_format=array_record"
    ]  # fmt: skip
    _build(command)
    _assert_reads_the_builders_rows(data_dir)
