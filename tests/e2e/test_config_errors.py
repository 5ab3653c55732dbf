"""A typo on the command line stops a command in one line that names it, with the closest
valid name, exit status 2 and nothing written; ``--print_config`` is a dry run."""

import json
import subprocess
import sys

import jax
import pytest

from conftest import REPO, cli_env, write_corpus
from guided_jax.config import load_config
from guided_jax.train.loop import train_and_evaluate
from guided_jax.train.lowering import plan_lowering
from guided_jax.train.plan import plan_run


def _run(command: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"guided_jax.{command}", *map(str, args)],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        (
            "main",
            ["--config", "configs/tiny.py", "--config.train.stepz=3"],
            "unknown config key train.stepz; did you mean train.steps?",
        ),
        (
            "main",
            ["--config", "configs/tiny.py", "--config.modle.hidden_size=8"],
            "unknown config key modle.hidden_size; did you mean model.hidden_size?",
        ),
        (
            "main",
            ["--config", "configs/tiny.py", "--noconfig.guidance.enabeld"],
            "unknown config key guidance.enabeld; did you mean guidance.enabled?",
        ),
        (
            "main",
            ["--config", "configs/tiny.py", "--config.zzz=1"],
            "unknown config key zzz; python -m guided_jax.main --config=configs/tiny.py "
            "--print_config lists the keys",
        ),
        (
            "main",
            ["--config", "configs/reference.py:robrta_12"],
            "--config=configs/reference.py:robrta_12: unknown model preset 'robrta_12'; did you "
            "mean roberta_12? the presets are bert_16, bert_48,",
        ),
        (
            "main",
            ["--config", "configs/no_such.py"],
            "--config=configs/no_such.py: no such config file 'configs/no_such.py'",
        ),
        (
            "main",
            ["--config", "configs/tiny.py", "--config.train.steps=abc"],
            "flag --config.train.steps=abc: invalid literal for int() with base 10: 'abc'",
        ),
        (
            "finetune",
            ["--config", "configs/finetune.py", "--config.seedz=1"],
            "unknown config key seedz; did you mean seeds?",
        ),
        (
            "reproduce",
            [
                "--config",
                "configs/tiny.py",
                "--finetune_config",
                "configs/finetune.py",
                "--finetune_config.learning_ratez=1e-3",
            ],
            "unknown finetune_config key learning_ratez; did you mean learning_rates?",
        ),
    ],
)
def test_a_bad_config_is_one_line_naming_it(tmp_path, command, args, expected):
    workdir = tmp_path / "run"
    flag = "--pretrained" if command == "finetune" else "--workdir"
    result = _run(command, *args, flag, workdir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"guided_jax.{command}: error: {expected}"), result.stderr
    assert not workdir.exists() and result.stdout == ""


@pytest.mark.slow
def test_print_config_resolves_what_the_run_then_does(tmp_path):
    """The steps counted from epochs, the global batch and the vocabulary printed by the dry
    run are those the real run records; the dry run writes nothing."""
    corpus = write_corpus(tmp_path / "corpus.txt", lines=80)
    workdir = tmp_path / "run"
    result = _run(
        "main", "--config", "configs/tiny.py", "--workdir", workdir, "--print_config",
        f"--config.data.train_files={corpus}", "--config.train.epochs=2", "--config.train.steps=0",
        "--config.train.per_device_batch_size=3", "--config.train.batch_size=0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not workdir.exists()
    derived = result.stdout.split("# resolved (nothing was written)\n")[1].splitlines()
    assert "  epochs: 2.0" in result.stdout  # the config itself comes first

    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.data.train_files = str(corpus)
    config.train.update(steps=0, epochs=2.0, per_device_batch_size=3, batch_size=0, log_every=1)
    train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    recorded = json.loads((workdir / "config.json").read_text())
    vocab = json.loads((workdir / "tokenizer" / "vocab.json").read_text())
    assert derived[0].startswith(f"train.steps: {recorded['train']['steps']} (2 epochs of ")
    counted = int(derived[0].split(" epochs of ")[1].split()[0])
    assert -(-counted // 3) * 2 == recorded["train"]["steps"]  # 2 epochs of ceil(blocks / 3)
    assert derived[1] == (
        "train.batch_size: 3 (per_device_batch_size: 3 per device x 1 batch-splitting devices "
        "x 1 accumulated micro-batches)"
    )
    assert derived[2] == f"model.vocab_size: {len(vocab)} rows (pad id {vocab['<pad>']})"
    assert derived[3] == "mesh: data=1 x fsdp=1 x tensor=1 over 1 cpu device"
    assert derived[4] == "guidance: next:1,prev:1,first:1 (3 heads)"


def test_plan_counts_the_global_batch_over_the_mesh(tmp_path):
    config = load_config(str(REPO / "configs" / "tiny.py"))
    config.data.train_files = str(write_corpus(tmp_path / "corpus.txt", lines=80))
    config.train.update(per_device_batch_size=2, grad_accum_steps=2)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    plan = plan_run(config, devices=jax.devices()[:8])
    assert plan.config.train.batch_size == 2 * 4 * 2  # per device x data x fsdp x accumulation
    assert plan.mesh == {"data": 2, "fsdp": 2, "tensor": 2}
    assert "mesh: data=2 x fsdp=2 x tensor=2 over 8 cpu devices" in plan.lines()

    config.mesh.update(data=-1, fsdp=1, tensor=1)
    lowered = plan_lowering(config, platform="tpu", devices=4)
    assert lowered.config.train.batch_size == 2 * 4 * 2
    assert "train.steps: 6 (as given)" in lowered.lines()
    config.train.update(steps=0, epochs=3.0)
    assert "train.steps: counted from train.epochs=3 once the corpus is read" in (
        plan_lowering(config, platform="tpu", devices=4).lines()
    )


def test_a_gs_workdir_without_credentials_is_one_line_that_says_how_to_log_in(tmp_path):
    env = {
        k: v
        for k, v in cli_env().items()
        if not k.startswith(("GOOGLE_", "CLOUDSDK_", "GCE_")) and "EMULATOR" not in k
    }
    env.update(HOME=str(tmp_path), NO_GCE_CHECK="True")  # no gcloud login, not on a Cloud VM
    done = subprocess.run(
        [
            *(sys.executable, "-m", "guided_jax.main"),
            f"--config={REPO / 'configs' / 'tiny.py'}",
            "--workdir=gs://some-bucket/run",
        ],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("guided_jax.main: error: gs:// needs Google Cloud credentials: ")
    assert "gcloud auth application-default login" in line
    assert list(tmp_path.iterdir()) == []  # nothing written
