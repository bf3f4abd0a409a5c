#!/usr/bin/env bash
# Cloud TPU VM pod slices: create, set up every worker, run, follow logs, stop, delete.
#
#   launch/tpu_pod.sh [--dry-run] create                # the TPU VM (all workers)
#   launch/tpu_pod.sh [--dry-run] setup                 # copy this repository to every worker, build its venv
#   launch/tpu_pod.sh [--dry-run] run CONFIG WORKDIR [--config.field=value ...]   # train on all workers
#   launch/tpu_pod.sh --compile-only run CONFIG WORKDIR [--config.field=value ...]
#                      # pre-flight, here and before any TPU exists: compile the run's step for
#                      # ACCELERATOR_TYPE (or TOPOLOGY, e.g. v5e:16x16; NUM_SLICES) and report whether it fits
#   launch/tpu_pod.sh [--dry-run] logs [WORKER]         # follow a worker's log (default 0)
#   launch/tpu_pod.sh [--dry-run] stop                  # SIGTERM: checkpoint at the next step, exit, no restart
#   launch/tpu_pod.sh [--dry-run] delete                # delete the TPU VM
#
# --dry-run (or DRY_RUN=1) prints the commands instead of running them.
# Settings (environment): TPU_NAME, ZONE, ACCELERATOR_TYPE (e.g. v4-32, v5p-64), RUNTIME_VERSION,
# PROJECT (default: gcloud's), SPOT=1 for spot capacity, REMOTE_DIR (repo location on the workers),
# SHARED_FSTYPES (filesystem types `run` accepts for WORKDIR; `any` for a single-host slice).
# WORKDIR must be a directory every worker sees (a Filestore/NFS or gcsfuse mount): orbax writes one
# checkpoint from all hosts. Every worker runs the same command, launch/tpu_worker.sh, which checks that,
# then runs one training process (--distributed=on: JAX finds the others through the TPU metadata server)
# and restarts it after exit 75 (SIGTERM, e.g. a maintenance event: checkpointed, resumes).
set -euo pipefail
DRY_RUN="${DRY_RUN:-0}"
COMPILE_ONLY=0
while [[ "${1:-}" == --dry-run || "${1:-}" == --compile-only ]]; do
  [[ "$1" == --dry-run ]] && DRY_RUN=1
  [[ "$1" == --compile-only ]] && COMPILE_ONLY=1
  shift
done
TPU_NAME="${TPU_NAME:-hybrid-distill}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REMOTE_DIR="${REMOTE_DIR:-hybrid_distill_jax}"
SHARED_FSTYPES="${SHARED_FSTYPES:-nfs nfs4 fuse fuseblk lustre gpfs ceph}"
project_args=()
if [[ -n "${PROJECT:-}" ]]; then
  project_args=(--project "$PROJECT")
fi
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

x() {  # x COMMAND...: run it, or print it (shell-quoted) under --dry-run
  if [[ "$DRY_RUN" == 1 ]]; then
    local out=""
    for a in "$@"; do
      out+="$(printf '%q' "$a") "
    done
    printf '%s\n' "${out% }"
  else
    "$@"
  fi
}

tpu() {
  x gcloud compute tpus tpu-vm "$@" --zone "$ZONE" "${project_args[@]}"
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
    archive="${TMPDIR:-/tmp}/hybrid_distill_$$.tar.gz"
    x tar -C "$repo" --exclude=.venv --exclude=.cache --exclude=runs --exclude=.git -czf "$archive" .
    tpu scp "$archive" "$TPU_NAME:/tmp/hybrid_distill.tar.gz" --worker=all
    x rm -f "$archive"
    on_all "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/hybrid_distill.tar.gz && cd $REMOTE_DIR \
&& python3 -m venv .venv && .venv/bin/pip install --quiet --upgrade pip \
&& .venv/bin/pip install --quiet -e '.[tpu]' && .venv/bin/python -c 'import jax; print(jax.devices())'"
    ;;
  run)
    if [[ $# -lt 2 ]]; then
      echo "usage: $0 run CONFIG WORKDIR [--config.field=value ...]" >&2
      exit 2
    fi
    if [[ "$COMPILE_ONLY" == 1 ]]; then  # on this host: python -m hybrid_distill_jax.compile, no gcloud
      config="$1"
      shift 2
      x "${PYTHON:-$repo/.venv/bin/python}" -m hybrid_distill_jax.compile --config "$config" \
        --target "${TOPOLOGY:-$ACCELERATOR_TYPE}" --num_slices "${NUM_SLICES:-1}" "$@"
      exit 0
    fi
    workdir_q="$(printf '%q' "$2")"
    args="$(quote_args "$@")"
    # The storage check runs in the foreground (its error reaches this terminal); training runs detached.
    on_all "cd $REMOTE_DIR && SHARED_FSTYPES=$(printf '%q' "$SHARED_FSTYPES") launch/tpu_worker.sh check \
$workdir_q && { nohup launch/tpu_worker.sh train$args > train.log 2>&1 < /dev/null & }"
    if [[ "$DRY_RUN" != 1 ]]; then
      echo "started on all workers; follow with: $0 logs"
    fi
    ;;
  logs)
    tpu ssh "$TPU_NAME" --worker="${1:-0}" --command "tail -n 100 -f $REMOTE_DIR/train.log"
    ;;
  stop)
    on_all "cd $REMOTE_DIR && launch/tpu_worker.sh stop"
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    sed -n '2,22p' "$0"
    exit 2
    ;;
esac
