#!/usr/bin/env bash
# Installs what the PyTorch <-> Flax conversion (hybrid_distill_jax.teachers) and its tests need:
# a CPU-only torch, torchvision, timm, open_clip_torch and safetensors. Idempotent; CI calls it.
#
#   bash scripts/install_torch_cpu.sh            # into .venv
#   PYTHON=/path/to/python bash scripts/install_torch_cpu.sh
#
# About 30 s and ~1 GB on disk (torch alone is ~750 MB) when nothing is installed yet.
set -euo pipefail

PYTHON=${PYTHON:-.venv/bin/python}

# --- convert ------------------------------------------------------------------------------------
TORCH="torch==2.13.0+cpu"        # the CPU wheel; a plain 'torch' from PyPI would pull the CUDA stack
PKGS=(torchvision==0.28.0 timm==1.0.31 open_clip_torch==3.3.0 safetensors==0.8.0)

if "$PYTHON" - <<'PY' 2>/dev/null; then
import importlib.metadata as md
want = {"torch": "2.13.0+cpu", "torchvision": "0.28.0", "timm": "1.0.31", "open_clip_torch": "3.3.0",
        "safetensors": "0.8.0"}
bad = [k for k, v in want.items() if md.version(k) != v]
raise SystemExit(1 if bad else 0)
PY
  echo "install_torch_cpu: torch (CPU), torchvision, timm, open_clip_torch, safetensors already installed"
  exit 0
fi

# 1. torch first, pinned to the +cpu build, so nothing below can swap in a CUDA torch.
"$PYTHON" -m pip install --quiet "$TORCH"
# 2. The rest, with torch pinned in the same command: torchvision's own 'torch==2.13.0' requirement is
#    met by 2.13.0+cpu, so pip keeps it. PyPI's torchvision is a CUDA build whose C ops cannot load beside a
#    CPU torch; it still imports once 'torchvision::nms'/'qnms' are declared (tests/test_convert.py does).
"$PYTHON" -m pip install --quiet "$TORCH" "${PKGS[@]}"

"$PYTHON" - <<'PY'
import torch
assert torch.version.cuda is None, f"expected a CPU-only torch, got {torch.__version__}"
print(f"install_torch_cpu: torch {torch.__version__} (CPU) ready")
PY
