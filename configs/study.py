"""A small-scale reproduction of the paper's evidence, one command, sized for a 2-core CPU (~15 min):

    python -m hybrid_distill_jax.main --config configs/study.py --workdir runs/study

Models (same architecture, ViT nano/4 at 24 px = a 6x6 patch grid, the embedded Fashion-MNIST subset):
a supervised teacher and an MAE teacher, then five students distilled from them: FD-only (feature term),
relation-only (relation term), Hybrid without masking, Hybrid with progressive *random* masking, and
Hybrid with progressive *redundant* masking (the method; mask ratio 0 -> 0.25 -> 0.5). Each model (and the
untrained student) is evaluated by k-NN and a linear probe on frozen features and by a short full
fine-tuning; attention distance and NMI are measured per layer and head. The run writes
WORKDIR/summary.json and ``report_dir``/RESULTS.md with tables, plots (``report_dir``/results/*.png),
the command and the machine. Finished stages are reused on a re-run.

Another dataset: ``--config.data.name=cifar10 --config.data.data_dir=$TFDS_DATA_DIR
--config.data.train_split=train --config.data.eval_split=test --config.image_size=32`` (shared by every
stage; ``--config.variant`` sets the shared architecture). ``configs/study.py:smoke`` is a seconds-long
run of the same chain (tests).
"""

import ml_collections

from hybrid_distill_jax.config_lib import base_config

PROGRESSIVE = dict(stage_starts=(0.0, 0.3, 0.6), stage_ratios=(0.0, 0.25, 0.5))
NO_MASK = dict(stage_starts=(0.0,), stage_ratios=(0.0,))


def _common(c, name: str, steps: int, batch: int, lr: float):
    c.name = name
    c.batch_size = batch
    c.total_steps = steps
    c.optim.lr = lr
    c.optim.warmup_steps = max(steps // 10, 1)
    c.optim.min_lr = lr / 100
    c.optim.weight_decay = 0.05
    c.optim.grad_clip = 1.0
    c.log_every = 50
    c.checkpoint_every = 0
    c.eval.max_train = 10_000
    c.eval.batch_size = 500
    c.eval.linear_epochs = 30
    return c


def teacher_supervised(steps):
    c = _common(base_config("supervised"), "teacher_supervised", steps, 128, 2e-3)
    c.model.drop_path = 0.0
    c.loss.label_smoothing = 0.1
    return c


def teacher_mae(steps):
    c = _common(base_config("mae"), "teacher_mae", steps, 128, 2e-3)
    c.model.drop_path = 0.0
    c.mae.update(dict(mask_ratio=0.75, decoder_width=64, decoder_depth=1, decoder_heads=4))
    return c


def student(name: str, steps: int, *, alpha=1.0, beta=1.0, masking=NO_MASK, selection="gumbel"):
    c = _common(base_config("distill"), name, steps, 128, 2e-3)
    c.student.drop_path = 0.0
    c.loss.alpha, c.loss.beta = alpha, beta
    c.masking.update(masking)
    c.masking.selection = selection
    # Patches are scored by the feature teacher's CLS attention only when the selection uses them.
    needs_scores = selection != "random" and masking["stage_ratios"] != (0.0,)
    c.masking.score_source = "feature_teacher" if needs_scores else "uniform"
    # diag/... attention-diagnostics curves in the stage's metrics.jsonl
    c.eval.diagnostics_every = 50 * max(steps // 200, 1) if steps >= 100 else 0
    return c


def finetune(steps):
    c = _common(base_config("finetune"), "finetune", steps, 128, 2e-3)
    c.optim.warmup_steps = max(steps // 10, 1)
    c.optim.min_lr = 2e-5
    c.optim.grad_clip = 0.0
    c.model.drop_path = 0.1
    c.finetune.layer_decay = 0.75
    c.finetune.mixup = 0.2
    c.finetune.cutmix = 0.0
    c.loss.label_smoothing = 0.1
    return c


def get_config(arg=None):
    smoke = arg == "smoke"
    t_steps, s_steps, f_steps = (4, 6, 4) if smoke else (400, 300, 150)
    c = ml_collections.ConfigDict()
    c.mode = "study"
    c.name = "study"
    c.report_dir = "docs"  # RESULTS.md and results/*.png go here; "" = the workdir
    # Shared by every stage (applied by the study runner):
    c.image_size = 24  # Fashion-MNIST's 28 px resized
    c.variant = "nano/4"  # width 64, 4 blocks, 4 heads; patch 4 -> a 6x6 grid
    c.data = base_config("distill").data
    c.data.name = "embedded_fashion_mnist"
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.shuffle_buffer = 10_000
    c.data.crop_scale = (0.6, 1.0)

    c.teacher_supervised = teacher_supervised(t_steps)
    c.teacher_mae = teacher_mae(t_steps)
    c.fd_only = student("fd_only", s_steps, beta=0.0)
    c.relation_only = student("relation_only", s_steps, alpha=0.0)
    c.hybrid_nomask = student("hybrid_nomask", s_steps)
    c.hybrid_random = student("hybrid_random", s_steps, masking=PROGRESSIVE, selection="random")
    c.hybrid_progressive = student("hybrid_progressive", s_steps, masking=PROGRESSIVE)
    c.students = ("fd_only", "relation_only", "hybrid_nomask", "hybrid_random", "hybrid_progressive")
    c.finetune = finetune(f_steps)
    # Fine-tuning is ~2.5 epochs: milder crops than pre-training, so the train views stay close to the
    # center-crop evaluation view (a 0.6 minimum area costs ~7 points at this length).
    c.finetune_crop_scale = (0.8, 1.0)
    # Fine-tuned after pre-training ('random_init' = the student architecture from scratch).
    c.finetune_models = ("teacher_supervised", "teacher_mae", *c.students, "random_init")
    c.diagnostics = ml_collections.ConfigDict(dict(num_images=500, batch_size=250))
    if smoke:
        c.variant = "pico/4"
        c.students = ("hybrid_progressive",)
        c.finetune_models = ("hybrid_progressive",)
        c.diagnostics.num_images = 64
        for key in ("teacher_supervised", "teacher_mae", *c.students, "finetune"):
            c[key].batch_size = 32
            c[key].log_every = 2
            c[key].eval.max_train = 400
            c[key].eval.max_test = 200
            c[key].eval.linear_epochs = 2
        c.hybrid_progressive.eval.diagnostics_every = 2  # exercises the trainer's hook
    return c
