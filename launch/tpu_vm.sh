#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod slice of many): create the TPU, copy this
# checkout to every worker and install it, start the same training command on all workers with
# --distributed (JAX finds the other hosts itself), watch it, stop it, delete the TPU.
# Before it starts the workers, train compiles the run's steps for the slice here (see below).
#
#   export TPU_NAME=ag ACCELERATOR_TYPE=v5e-64 BUCKET=my-bucket   # ZONE: us-west4-a for v5e
#   bash launch/tpu_vm.sh create --spot   # or --preemptible, or neither
#   bash launch/tpu_vm.sh setup           # this checkout (less .git, venvs, runs) to ~/guided_jax,
#                                         # a Python >= 3.11 venv and in it
#                                         # pip install -e '.[gcs]' 'jax[tpu]'
#   bash launch/tpu_vm.sh train --detach configs/reference.py:roberta_12 \
#       --config.data.train_files=gs://my-bucket/data/train.txt --config.mesh.fsdp=4
#                                         # workdir gs://my-bucket/runs/ag
#   bash launch/tpu_vm.sh logs            # the end of ~/guided_jax/train.log on worker WORKER (0)
#   bash launch/tpu_vm.sh status          # the TPU's state and health
#   bash launch/tpu_vm.sh stop            # SIGTERM: every process saves a checkpoint and exits
#   bash launch/tpu_vm.sh delete
#   bash launch/tpu_vm.sh train --help    # a subcommand's options and environment variables
#
# train without --detach runs in the foreground and shows the output of every worker. Either way
# each worker writes the run's output to ~/guided_jax/train.log, which logs reads, and records the
# training process's pid in ~/guided_jax/train.pid, which stop signals.
#
# train first runs, on this machine and in this checkout (as the workers run it in theirs),
#   python -m guided_jax.lower --config CONFIG --topology ACCELERATOR_TYPE [--config.key=value ...]
# with the training command's overrides: it compiles the train and eval steps for the slice with
# libtpu (no TPU needed; pip install "jax[tpu]==<this python's jax version>"), and a run that
# does not fit the chips' memory, or that the compiler refuses, stops here with its message and
# exit status 1, before any worker starts. --no-compile-check skips it.
#
# Settings come from the environment or from the flags named beside them:
#   TPU_NAME         --name      guided-jax
#   ZONE             --zone      by generation, a zone Cloud TPU lists for it: v4 us-central2-b,
#                                v5e us-west4-a, v5p us-east5-a, v6e us-east5-b
#   ACCELERATOR_TYPE --type      v4-32: GEN-N for v4, v5e (gcloud's v5litepod-N), v5p, v6e, or
#                                GEN:AxB[xC]; gcloud gets its own name (v5e-16 -> v5litepod-16)
#   RUNTIME_VERSION  --version   the JAX base image of the TPU generation (see generation_facts)
#   PROJECT          --project   gcloud's default project
#   BUCKET           --bucket    none; the bucket of the default workdir
#   STORAGE          --storage   gs: the workdir is in the bucket, written directly (no mount);
#                                mount: setup and train mount gs://BUCKET at MOUNT with gcsfuse
#   MOUNT                        /mnt/gcs (STORAGE=mount)
#   WORKDIR          --workdir   with BUCKET gs://BUCKET/runs/TPU_NAME (gs) or MOUNT/runs/TPU_NAME
#                                (mount), else required for train
#   PYTHON                       python: the local python of train's compile check
#   WORKER                       0: the worker whose log logs shows
# Every worker must see the same workdir. A gs:// workdir needs no mount: orbax and gcsfs write to
# the bucket directly (setup installs the package's gcs extra in both modes); otherwise it is a
# shared directory (the gcsfuse mount, or an NFS/Filestore path). All processes write the
# checkpoints, process 0 the metrics; on gs:// process 0 also holds the lease WORKDIR/lease.json,
# which refuses a second run in the same workdir. Rerunning train resumes from the last
# checkpoint, also on a new TPU after a spot preemption (create deletes the PREEMPTED node of
# that name first). The workers' service account needs roles/storage.objectUser on the bucket:
# the lease and the metrics overwrite objects, which objectCreator alone cannot.
#
# DRY_RUN=1 prints every command (one a line) instead of running it (and asks gcloud nothing).
set -euo pipefail

