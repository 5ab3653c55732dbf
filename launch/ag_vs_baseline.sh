#!/usr/bin/env bash
# Train the AG model and the plain MLM baseline of one config on this host, one after the other,
# with identical data, seed and steps (WORKDIR/ag and WORKDIR/baseline), then write
# WORKDIR/report.md with the loss curves and attention maps: python -m guided_jax.reproduce.
#
#   bash launch/ag_vs_baseline.sh configs/default.py runs/compare [--config.key=value ...]
#
# Extra flags go to guided_jax.reproduce (--config.* overrides, --finetune_config=..., --text=...).
# DRY_RUN=1 prints the command instead of running it. Rerunning resumes each arm.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
python=${PYTHON:-python}

# shellcheck source=SCRIPTDIR/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

run "$python" -m guided_jax.reproduce --config "$config" --workdir "$workdir" "$@"
