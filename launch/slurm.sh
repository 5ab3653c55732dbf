#!/usr/bin/env bash
# Train on a SLURM GPU cluster: submit a batch job whose srun starts the training command with
# --distributed on every node (JAX reads the SLURM_* variables to find the other processes), or,
# inside an allocation (salloc, or a job of your own: SLURM_JOB_ID is set), run that srun now.
#
#   . .venv/bin/activate            # the job inherits this environment, and this directory
#   NODES=2 PARTITION=gpu bash launch/slurm.sh configs/reference.py:roberta_12 /shared/runs/r12 \
#       --config.data.train_files=/shared/data/train.txt --config.mesh.fsdp=8
#   bash launch/slurm.sh --nodes 4 --mode per-host --time 12:00:00 CONFIG WORKDIR [--config.k=v ...]
#
# Settings come from the environment or from the flags named beside them:
#   NODES          --nodes          1 (inside an allocation: all its nodes)
#   GPUS_PER_NODE  --gpus-per-node  8
#   MODE           --mode           per-gpu: one process per GPU (--ntasks-per-node=GPUS_PER_NODE
#                                   --gpus-per-task=1); per-host: one process per node that drives
#                                   all its GPUs (--ntasks-per-node=1 --gpus-per-node=GPUS_PER_NODE)
#   TIME           --time           24:00:00
#   PARTITION      --partition      the cluster's default
#   ACCOUNT        --account        the cluster's default
#   CPUS_PER_TASK  --cpus-per-task  the cluster's default
#   JOB_NAME       --job-name       guided_jax (the log is JOB_NAME-JOBID.out in this directory)
#   PYTHON                          python
# WORKDIR must be on a filesystem every node shares: all processes write the checkpoints,
# process 0 the metrics. The job asks for SIGTERM two minutes before its time limit, on which
# every process saves a checkpoint and exits; resubmitting the same command resumes from it. The
# job is marked --requeue: where the cluster requeues preempted jobs, it resumes by itself.
#
# DRY_RUN=1 prints the batch script and then the command that would submit it (the script goes
# to sbatch on stdin), or the srun command inside an allocation, instead of running anything.
set -euo pipefail

usage() { # exit status 0 (help, on stdout) or 2 (a usage error, on stderr)
  local out=2
  [[ ${1:-2} != 0 ]] || out=1
  cat >&"$out" <<'EOF'
usage: slurm.sh [OPTIONS] CONFIG WORKDIR [--config.key=value ...]
OPTIONS: --nodes N --gpus-per-node G --mode per-gpu|per-host --time T --partition P
         --account A --cpus-per-task C --job-name NAME
         (or NODES GPUS_PER_NODE MODE TIME PARTITION ACCOUNT CPUS_PER_TASK JOB_NAME)
EOF
  exit "${1:-2}"
}

die() {
  echo "slurm.sh: $*" >&2
  usage
}

# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

nodes=${NODES:-${SLURM_JOB_NUM_NODES:-1}} # inside an allocation: all its nodes
gpus=${GPUS_PER_NODE:-8}
mode=${MODE:-per-gpu}
time=${TIME:-24:00:00}
partition=${PARTITION:-}
account=${ACCOUNT:-}
cpus=${CPUS_PER_TASK:-}
job_name=${JOB_NAME:-guided_jax}
python=${PYTHON:-python}

while [[ $# -gt 0 && $1 == --* ]]; do
  option=$1
  case $option in
    -h | --help) usage 0 ;;
    --*=*)
      value=${option#*=}
      option=${option%%=*}
      shift
      ;;
    --nodes | --gpus-per-node | --mode | --time | --partition | --account | --cpus-per-task | \
      --job-name)
      [[ $# -ge 2 ]] || die "$option needs a value"
      value=$2
      shift 2
      ;;
    *) die "unknown option '$option'" ;;
  esac
  case $option in
    --nodes) nodes=$value ;;
    --gpus-per-node) gpus=$value ;;
    --mode) mode=$value ;;
    --time) time=$value ;;
    --partition) partition=$value ;;
    --account) account=$value ;;
    --cpus-per-task) cpus=$value ;;
    --job-name) job_name=$value ;;
    *) die "unknown option '$option'" ;;
  esac
done

[[ $# -ge 2 ]] || die "CONFIG and WORKDIR are required"
config=$1
workdir=$2
shift 2
[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "NODES must be a positive integer, not '$nodes'"
[[ $gpus =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE must be a positive integer, not '$gpus'"
[[ -z $cpus || $cpus =~ ^[1-9][0-9]*$ ]] || die "CPUS_PER_TASK must be a positive integer"

# JAX on SLURM restricts each process to the GPU numbered SLURM_LOCALID unless told otherwise;
# JAX_LOCAL_DEVICE_IDS says which of the GPUs a process sees it should use.
case $mode in
  per-gpu) # --gpus-per-task=1 binds one GPU to each task: it is that task's device 0
    tasks=(--ntasks-per-node="$gpus" --gpus-per-task=1)
    device_ids=0
    ;;
  per-host)
    tasks=(--ntasks-per-node=1 --gpus-per-node="$gpus")
    device_ids=0
    for ((i = 1; i < gpus; i++)); do device_ids+=",$i"; done
    ;;
  *) die "MODE must be per-gpu or per-host, not '$mode'" ;;
esac
[[ -z $cpus ]] || tasks+=(--cpus-per-task="$cpus")

step=(srun --nodes="$nodes" "${tasks[@]}" "--export=ALL,JAX_LOCAL_DEVICE_IDS=$device_ids"
  "$python" -m guided_jax.main --config "$config" --workdir "$workdir" --distributed "$@")

if [[ -n ${SLURM_JOB_ID:-} ]]; then # already inside an allocation
  run "${step[@]}"
  exit
fi

header=(--job-name="$job_name" --nodes="$nodes" "${tasks[@]}" --time="$time"
  --signal=TERM@120 --requeue --output=%x-%j.out --open-mode=append)
[[ -z $partition ]] || header+=(--partition="$partition")
[[ -z $account ]] || header+=(--account="$account")

script="#!/usr/bin/env bash"$'\n'
for line in "${header[@]}"; do
  script+="#SBATCH $line"$'\n'
done
script+="set -euo pipefail"$'\n'
script+="$(printf '%q ' "${step[@]}")"$'\n'

if [[ ${DRY_RUN:-0} == 1 ]]; then
  printf '%s' "$script"
  run sbatch
else
  sbatch <<<"$script"
fi
