"""Official MAE pre-training checkpoints: the encoder is kept, the decoder and mask token dropped."""

from hybrid_distill_jax.teachers.families.base import IMAGENET_INPUT, TIMM_LAYOUT, Family, register

register(
    Family(
        "mae",
        TIMM_LAYOUT,
        act="gelu",
        norm_eps=1e-6,
        **IMAGENET_INPUT,
        posemb="sincos2d",
        drop=((r"^decoder_", "MAE decoder"), (r"^mask_token$", "MAE mask token")),
        help="official MAE pre-training checkpoint ({'model': sd}); the encoder is kept",
    )
)
