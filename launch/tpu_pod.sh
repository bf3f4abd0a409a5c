#!/usr/bin/env bash
# Cloud TPU VM pod slices: create, set up every worker, run, follow logs, delete.
#
#   launch/tpu_pod.sh create                  # the TPU VM (all workers)
#   launch/tpu_pod.sh setup                   # copy this repository to every worker, build its venv
#   launch/tpu_pod.sh run CONFIG WORKDIR [--config.field=value ...]   # start training on all workers
#   launch/tpu_pod.sh logs [WORKER]           # follow a worker's log (default 0)
#   launch/tpu_pod.sh stop                    # SIGTERM: checkpoint at the next step, then exit
#   launch/tpu_pod.sh delete                  # delete the TPU VM
#
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR_TYPE (e.g. v4-32, v5p-64), RUNTIME_VERSION,
# PROJECT (default: gcloud's), SPOT=1 for spot capacity, REMOTE_DIR (repo location on the workers).
# WORKDIR must be a directory every worker sees (e.g. a Filestore/NFS or gcsfuse mount): orbax writes
# one checkpoint from all hosts. Each worker runs one process; JAX finds the others through the TPU
# metadata server (--distributed=on).
set -euo pipefail
TPU_NAME="${TPU_NAME:-hybrid-distill}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-hybrid_distill_jax}"
LOG="${REMOTE_DIR}/train.log"
PID="${REMOTE_DIR}/train.pid"
project_args=()
if [[ -n "${PROJECT:-}" ]]; then
  project_args=(--project "$PROJECT")
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

tpu() {
  gcloud compute tpus tpu-vm "$@" --zone "$ZONE" "${project_args[@]}"
}

on_all() {  # on_all COMMAND: run a shell command on every worker
  tpu ssh "$TPU_NAME" --worker=all --command "$1"
}

quote_args() {  # one shell-quoted string of the arguments, safe to embed in a remote command
  local out=""
  for a in "$@"; do
    out+=" $(printf '%q' "$a")"
  done
  printf '%s' "$out"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  create)
    spot_args=()
    if [[ "${SPOT:-0}" == 1 ]]; then
      spot_args=(--spot)
    fi
    tpu create "$TPU_NAME" --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" "${spot_args[@]}"
    ;;
  setup)
    archive="$(mktemp -t hybrid_distill_XXXX.tar.gz)"
    tar -C "$repo" --exclude=.venv --exclude=.cache --exclude=runs --exclude=.git -czf "$archive" .
    tpu scp "$archive" "$TPU_NAME:/tmp/hybrid_distill.tar.gz" --worker=all
    rm -f "$archive"
    on_all "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/hybrid_distill.tar.gz && cd $REMOTE_DIR \
      && python3 -m venv .venv && .venv/bin/pip install --quiet --upgrade pip \
      && .venv/bin/pip install --quiet -e '.[tpu]' && .venv/bin/python -c 'import jax; print(jax.devices())'"
    ;;
  run)
    if [[ $# -lt 2 ]]; then
      echo "usage: $0 run CONFIG WORKDIR [--config.field=value ...]" >&2
      exit 2
    fi
    config_q="$(printf '%q' "$1")"
    workdir_q="$(printf '%q' "$2")"
    rest="$(quote_args "${@:3}")"
    on_all "cd $REMOTE_DIR && mkdir -p $workdir_q && export JAX_COMPILATION_CACHE_DIR=\$HOME/.cache/jax \
      TF_CPP_MIN_LOG_LEVEL=2 && nohup .venv/bin/python -m hybrid_distill_jax.main --distributed=on \
      --config $config_q --workdir $workdir_q $rest > \$HOME/$LOG 2>&1 < /dev/null & echo \$! > \$HOME/$PID"
    echo "started on all workers; follow with: $0 logs"
    ;;
  logs)
    tpu ssh "$TPU_NAME" --worker="${1:-0}" --command "tail -n 100 -f \$HOME/$LOG"
    ;;
  stop)
    on_all "test -f \$HOME/$PID && kill -TERM \$(cat \$HOME/$PID) || true"
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
