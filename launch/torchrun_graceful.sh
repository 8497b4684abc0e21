# Sourced by the launchers: run_torchrun ARGS... runs `python -m torch.distributed.run ARGS...` so that
# a preemption is a clean stop, not a failure:
# - SIGTERM/SIGINT to this launcher go to the training processes only: each finishes its step, saves
#   a checkpoint and exits 0, and the launcher exits with torchrun's status (0). torchrun runs in its
#   own session, because torchrun itself, signalled, kills its workers after a short grace period
#   (mid-save) and exits non-zero.
# - If this launcher is killed outright (kill -9), the training processes notice (SOLO_LAUNCHER_PID)
#   and stop the same way: nothing goes on training unattended.
run_torchrun() {
  export SOLO_LAUNCHER_PID=$$
  setsid "${PYTHON:-python}" -m torch.distributed.run "$@" &
  local torchrun=$!
  # shellcheck disable=SC2064  # the pid is fixed now
  trap "echo 'launcher: stop requested; the training saves a checkpoint and exits' >&2; pkill -TERM -P $torchrun || true" TERM INT
  while kill -0 "$torchrun" 2>/dev/null; do
    wait "$torchrun" || true  # returns early when a trapped signal arrives; then wait again
  done
  wait "$torchrun"  # its exit status (bash keeps it for a reaped child)
}