# Per TPU generation: gcloud's accelerator-type prefix, whether its number counts TensorCores
# (two a chip) rather than chips, the default zone (one Cloud TPU's "TPU regions and zones" lists
# for the generation) and the TPU software version with a plain Ubuntu for JAX. The prefixes and
# counts follow _GCLOUD_NAMES in guided_jax/train/lowering.py.
GENERATIONS=(v4 v5e v5p v6e)
generation_facts() {
  case $1 in
    v4) echo v4 1 us-central2-b tpu-ubuntu2204-base ;;
    v5e) echo v5litepod 0 us-west4-a v2-alpha-tpuv5-lite ;;
    v5p) echo v5p 1 us-east5-a v2-alpha-tpuv5 ;;
    v6e) echo v6e 0 us-east5-b v2-alpha-tpuv6e ;;
  esac
}

# "v4 us-central2-b, v5e ..., ...": field $1 of generation_facts for every generation.
by_generation() {
  local generation facts text=
  for generation in "${GENERATIONS[@]}"; do
    read -ra facts <<<"$(generation_facts "$generation")"
    text+="${text:+, }$generation ${facts[$1]}"
  done
  echo "$text"
}

usage() { # exit status 0 (help, on stdout) or 2 (a usage error, on stderr)
  local out=2
  [[ ${1:-2} != 0 ]] || out=1
  {
    cat <<'EOF'
usage: tpu_vm.sh create [--spot | --preemptible] [OPTIONS]
       tpu_vm.sh setup  [OPTIONS]
       tpu_vm.sh train  [--detach] [--no-compile-check] [--workdir DIR] [OPTIONS] CONFIG
                        [--config.key=value ...]
       tpu_vm.sh logs | stop | status | delete [OPTIONS]
       tpu_vm.sh SUBCOMMAND --help   its options and environment variables
OPTIONS: --name TPU_NAME --zone ZONE --type ACCELERATOR_TYPE --version RUNTIME_VERSION
         --project PROJECT --bucket BUCKET --storage gs|mount
         (or the environment variables of the same names)
ACCELERATOR_TYPE (v4-32): v4-N, v5e-N (or gcloud's v5litepod-N), v5p-N, v6e-N, or GEN:AxB[xC]
EOF
    echo "ZONE by generation: $(by_generation 2)"
    cat <<'EOF'
STORAGE gs (the default): the workdir is gs://BUCKET/runs/NAME, written without a mount;
        mount: gcsfuse mounts the bucket at MOUNT on every worker, the workdir MOUNT/runs/NAME
train first compiles the run for the slice here (python -m guided_jax.lower --topology TYPE,
        with libtpu: pip install "jax[tpu]==<jax version>") and stops if it does not fit;
        --no-compile-check skips that
EOF
  } >&"$out"
  exit "${1:-2}"
}

# The help lines of the settings: a key (the first 8 columns), then the line: its flag, its
# environment variable, what it is.
settings_table() {
  cat <<EOF
spot      --spot | --preemptible               a spot or preemptible TPU (else on demand)
detach    --detach                             run in the background, output in train.log
compile   --no-compile-check                   start the workers without the compile check
workdir   --workdir DIR      WORKDIR           the run's directory, the same on every worker
workdir                                        (with BUCKET gs://BUCKET/runs/TPU_NAME, with
workdir                                        STORAGE=mount MOUNT/runs/TPU_NAME)
name      --name NAME        TPU_NAME          the TPU VM (guided-jax)
zone      --zone ZONE        ZONE              its zone, by default one with its generation:
zone          $(by_generation 2)
type      --type TYPE        ACCELERATOR_TYPE  the slice (v4-32): v4-N, v5e-N (gcloud's
type                                           v5litepod-N), v5p-N, v6e-N or GEN:AxB[xC]
version   --version VERSION  RUNTIME_VERSION   the TPU software, by default by generation:
version       $(by_generation 3)
project   --project PROJECT  PROJECT           the Google Cloud project (gcloud's default)
bucket    --bucket BUCKET    BUCKET            the bucket of the default workdir
storage   --storage gs|mount STORAGE           gs: the workers write the bucket directly
storage                                        (default); mount: gcsfuse mounts it at MOUNT
mount                        MOUNT             where STORAGE=mount mounts it (/mnt/gcs)
python                       PYTHON            the python of the compile check (python)
worker                       WORKER            the worker whose log logs shows (0)
dry_run                      DRY_RUN=1         print the commands instead of running them
EOF
}

# A subcommand's usage, what it does, its options and environment variables (on stdout).
command_help() {
  local setting settings=(name zone type project)
  case $1 in
    create)
      echo "usage: tpu_vm.sh create [--spot | --preemptible] [OPTIONS]"
      echo "Creates the TPU VM slice (gcloud compute tpus tpu-vm create)."
      settings=(spot "${settings[@]}" version)
      ;;
    setup)
      echo "usage: tpu_vm.sh setup [OPTIONS]"
      echo "Copies this checkout to ~/guided_jax on every worker and installs it in a venv with"
      echo "jax[tpu]; with STORAGE=mount also installs gcsfuse and mounts the bucket."
      settings+=(bucket storage mount)
      ;;
    train)
      echo "usage: tpu_vm.sh train [--detach] [--no-compile-check] [--workdir DIR] [OPTIONS] CONFIG"
      echo "                       [--config.key=value ...]"
      echo "Compiles the run for the slice here (python -m guided_jax.lower), then starts"
      echo "python -m guided_jax.main --distributed on every worker; each worker records the"
      echo "training process's pid in ~/guided_jax/train.pid for stop."
      settings=(detach compile workdir "${settings[@]}" bucket storage mount python)
      ;;
    logs)
      echo "usage: tpu_vm.sh logs [OPTIONS]"
      echo "Prints the end of ~/guided_jax/train.log (the output of train, with or without"
      echo "--detach) on one worker."
      settings+=(worker)
      ;;
    stop)
      echo "usage: tpu_vm.sh stop [OPTIONS]"
      echo "Sends SIGTERM to the training process on every worker (train with or without --detach):"
      echo "it saves a checkpoint and exits."
      ;;
    status)
      echo "usage: tpu_vm.sh status [OPTIONS]"
      echo "Prints the TPU's state and health."
      ;;
    delete)
      echo "usage: tpu_vm.sh delete [OPTIONS]"
      echo "Deletes the TPU VM slice."
      ;;
  esac
  echo "OPTIONS (or the environment variables beside them):"
  for setting in "${settings[@]}" dry_run; do
    settings_table | awk -v key="$setting" '$1 == key' | cut -c9-
  done
  exit 0
}

