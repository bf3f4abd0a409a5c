#!/usr/bin/env bash
# The accelerator check: one script, at most ~8 minutes on one H100/H200, one table (+ JSON) at the end.
#
#   bash benchmarks/accelerator_check.sh            # PYTHON=... to pick the interpreter, OUT=DIR for the files
#
# Runs, each through benchmarks/throughput.py (ViT-B/16 student + two B/16 teachers, 224 px, batch 256):
#   b16       the PyTorch peers (torch eager at keep 0.5 and 1.0, torch.compile at 0.5) and ours at 0.5 and 1.0
#   cudnn     ours at 0.5 with the frozen teachers on cuDNN attention (teachers.*.attn_impl='cudnn')
#   on_kept   ours at 0.5 with the relation teacher on the kept tokens (different work: compare as such)
#   l16       the ViT-L/16 <- CLIP-L/14 + MAE-L/16 step at batch 128 with dots_saveable remat (does it fit?)
#   e2e       ours at 0.5 fed by the input pipeline from 1,024 ImageNet-like JPEGs made on the host
# Measured on one H200 (2026-11-28, jax 0.11.2; docs/PERFORMANCE.md): b16 took ~230 s (torch.compile's 66 s
# warm-up included), l16 ~195 s (85 s of it exporting the random L teachers), cudnn ~95 s and on_kept ~75 s,
# each of those two ~37 s exporting B teachers that --teachers_dir now shares. The list is ~9 min of work:
# under the default BUDGET_S the last runs are skipped, and the table says so.
# Without an NVIDIA GPU visible to both nvidia-smi and JAX it stops at once with exit status 2; when the
# tiny CPU smoke run fails (an API break with the installed JAX/Flax), with 3. e2e needs TensorFlow/TFDS.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-$(mktemp -d -t accelerator_check.XXXXXX)}
BUDGET_S=${BUDGET_S:-470}
mkdir -p "$OUT"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "accelerator_check: no NVIDIA GPU here (nvidia-smi -L failed); run this on an H100/H200 machine" >&2
  exit 2
fi
if ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  echo "accelerator_check: JAX sees no GPU (jax.default_backend() != 'gpu' with $PY); install jax[cuda12]" >&2
  exit 2
fi
nvidia-smi -L
"$PY" -c "import sys, jax, jaxlib, flax, optax; print('# python', sys.version.split()[0], '| jax', jax.__version__, '| jaxlib', jaxlib.__version__, '| flax', flax.__version__, '| optax', optax.__version__)"
deadline=$((SECONDS + BUDGET_S))
# A tiny CPU run first: an API break with this machine's JAX/Flax shows in seconds, not after the budget.
if ! "$PY" benchmarks/throughput.py --cpu-smoke >"$OUT/smoke.txt" 2>"$OUT/smoke.err"; then
  tail -n 20 "$OUT/smoke.err"
  echo "accelerator_check: benchmarks/throughput.py --cpu-smoke failed (above); fix that first" >&2
  exit 3
fi

run() {  # run NAME ARGS...: one throughput.py invocation, bounded by what is left of the budget
  local name=$1
  shift
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 40 ]; then
    echo "# $name: skipped, out of time" | tee "$OUT/$name.skipped"
    return
  fi
  echo "# $name: throughput.py $* (at most ${left} s)"
  timeout "$left" "$PY" benchmarks/throughput.py "$@" --json "$OUT/$name.json" >"$OUT/$name.txt" 2>"$OUT/$name.err"
  local rc=$?
  grep '^{' "$OUT/$name.txt" || tail -n 3 "$OUT/$name.err"
  [ "$rc" -eq 0 ] || echo "# $name: exit status $rc (see $OUT/$name.err)"
}

# Most important first: a run that the budget cannot fit is skipped and says so in the table.
T="--teachers_dir $OUT/teachers"
run b16 --quick $T
run l16 --quick --no-peer --keep 0.5 --preset l16 --batch 128 --remat_policy dots_saveable $T
run cudnn --quick --no-peer --keep 0.5 --teacher_attn_impl cudnn $T
run on_kept --quick --no-peer --keep 0.5 --relation_on_kept $T
if "$PY" -c "import tensorflow, tensorflow_datasets" 2>/dev/null; then
  "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import input_pipeline; input_pipeline.make_jpegs('$OUT/jpegs', 1024)"
  run e2e --quick --no-peer --keep 0.5 --data "$OUT/jpegs" $T
else
  echo "# e2e: skipped, TensorFlow/TFDS are not installed for $PY (the input pipeline needs them)" | tee "$OUT/e2e.skipped"
fi

"$PY" - "$OUT" <<'EOF'
import json, os, sys

out = sys.argv[1]
rows, summary = [], {}
for name in ("b16", "l16", "cudnn", "on_kept", "e2e"):
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        skipped = os.path.join(out, f"{name}.skipped")
        why = open(skipped).read().strip().lstrip("# ") if os.path.exists(skipped) else f"no result: see {name}.err"
        rows.append(f"| {name} | ({why}) | | | | | | |")
        continue
    with open(path) as f:
        result = json.load(f)
    summary[name] = result
    for p in result.get("peers", []):
        rows.append(f"| {name} | {p['impl']} | {p['keep']} | {p.get('img_s', p.get('error'))} | | | {p.get('peak_gb')} | |")
    for r in result["runs"]:
        e2e = round(r["e2e_img_s"] / r["chips"], 1) if "e2e_img_s" in r else "-"
        rows.append(
            f"| {name} | jax {r['preset']} | {r['keep']} | {r['img_s_per_chip']} | {e2e} | {r['mfu']:.1%} "
            f"| {r['peak_gb']} | {r['finite']} |"
        )
print(f"\n# {summary.get('b16', {}).get('device', '?')}: img/s per chip")
print("| run | impl | keep | img/s/chip | end-to-end img/s/chip | MFU | peak GiB | finite loss |")
print("|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
with open(os.path.join(out, "accelerator_check.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(f"\n# JSON: {os.path.join(out, 'accelerator_check.json')}")
EOF
