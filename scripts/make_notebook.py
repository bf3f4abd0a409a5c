"""Writes notebooks/hybrid_distill.ipynb (outputs cleared) from the cells below.

    python scripts/make_notebook.py

Edit the notebook here, not in Jupyter, so that the committed file stays reviewable and output-free.
"""

from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

BADGE = (
    "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
    "(https://colab.research.google.com/github/hybrid-distill-jax/hybrid_distill_jax/blob/main/"
    "notebooks/hybrid_distill.ipynb)"
)

CELLS = [
    (
        "md",
        f"""# Hybrid Distill in JAX — from zero to a distilled student

{BADGE}

This notebook installs `hybrid_distill_jax`, trains (or loads) two teachers, distills a ViT student from
both at once, and looks at what the student learned: loss curves, attention maps of teacher vs student,
and the paper's attention diagnostics (average attention distance and NMI per layer). It ends by
exporting the student as a timm checkpoint for PyTorch detection/segmentation code.

It runs on CPU (a few minutes on the embedded Fashion-MNIST subset), GPU or TPU runtimes.""",
    ),
    (
        "md",
        """## Parameters

`SMOKE=True` runs a seconds-long version of every step (the test suite runs the notebook that way).
To distill from your own teachers, convert them first (see `docs/CONVERT.md`), upload the output
directories and set `FEATURE_TEACHER_DIR` / `RELATION_TEACHER_DIR` (the student's `teachers.deit` and
`teachers.mae`); their patch grids must match the student's, and the relation teacher's head count must
equal the student's.""",
    ),
    (
        "code",
        """import os

SMOKE = os.environ.get("HD_NOTEBOOK_SMOKE", "0") == "1"
WORKDIR = os.path.abspath(os.environ.get("HD_NOTEBOOK_WORKDIR", "runs/notebook"))
TEACHER_STEPS = 8 if SMOKE else 500
STUDENT_STEPS = 8 if SMOKE else 400
FEATURE_TEACHER_DIR = ""   # e.g. "teachers/deit_small" (`python -m hybrid_distill_jax.teachers import ...`)
RELATION_TEACHER_DIR = ""  # e.g. "teachers/mae_small"
REPO_URL = "https://github.com/hybrid-distill-jax/hybrid_distill_jax"  # cloned only if not installed yet""",
    ),
    (
        "md",
        """## Install

Installs the package from the repository with the JAX build that fits the runtime it finds (CPU,
CUDA GPU or TPU). Nothing happens when the package is already importable.""",
    ),
    (
        "code",
        """import importlib.util
import shutil
import subprocess
import sys


def detect_runtime() -> str:
    if os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME") or os.path.exists("/dev/accel0"):
        return "tpu"
    if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi"], capture_output=True).returncode == 0:
        return "cuda"
    return "cpu"


RUNTIME = detect_runtime()
if importlib.util.find_spec("hybrid_distill_jax") is None:
    if not os.path.isdir("hybrid_distill_jax_repo"):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "hybrid_distill_jax_repo"], check=True)
    extra = {"cpu": "", "cuda": "[cuda]", "tpu": "[tpu]"}[RUNTIME]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"hybrid_distill_jax_repo{extra}"],
                   check=True)
    sys.path.insert(0, os.path.abspath("hybrid_distill_jax_repo"))

import jax  # noqa: E402

import hybrid_distill_jax  # noqa: E402

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(hybrid_distill_jax.__file__)))
print(f"runtime: {RUNTIME}; JAX devices: {jax.devices()}; repository: {REPO_DIR}")""",
    ),
    (
        "md",
        """## The method in three sentences

* A **feature teacher** (supervised or contrastive: DeiT, CLIP) sees the whole image; the student
  regresses its final tokens (whitened by a parameter-free LayerNorm) through a linear head with a
  SmoothL1 loss. This gives **discrimination**.
* A **relation teacher** (masked image modeling: MAE) gives attention maps at intermediate layers; the
  student imitates them with a KL divergence per query row. This keeps MIM's **diverse, local and
  global attention** instead of the collapse of late supervised/CL layers.
* **Progressive redundant token masking**: the feature teacher's CLS attention scores patches
  (`masking.score_teacher`); the student only sees K of them, sampled with Gumbel-top-k, with K
  shrinking in stages over training (one compile per stage). The teachers' targets are gathered at the
  kept tokens.

The config names the teachers `teachers.deit` and `teachers.mae`, and the two loss terms
`terms.feature` and `terms.relation`: `L = terms.feature.weight * L_feat + terms.relation.weight * L_rel`
(1 and 1); FD-only is `terms.relation.weight=0`, relation-only `terms.feature.weight=0`.""",
    ),
    ("md", "## The data: the embedded Fashion-MNIST subset (10,000 train / 2,000 test, real images)"),
    (
        "code",
        """import importlib.util as _ilu

import matplotlib.pyplot as plt
import numpy as np


def load_config_module(name):
    spec = _ilu.spec_from_file_location(name, os.path.join(REPO_DIR, "configs", f"{name}.py"))
    module = _ilu.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = load_config_module("demo").get_config("smoke" if SMOKE else None)
from hybrid_distill_jax.data import dataset_info, train_iterator  # noqa: E402

info = dataset_info(demo.teacher_supervised.data)
batch = next(train_iterator(demo.teacher_supervised.data, image_size=demo.teacher_supervised.image_size,
                            global_batch=16, seed=0, process_index=0, process_count=1))
fig, axes = plt.subplots(2, 8, figsize=(12, 3.4))
for ax, image, label in zip(axes.ravel(), batch["image"], batch["label"]):
    ax.imshow(image)
    ax.set_title(info.class_names[label] if info.class_names else int(label), fontsize=8)
    ax.axis("off")
plt.suptitle("training views (RandomResizedCrop + flip), the same crop goes to all three models")
plt.show()""",
    ),
    (
        "md",
        """## Teachers

Trains a supervised ViT (the feature teacher) and an MAE (the relation teacher) unless you gave
converted ones. A stage that already finished in `WORKDIR` is reused; the progress lines show loss,
images/s and the ETA.""",
    ),
    (
        "code",
        """from hybrid_distill_jax.experiments.stages import run_stage  # trains or reuses  # noqa: E402

results = {}
for key, given in (("teacher_supervised", FEATURE_TEACHER_DIR), ("teacher_mae", RELATION_TEACHER_DIR)):
    if given:
        print(f"{key}: using {given}")
        continue
    cfg = demo[key]
    cfg.total_steps = TEACHER_STEPS
    results[cfg.name] = run_stage(cfg, os.path.join(WORKDIR, cfg.name))
feature_dir = FEATURE_TEACHER_DIR or os.path.join(WORKDIR, "teacher_supervised", "export")
relation_dir = RELATION_TEACHER_DIR or os.path.join(WORKDIR, "teacher_mae", "export")
results""",
    ),
    ("md", "## Hybrid Distill: the student learns from both teachers"),
    (
        "code",
        """student_cfg = demo.hybrid_student
student_cfg.total_steps = STUDENT_STEPS
student_cfg.teachers.deit.checkpoint = feature_dir  # the feature term's teacher (terms.feature.teacher)
student_cfg.teachers.mae.checkpoint = relation_dir  # the relation term's teacher (terms.relation.teacher)
student_dir = os.path.join(WORKDIR, student_cfg.name)
results[student_cfg.name] = run_stage(student_cfg, student_dir)
results[student_cfg.name]""",
    ),
    (
        "code",
        """from hybrid_distill_jax.train.metrics import read_metrics  # noqa: E402

rows = [r for r in read_metrics(student_dir) if "loss" in r]
steps = [r["step"] for r in rows]
fig, (ax, ax_keep) = plt.subplots(1, 2, figsize=(11, 3.5))
for key in ("loss", "feature_loss", "relation_loss"):
    ax.plot(steps, [r[key] for r in rows], marker=".", label=key)
ax.set_xlabel("step")
ax.set_yscale("log")
ax.legend()
ax.set_title("loss terms")
ax_keep.step(steps, [r["keep"] for r in rows], where="post")
ax_keep.set_xlabel("step")
ax_keep.set_ylabel("kept patch tokens K")
ax_keep.set_title("progressive masking stages")
plt.show()""",
    ),
    (
        "md",
        """## Attention: teachers vs student

CLS -> patch attention of the last block (mean over heads) and, for a middle block, where one query
patch looks. Lighter = more attention.""",
    ),
    (
        "code",
        """import jax.numpy as jnp  # noqa: E402

from hybrid_distill_jax.data import eval_iterator  # noqa: E402
from hybrid_distill_jax.models.build import normalize  # noqa: E402
from hybrid_distill_jax.models.io import load_model  # noqa: E402

models = {
    "feature teacher": load_model(feature_dir),
    "MAE teacher": load_model(relation_dir),
    "student": load_model(os.path.join(student_dir, "export")),
}
eval_batches = eval_iterator(student_cfg.data, "test", image_size=student_cfg.image_size, batch_size=4)
images = next(eval_batches)["image"]


def attention_maps(model, params, meta, layer):
    size = meta["input"]["image_size"]
    x = normalize(jnp.asarray(images), meta["input"]["mean"], meta["input"]["std"], size)
    out = model.apply({"params": params}, x, attn_layers=(layer,))
    probs = jax.nn.softmax(out["attn_logits"][layer], axis=-1).mean(axis=1)  # [B, N, N], mean over heads
    p, grid = model.num_prefix, model.grid
    cls_map = probs[:, 0, p:].reshape(-1, grid, grid)
    centre = p + (grid // 2) * grid + grid // 2
    query_map = probs[:, centre, p:].reshape(-1, grid, grid)
    return np.asarray(cls_map), np.asarray(query_map)


columns = 1 + 2 * len(models)
fig, axes = plt.subplots(len(images), columns, figsize=(2 * columns, 2 * len(images)))
for col, (name, (model, params, meta)) in enumerate(models.items()):
    cls_map, _ = attention_maps(model, params, meta, model.depth)
    _, query_map = attention_maps(model, params, meta, max(1, model.depth // 2))
    for row in range(len(images)):
        axes[row, 1 + 2 * col].imshow(cls_map[row])
        axes[row, 2 + 2 * col].imshow(query_map[row])
        axes[0, 1 + 2 * col].set_title(f"{name}\\nCLS, last block", fontsize=8)
        axes[0, 2 + 2 * col].set_title(f"{name}\\ncentre query, mid block", fontsize=8)
for row in range(len(images)):
    axes[row, 0].imshow(images[row])
for ax in axes.ravel():
    ax.axis("off")
plt.tight_layout()
plt.show()""",
    ),
    (
        "md",
        """## The paper's diagnostics: attention distance and NMI per layer

Average attention distance (pixels) per head and layer, and normalised mutual information between
query and key positions per layer (near 0 = every query attends alike, i.e. attention collapse).""",
    ),
    (
        "code",
        """from IPython.display import Image, display  # noqa: E402

from hybrid_distill_jax.eval import diagnostics
from hybrid_distill_jax.experiments import plots  # noqa: E402

num_images = 32 if SMOKE else 256
diag = {name: diagnostics.diagnose_model_dir(os.path.dirname(meta_path), student_cfg.data,
                                             num_images=num_images, batch_size=32)
        for name, meta_path in (("feature teacher", os.path.join(feature_dir, "model.json")),
                                ("MAE teacher", os.path.join(relation_dir, "model.json")),
                                ("student", os.path.join(student_dir, "export", "model.json")))}
figures = plots.plot_diagnostics(diag, os.path.join(WORKDIR, "diagnostics"))
for path in figures.values():
    display(Image(filename=path))""",
    ),
    (
        "md",
        """## Export the student to timm

Writes a timm `VisionTransformer` state dict (`.safetensors`, no torch needed to write it). The command
prints the `timm.create_model(...)` arguments to load it with `strict=True` in PyTorch.""",
    ),
    (
        "code",
        """export_path = os.path.join(WORKDIR, "student_timm.safetensors")
done = subprocess.run([sys.executable, "-m", "hybrid_distill_jax.teachers", "export",
                       "--input", os.path.join(student_dir, "export"), "--output", export_path],
                      capture_output=True, text=True)
print(done.stdout[-2000:], done.stderr[-2000:])
assert done.returncode == 0 and os.path.getsize(export_path) > 0
print(f"wrote {export_path} ({os.path.getsize(export_path) / 1e6:.1f} MB)")""",
    ),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["colab"] = {"provenance": []}
    nb.metadata["accelerator"] = "GPU"
    for kind, source in CELLS:
        nb.cells.append(new_markdown_cell(source) if kind == "md" else new_code_cell(source))
    return nb


def main() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "notebooks", "hybrid_distill.ipynb")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nbformat.write(build(), path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