die() { # a usage error: the message, then the usage
  echo "tpu_vm.sh: $*" >&2
  usage
}

bad_value() { # a setting's value refused: one line, exit status 2
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Sets generation, accelerator (gcloud's accelerator type) and the generation's default zone and
# version from the slice $1: GEN-N (v5e also as gcloud's v5litepod-N; N counts TensorCores on v4
# and v5p, chips on v5e and v6e) or GEN:AxB[xC], the forms guided_jax.lower --topology takes.
# The same mapping as gcloud_accelerator_type in guided_jax/train/lowering.py.
resolve_accelerator() {
  local text=$1 prefix cores count='' chips='' d
  if [[ $text =~ ^(v4|v5e|v5litepod|v5p|v6e)-([0-9]{1,6})$ ]]; then
    generation=${BASH_REMATCH[1]/v5litepod/v5e}
    count=$((10#${BASH_REMATCH[2]}))
  elif [[ $text =~ ^(v4|v5e|v5p|v6e):([0-9]{1,3}(x[0-9]{1,3}){1,2})$ ]]; then
    generation=${BASH_REMATCH[1]}
    chips=1
    for d in ${BASH_REMATCH[2]//x/ }; do
      chips=$((chips * 10#$d))
    done
  else
    bad_value "ACCELERATOR_TYPE (--type) '$text': expected v4-N, v5e-N (or v5litepod-N), v5p-N," \
      "v6e-N or GEN:AxB[xC], such as v5e-16, v4-32 or v5e:4x4"
  fi
  read -r prefix cores default_zone default_version <<<"$(generation_facts "$generation")"
  if [[ -n $count ]]; then
    chips=$((cores == 1 && count % 2 ? 0 : count / (cores + 1)))
  fi
  if ((cores == 1 && (chips < 4 || (chips & (chips - 1))))); then
    bad_value "ACCELERATOR_TYPE (--type) '$text': a $generation slice has a power-of-two number of" \
      "chips, at least 4, and N counts its TensorCores, two a chip:" \
      "$generation-8, $generation-16, ..."
  elif ((chips < 1 || (chips & (chips - 1)))); then
    bad_value "ACCELERATOR_TYPE (--type) '$text': a $generation slice has a power-of-two number of" \
      "chips: $generation-4, $generation-8, ..."
  fi
  accelerator=$prefix-$((chips * (cores + 1)))
}

[[ $# -ge 1 ]] || usage
command=$1
shift
case $command in
  create | setup | train | logs | stop | status | delete) ;;
  -h | --help | help) usage 0 ;;
  *) die "unknown subcommand '$command'" ;;
esac

name=${TPU_NAME:-guided-jax}
zone=${ZONE:-}
accelerator=${ACCELERATOR_TYPE:-v4-32}
version=${RUNTIME_VERSION:-}
project=${PROJECT:-}
bucket=${BUCKET:-}
storage=${STORAGE:-gs}
mount=${MOUNT:-/mnt/gcs}
workdir=${WORKDIR:-}
provisioning=
detach=0
compile_check=1

while [[ $# -gt 0 && ($1 == --* || $1 == -h) ]]; do
  option=$1
  value=
  case $option in
    -h | --help) command_help "$command" ;;
    --spot | --preemptible)
      [[ $command == create ]] || die "$option is for create"
      [[ -z $provisioning ]] || die "--spot or --preemptible, not both"
      provisioning=$option
      shift
      continue
      ;;
    --detach)
      [[ $command == train ]] || die "--detach is for train"
      detach=1
      shift
      continue
      ;;
    --no-compile-check)
      [[ $command == train ]] || die "--no-compile-check is for train"
      compile_check=0
      shift
      continue
      ;;
    --*=*)
      value=${option#*=}
      option=${option%%=*}
      shift
      ;;
    --name | --zone | --type | --version | --project | --bucket | --storage | --workdir)
      [[ $# -ge 2 ]] || die "$option needs a value"
      value=$2
      shift 2
      ;;
    *) die "unknown option '$option'" ;;
  esac
  case $option in
    --name) name=$value ;;
    --zone) zone=$value ;;
    --type) accelerator=$value ;;
    --version) version=$value ;;
    --project) project=$value ;;
    --bucket) bucket=$value ;;
    --storage) storage=$value ;;
    --workdir)
      [[ $command == train ]] || die "--workdir is for train"
      workdir=$value
      ;;
    *) die "unknown option '$option'" ;;
  esac
