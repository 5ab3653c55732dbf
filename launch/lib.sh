# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run).

# Runs a command, or with DRY_RUN=1 prints it shell-quoted on one line instead.
run() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}
