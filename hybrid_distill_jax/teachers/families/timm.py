"""timm ``VisionTransformer`` state dicts (and DeiT-distilled ones), with the timm ``config.json`` beside
the weights when there is one."""

from hybrid_distill_jax.teachers.families.base import DEIT_DISTILLATION_HEAD, TIMM_LAYOUT, Family, register

register(
    Family(
        "timm",
        TIMM_LAYOUT,
        act="gelu",
        norm_eps=1e-6,
        drop=(DEIT_DISTILLATION_HEAD,),
        reads_timm_config=True,
        plain_tower_defaults=True,
        defaults_name="timm's defaults",
        help="timm VisionTransformer state dict",
    )
)