done
case $storage in
  gs | mount) ;;
  *) bad_value "STORAGE (--storage) '$storage': expected gs or mount" ;;
esac

if [[ $command == train ]]; then
  [[ $# -ge 1 ]] || die "train needs a CONFIG"
  config=$1
  shift
  if [[ -z $workdir ]]; then
    [[ -n $bucket ]] || die "train needs WORKDIR (gs://... or a shared directory) or BUCKET"
    if [[ $storage == gs ]]; then
      workdir=gs://$bucket/runs/$name
    else
      workdir=$mount/runs/$name
    fi
  fi
elif [[ $# -gt 0 ]]; then
  die "unexpected arguments: $*"
fi
resolve_accelerator "$accelerator"
[[ -n $zone ]] || zone=$default_zone
[[ -n $version ]] || version=$default_version

tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")

# Runs one shell command line on every worker of the slice (or on worker $2).
on_workers() {
  run "${tpu[@]}" ssh "$name" "${where[@]}" --worker="${2:-all}" --command="$1"
}

# Compiles the run's train and eval steps for the slice on this machine, in this checkout, with
# the training command's overrides ($@): a run that does not fit stops here, before any worker
# starts. Needs libtpu in PYTHON (a dry run prints the command without looking for it).
check_compiles() {
  local python=${PYTHON:-python} repo jax
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [[ ${DRY_RUN:-0} != 1 ]]; then
    # Where jax looks for libtpu: TPU_LIBRARY_PATH, else the libtpu package. Prints jax's
    # version where there is none.
    jax=$(cd "$repo" && "$python" -c 'import importlib.metadata as m, importlib.util as u, os
p = os.environ.get("TPU_LIBRARY_PATH", "")
if not os.path.isfile(p) and u.find_spec("libtpu") is None:
    print(m.version("jax"))' 2>/dev/null) || {
      echo "tpu_vm.sh: the compile check needs jax and this package in '$python' (set PYTHON" \
        "to the python they are installed in), or pass --no-compile-check to skip it" >&2
      exit 1
    }
    if [[ -n $jax ]]; then
      echo "tpu_vm.sh: the compile check for $accelerator needs libtpu in '$python':" \
        "pip install \"jax[tpu]==$jax\" (Linux), or pass --no-compile-check to skip it" >&2
      exit 1
    fi
  fi
  if ! (cd "$repo" && run "$python" -m guided_jax.lower --config "$config" \
    --topology "$accelerator" "$@"); then
    echo "tpu_vm.sh: the compile check failed for $accelerator (above), no worker was started:" \
      "change the run, or pass --no-compile-check to start it anyway" >&2
    exit 1
  fi
}

# Remote paths are relative to the home directory of each worker.
remote_dir=guided_jax
remote_python=$remote_dir/.venv/bin/python

mount_bucket=
if [[ $storage == mount && -n $bucket ]]; then
  # Directory renames (orbax commits a checkpoint by renaming its temporary directory) need
  # --rename-dir-limit on buckets without hierarchical namespace.
  m=$(printf '%q' "$mount")
  b=$(printf '%q' "$bucket")
  mount_bucket="{ mountpoint -q $m || { sudo mkdir -p $m && sudo chown \"\$USER\" $m"
  mount_bucket+=" && gcsfuse --implicit-dirs --rename-dir-limit=1000000 $b $m; }; }"
fi

case $command in
  create)
    # The cloud-platform scope: what the workers may do is then their service account's IAM
    # roles (roles/storage.objectUser on the bucket for a gs:// workdir), whatever the workdir.
    flags=(--accelerator-type="$accelerator" --version="$version")
    flags+=(--scopes=https://www.googleapis.com/auth/cloud-platform)
    [[ -z $provisioning ]] || flags+=("$provisioning")
    # A preempted spot or preemptible node keeps its name until it is deleted.
    if [[ ${DRY_RUN:-0} != 1 ]]; then
      state=$("${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null) ||
        state=""
      if [[ $state == PREEMPTED ]]; then
        echo "$name was preempted: deleting it to create it again" >&2
        run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
      fi
    fi
    run "${tpu[@]}" create "$name" "${where[@]}" "${flags[@]}"
    ;;

  setup)
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    jax=$(grep -E '^jax[<>=!~]' "$repo/requirements.txt") || {
      echo "tpu_vm.sh: no jax requirement in $repo/requirements.txt" >&2
      exit 1
    }
    jax_tpu="jax[tpu]${jax#jax}"
    pack=${TMPDIR:-/tmp}/guided_jax-$name.tar.gz
    run tar -czf "$pack" --exclude=.git --exclude=.venv --exclude=venv --exclude=runs \
      --exclude=__pycache__ --exclude='*.egg-info' -C "$repo" .
    run "${tpu[@]}" scp "$pack" "$name:guided_jax.tar.gz" "${where[@]}" --worker=all
    run rm -f "$pack"
    # Python >= 3.11: the image's python3 where it is new enough, else Ubuntu's python3.11.
    apt='sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -yq'
    script="set -e; mkdir -p $remote_dir && tar -xzf guided_jax.tar.gz -C $remote_dir"
    script+="; py=python3; if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'"
    script+="; then $apt update && $apt install python3.11 python3.11-venv && py=python3.11; fi"
    script+="; [ -x $remote_python ] || \"\$py\" -m venv $remote_dir/.venv"
    script+="; $remote_python -m pip install -q -U pip"
    # The gcs extra (gcsfs) reads gs:// text sources and writes gs:// workdirs, in both modes.
    script+="; $remote_python -m pip install -q -e './${remote_dir}[gcs]'"
    script+=" $(printf '%q' "$jax_tpu")"
    if [[ -n $mount_bucket ]]; then
      keyring=/usr/share/keyrings/cloud.google.asc
      # shellcheck disable=SC2016  # $(lsb_release -cs) expands on the worker
      repo_line='https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main'
      repo_line="deb [signed-by=$keyring] $repo_line"
      script+="; if ! command -v gcsfuse >/dev/null; then"
      script+=" curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
      script+=" | sudo tee $keyring >/dev/null"
      script+=" && echo \"$repo_line\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null"
      script+=" && $apt update && $apt install gcsfuse; fi; $mount_bucket"
    fi
    on_workers "$script"
    ;;

  train)
    [[ $compile_check == 0 ]] || check_compiles "$@"
    args=(-m guided_jax.main --config "$config" --workdir "$workdir" --distributed "$@")
    train=".venv/bin/python $(printf '%q ' "${args[@]}")"
    # Either way train.pid holds the pid of the training process itself (nohup and the shell
    # exec it), for stop, and train.log its output, for logs: in the foreground through a FIFO
    # to tee, which also shows it here (a pipe would put the trainer in a subshell).
    if [[ $detach == 1 ]]; then
      line="cd $remote_dir && { nohup $train> train.log 2>&1 < /dev/null & echo \$! > train.pid; }"
    else
      line="cd $remote_dir && rm -f train.out && mkfifo train.out && { tee train.log < train.out & }"
      line+=" && echo \$\$ > train.pid && exec $train> train.out 2>&1"
    fi
    [[ -z $mount_bucket ]] || line="$mount_bucket && $line"
    on_workers "$line"
    ;;

  logs)
    on_workers "tail -n 40 $remote_dir/train.log" "${WORKER:-0}"
    ;;

  stop)
    # SIGTERM to the recorded pid if it is still a training process (not a pid reused since;
    # -ww: the whole command line, however long).
    line="pid=\$(cat $remote_dir/train.pid 2>/dev/null) && ps -ww -o args= -p \"\$pid\""
    line+=" | grep -qF guided_jax.main && kill -TERM \"\$pid\""
    line+=" || echo \"tpu_vm.sh stop: no training process on \$(hostname)\" >&2"
    on_workers "$line"
    ;;

  status)
    run "${tpu[@]}" describe "$name" "${where[@]}" \
      --format='table(name.basename(), state, health, acceleratorType, runtimeVersion)'
    ;;

  delete)
    run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
    ;;
esac
