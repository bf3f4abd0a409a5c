"""DINOv3 in timm's ``Eva`` layout (``vit_*_patch16_dinov3[_qkvb]``): rotary position embeddings (no
position table; any resolution), four registers, LayerScale, LayerNorm eps 1e-5. Its summary is the CLS
token, as upstream DINOv3's (timm's default head averages the patches)."""

from hybrid_distill_jax.teachers.families.base import EVA_LAYOUT, IMAGENET_INPUT, Family, register

register(
    Family(
        "dinov3",
        EVA_LAYOUT,
        act="gelu",
        norm_eps=1e-5,
        **IMAGENET_INPUT,
        posemb="rope",
        image_size=256,
        help="timm vit_*_patch16_dinov3 / _dinov3_qkvb (Eva) state dict",
    )
)
