"""DINOv2 with registers in timm's layout (``vit_*_patch14_reg4_dinov2``): register tokens, LayerScale, and
a position table for the patches alone."""

from hybrid_distill_jax.teachers.families.base import IMAGENET_INPUT, TIMM_LAYOUT, Family, register

register(
    Family(
        "dinov2",
        TIMM_LAYOUT,
        act="gelu",
        norm_eps=1e-6,
        **IMAGENET_INPUT,
        help="timm vit_*_reg4_dinov2 / vit_*_dinov2 state dict (registers, LayerScale)",
    )
)
