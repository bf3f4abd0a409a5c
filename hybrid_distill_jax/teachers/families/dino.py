"""DINO ViT backbones: plain, or a full training checkpoint's ``teacher`` (``backbone.``/``head.``)."""

from hybrid_distill_jax.teachers.families.base import IMAGENET_INPUT, TIMM_LAYOUT, Family, register

register(
    Family(
        "dino",
        TIMM_LAYOUT,
        act="gelu",
        norm_eps=1e-6,
        **IMAGENET_INPUT,
        wrapper="backbone.",
        drop=((r"^head\.", "DINO projection head"),),
        help="DINO ViT backbone (plain, or a full checkpoint's 'teacher' with backbone./head.)",
    )
)
