"""OpenAI CLIP checkpoints (TorchScript ``.pt`` or a state dict): the visual tower is kept."""

from hybrid_distill_jax.teachers.families.base import CLIP_INPUT, CLIP_LAYOUT, Family, register

register(
    Family(
        "clip",
        CLIP_LAYOUT,
        act="quick_gelu",
        norm_eps=1e-5,
        **CLIP_INPUT,
        prefix="visual.",
        help="OpenAI CLIP (TorchScript .pt or state dict); the visual tower is kept",
    )
)
