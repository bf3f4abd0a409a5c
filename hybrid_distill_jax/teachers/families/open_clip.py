"""open_clip checkpoints (``.bin``/``.pt``/``.safetensors``): the visual tower is kept."""

from hybrid_distill_jax.teachers.families.base import CLIP_INPUT, CLIP_LAYOUT, Family, register

register(
    Family(
        "open_clip",
        CLIP_LAYOUT,
        act="gelu",
        norm_eps=1e-5,
        **CLIP_INPUT,
        prefix="visual.",
        help="open_clip checkpoint (.bin/.pt/.safetensors); pass --act quick_gelu for "
        "'-quickgelu' models and OpenAI-pretrained weights",
    )
)
