"""DeiT and DeiT-distilled checkpoints as released (``{'model': sd}``) or as plain state dicts."""

from hybrid_distill_jax.teachers.families.base import (
    DEIT_DISTILLATION_HEAD,
    IMAGENET_INPUT,
    TIMM_LAYOUT,
    Family,
    register,
)

register(
    Family(
        "deit",
        TIMM_LAYOUT,
        act="gelu",
        norm_eps=1e-6,
        **IMAGENET_INPUT,
        drop=(DEIT_DISTILLATION_HEAD,),
        help="DeiT / DeiT-distilled ({'model': sd} as released, or a plain state dict)",
    )
)
