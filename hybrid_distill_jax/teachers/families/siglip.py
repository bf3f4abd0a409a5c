"""SigLIP and SigLIP2 image towers in timm's layout (``vit_*_siglip_*``): no CLS token, a MAP head
(``attn_pool.*``) whose output is the image's summary, inputs scaled to [-1, 1]."""

from hybrid_distill_jax.teachers.families.base import TIMM_LAYOUT, Family, register

register(
    Family(
        "siglip",
        TIMM_LAYOUT,
        act="gelu",
        norm_eps=1e-6,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        help="timm vit_*_siglip_* state dict (no CLS, MAP head)",
    )
)
