#!/usr/bin/env bash
# One process driving every GPU of this machine (data parallel, or FSDP with --config.mesh.fsdp=-1).
#
#   launch/gpu_single_node.sh CONFIG WORKDIR [--config.field=value ...]
#   launch/gpu_single_node.sh --compile-only CONFIG WORKDIR [--config.field=value ...]
#       pre-flight on any host, GPU or not: compile the step for GPU_TARGET (h100-sxm, h200 or a .txtpb;
#       default h100-sxm) x NUM_GPUS (default 8) and report whether it fits
#   e.g. launch/gpu_single_node.sh configs/hd_vitb16_clip_mae.py:teachers/clip_b16,teachers/mae_b16 \
#            runs/hd_b16 --config.data.data_dir="$TFDS_DATA_DIR"
#
# CUDA_VISIBLE_DEVICES picks the GPUs (default: all). PYTHON picks the interpreter (default .venv).
set -euo pipefail
compile_only=0
if [[ "${1:-}" == --compile-only ]]; then
  compile_only=1
  shift
fi
if [[ $# -lt 2 ]]; then
  sed -n '2,11p' "$0"
  exit 2
fi
config="$1"
workdir="$2"
shift 2
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/env.sh
source "$repo/launch/env.sh"
export XLA_FLAGS="${XLA_FLAGS:-$HD_GPU_XLA_FLAGS}"
python="${PYTHON:-$repo/.venv/bin/python}"
if [[ "$compile_only" == 1 ]]; then
  cd "$repo"
  exec "$python" -m hybrid_distill_jax.compile --config "$config" --target "${GPU_TARGET:-h100-sxm}" \
    --gpus_per_host "${NUM_GPUS:-8}" --hosts 1 "$@"
fi
mkdir -p "$workdir"
cd "$repo"
"$python" -m hybrid_distill_jax.main --distributed=off --config "$config" --workdir "$workdir" "$@" \
  2>&1 | tee -a "$workdir/train.log"
