#!/usr/bin/env bash
# What launch/tpu_pod.sh runs on every worker of a TPU pod, from the repository root there.
#
#   launch/tpu_worker.sh check WORKDIR                             # WORKDIR is on shared storage
#   launch/tpu_worker.sh train CONFIG WORKDIR [--config.field=value ...]   # train, restarting after exit 75
#   launch/tpu_worker.sh stop                                      # SIGTERM the training process, no restart
#
# `train` runs one process (--distributed=on) and starts it again whenever it exits with 75 (preempted:
# it checkpointed at a SIGTERM; the next start resumes), up to MAX_RESTARTS times; `stop` leaves
# train.stop first, so that exit is final. SHARED_FSTYPES: filesystem types `check` accepts (`any`: all).
# PYTHON picks the interpreter (default .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PID_FILE=train.pid
STOP_FILE=train.stop
SHARED_FSTYPES="${SHARED_FSTYPES:-nfs nfs4 fuse fuseblk lustre gpfs ceph}"

usage() {
  sed -n '2,11p' "$0" >&2
  exit 2
}

case "${1:-}" in
  check)
    [[ $# -eq 2 ]] || usage
    mkdir -p "$2"
    fstype="$(stat -f -c %T "$2")"
    if [[ "$SHARED_FSTYPES" != any && " $SHARED_FSTYPES " != *" $fstype "* ]]; then
      echo "tpu_worker.sh: WORKDIR $2 is on a '$fstype' filesystem, not shared storage ($SHARED_FSTYPES):" \
        "every worker must see the same checkpoints (mount Filestore/NFS or gcsfuse there, or set" \
        "SHARED_FSTYPES=any for a single-host slice)" >&2
      exit 2
    fi
    ;;
  train)
    [[ $# -ge 3 ]] || usage
    shift
    config="$1"
    workdir="$2"
    shift 2
    # shellcheck source=launch/env.sh
    source launch/env.sh
    python="${PYTHON:-.venv/bin/python}"
    rm -f "$STOP_FILE"
    restarts=0
    while :; do
      "$python" -m hybrid_distill_jax.main --distributed=on --config "$config" --workdir "$workdir" "$@" &
      echo $! >"$PID_FILE"
      rc=0
      wait $! || rc=$?
      if [[ $rc -ne 75 || -e "$STOP_FILE" || $restarts -ge ${MAX_RESTARTS:-100} ]]; then
        break
      fi
      restarts=$((restarts + 1))
      echo "tpu_worker.sh: exit 75 (preempted, checkpointed): restart $restarts"
    done
    rm -f "$PID_FILE"
    echo "tpu_worker.sh: training exited with $rc"
    exit "$rc"
    ;;
  stop)
    touch "$STOP_FILE"
    if [[ -f "$PID_FILE" ]]; then
      kill -TERM "$(cat "$PID_FILE")" 2>/dev/null || true
    fi
    ;;
  *) usage ;;
esac
