#!/usr/bin/env bash
# Environment shared by the launch scripts (sourced, not run). Every value can be preset by the caller.
# See docs/SCALING.md for what each setting does.

# --- JAX / XLA on GPUs -------------------------------------------------------------------------------
# Let JAX take 90% of each GPU up front (default 75%); the remaining 10% is for cuDNN/NCCL workspaces.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
# Overlap collectives (FSDP all-gathers / reduce-scatters, data-parallel all-reduces) with compute, and
# combine small collectives into ~128 MiB ones.
HD_GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"
HD_GPU_XLA_FLAGS+=" --xla_gpu_all_reduce_combine_threshold_bytes=134217728"
HD_GPU_XLA_FLAGS+=" --xla_gpu_all_gather_combine_threshold_bytes=134217728"
HD_GPU_XLA_FLAGS+=" --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728"
export HD_GPU_XLA_FLAGS

# --- compilation cache and logging -------------------------------------------------------------------
# A persistent compilation cache: a restarted or resumed job skips most of its compile time.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/hybrid_distill_jax/jax}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"  # tf.data (input pipeline only) stays quiet
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
