"""A seconds-long distillation config for subprocess tests; pass teachers and data_dir as overrides:

    python -m hybrid_distill_jax.main --config tests/tiny_config.py --workdir DIR \\
        --config.data.data_dir=D --config.teachers.deit.checkpoint=F \\
        --config.teachers.mae.checkpoint=R

``tests/tiny_config.py:three`` adds a third teacher, ``teachers.dino`` (pass its checkpoint too), whose
block-2 hidden tokens the student's block 1 regresses (``terms.dino_block2``), beside the two-teacher
objective.
"""

from hybrid_distill_jax.config_lib import base_config
from hybrid_distill_jax.teachers import teacher_config
from hybrid_distill_jax.terms import term_config


def get_config(arg=None):
    c = base_config("distill")
    c.name = "tiny"
    c.image_size = 32
    c.batch_size = 8
    c.total_steps = 12
    c.data.name = "embedded_fashion_mnist"
    c.data.train_split, c.data.eval_split = "train", "test"
    c.data.shuffle_buffer = 256
    c.student.variant = "pico/8"
    c.student.drop_path = 0.1  # exercises the dropout RNG across a resume
    c.teachers.deit.dtype = "float32"
    c.teachers.mae.dtype = "float32"
    if arg == "three":
        c.name = "tiny_three"
        c.teachers.dino = teacher_config(dtype="float32")
        c.terms.dino_block2 = term_config("tokens", "dino", teacher_block=2, student_block=1, weight=0.5)
    c.masking.stage_starts = (0.0, 0.5)
    c.masking.stage_ratios = (0.25, 0.5)
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 2
    c.log_every = 1
    c.checkpoint_every = 2
    c.keep_checkpoints = 2
    c.tensorboard = False
    c.eval.at_end = False
    return c
