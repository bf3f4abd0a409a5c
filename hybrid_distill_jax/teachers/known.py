"""Known teachers by short name: the hub checkpoints recipes distil from.

A recipe looks a teacher up by its short name (``hub_name('mae_b16')``); this table names no recipe. Each
entry also says what the repo's timm ``config.json`` holds beyond its name (head size, input size,
mean/std), so a known teacher is described without any download (``known_config``; ``hub.describe``),
and the licence its weights are released under (timm's ``pretrained_cfg['license']``).

NVIDIA's C-RADIO v3/v4 are listed as timm's ``vit_*_radio_v3/v4`` backbones (families/radio.py: their
128x128 position grid resampled as timm's loader does); timm's weights have no adaptor heads, so what
they teach is the backbone's tokens and its CLS token. (timm's ``naflexvit_*_radio_*`` ``NaFlexVit``
builds of the same weights are a class we do not convert; timm's giant v3 converts by hub name but is
not listed.)
"""

from __future__ import annotations

import dataclasses

from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.teachers.families.base import CLIP_INPUT, IMAGENET_INPUT

SIGLIP_INPUT = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
RADIO_LICENCE = "nvidia-open-model-license"


@dataclasses.dataclass(frozen=True)
class KnownTeacher:
    hub: str  # hf-hub:timm/ARCHITECTURE.TAG
    what: str
    num_classes: int = 0
    input: dict = dataclasses.field(default_factory=lambda: IMAGENET_INPUT)
    image_size: int = 224  # timm's pretrained_cfg input size (a /14 SigLIP at 384 runs on a 27x27 grid)
    licence: str = "apache-2.0"


def _siglip(arch: str, tag: str, what: str, image_size: int) -> KnownTeacher:
    return KnownTeacher(
        f"hf-hub:timm/{arch}.{tag}", what, input=SIGLIP_INPUT, image_size=image_size, licence="apache-2.0"
    )


def _radio(arch: str, what: str) -> KnownTeacher:
    return KnownTeacher(
        f"hf-hub:timm/{arch}.c_radio", what, input=CLIP_INPUT, image_size=512, licence=RADIO_LICENCE
    )


KNOWN: dict[str, KnownTeacher] = {
    "deit_b16": KnownTeacher(
        "hf-hub:timm/deit_base_patch16_224.fb_in1k", "DeiT-B/16, supervised ImageNet-1k", num_classes=1000
    ),
    "clip_b16": KnownTeacher(
        "hf-hub:timm/vit_base_patch16_clip_224.openai",
        "CLIP ViT-B/16 image tower (OpenAI, QuickGELU)",
        num_classes=512,
        input=CLIP_INPUT,
    ),
    "clip_l14": KnownTeacher(
        "hf-hub:timm/vit_large_patch14_clip_224.openai",
        "CLIP ViT-L/14 image tower (OpenAI, QuickGELU); at 196 px its grid matches a /16 student at 224",
        num_classes=768,
        input=CLIP_INPUT,
    ),
    "dino_b16": KnownTeacher(
        "hf-hub:timm/vit_base_patch16_224.dino", "DINO ViT-B/16 (self-supervised contrastive)"
    ),
    "mae_b16": KnownTeacher(
        "hf-hub:timm/vit_base_patch16_224.mae", "MAE ViT-B/16 encoder", licence="cc-by-nc-4.0"
    ),
    "mae_l16": KnownTeacher(
        "hf-hub:timm/vit_large_patch16_224.mae", "MAE ViT-L/16 encoder", licence="cc-by-nc-4.0"
    ),
    "dinov2reg_b14": KnownTeacher(
        "hf-hub:timm/vit_base_patch14_reg4_dinov2.lvd142m",
        "DINOv2 ViT-B/14 with 4 registers (LVD-142M); at 196 px its grid matches a /16 student at 224",
        image_size=518,
    ),
    "dinov2reg_l14": KnownTeacher(
        "hf-hub:timm/vit_large_patch14_reg4_dinov2.lvd142m",
        "DINOv2 ViT-L/14 with 4 registers (LVD-142M)",
        image_size=518,
    ),
    "dinov3_b16": KnownTeacher(
        "hf-hub:timm/vit_base_patch16_dinov3.lvd1689m",
        "DINOv3 ViT-B/16 (LVD-1689M; RoPE, 4 registers; summary: the CLS token)",
        image_size=256,
        licence="dinov3-license",
    ),
    "dinov3_l16": KnownTeacher(
        "hf-hub:timm/vit_large_patch16_dinov3.lvd1689m",
        "DINOv3 ViT-L/16 (LVD-1689M; RoPE, 4 registers; summary: the CLS token)",
        image_size=256,
        licence="dinov3-license",
    ),
    "siglip_b16": _siglip(
        "vit_base_patch16_siglip_224", "webli", "SigLIP ViT-B/16 image tower (WebLI; MAP head)", 224
    ),
    "siglip_b16_384": _siglip(
        "vit_base_patch16_siglip_384", "webli", "SigLIP ViT-B/16 image tower at 384 px (WebLI)", 384
    ),
    "siglip2_b16": _siglip(
        "vit_base_patch16_siglip_224", "v2_webli", "SigLIP 2 ViT-B/16 image tower (WebLI; MAP head)", 224
    ),
    "siglip2_b16_384": _siglip(
        "vit_base_patch16_siglip_384", "v2_webli", "SigLIP 2 ViT-B/16 image tower at 384 px (WebLI)", 384
    ),
    "siglip_so400m14": _siglip(
        "vit_so400m_patch14_siglip_224", "webli", "SigLIP So400m/14 image tower (WebLI; MAP head)", 224
    ),
    "siglip_so400m14_384": _siglip(
        "vit_so400m_patch14_siglip_384",
        "webli",
        "SigLIP So400m/14 at 384 px (WebLI); 27x27 patches: converted for 378 px",
        384,
    ),
    "siglip2_so400m14": _siglip(
        "vit_so400m_patch14_siglip_224", "v2_webli", "SigLIP 2 So400m/14 image tower (WebLI; MAP head)", 224
    ),
    "siglip2_so400m14_378": _siglip(
        "vit_so400m_patch14_siglip_378", "v2_webli", "SigLIP 2 So400m/14 image tower at 378 px (WebLI)", 378
    ),
    "radio_v3_b16": _radio(
        "vit_base_patch16_radio_v3", "C-RADIOv3-B/16 (7 registers, LayerScale; summary: the CLS token)"
    ),
    "radio_v3_l16": _radio(
        "vit_large_patch16_radio_v3", "C-RADIOv3-L/16 (7 registers, LayerScale; summary: the CLS token)"
    ),
    "radio_v3_h16": _radio(
        "vit_huge_patch16_radio_v3", "C-RADIOv3-H/16 (7 registers; summary: the CLS token)"
    ),
    "radio_v4_so400m16": _radio(
        "vit_so400m_patch16_radio_v4", "C-RADIOv4-SO400M/16 (9 registers; summary: the CLS token)"
    ),
    "radio_v4_h16": _radio(
        "vit_huge_patch16_radio_v4", "C-RADIOv4-H/16 (9 registers; summary: the CLS token)"
    ),
}


def hub_name(short: str) -> str:
    """The hub name of the known teacher ``short`` ('mae_b16' -> 'hf-hub:timm/vit_base_patch16_224.mae')."""
    if short not in KNOWN:
        raise ConfigError(f"no known teacher {short!r}; known: {', '.join(KNOWN)}")
    return KNOWN[short].hub


def known_config(repo: str) -> dict | None:
    """The timm ``config.json`` fields a known teacher's shapes depend on (by hub repo ``ORG/NAME``)."""
    listed = [t for t in KNOWN.values() if t.hub.partition(":")[2] == repo]
    if not listed:
        return None
    teacher = listed[0]
    architecture, _, tag = repo.split("/", 1)[1].partition(".")
    return {
        "architecture": architecture,
        "num_classes": teacher.num_classes,
        "pretrained_cfg": {
            "tag": tag,
            "input_size": [3, teacher.image_size, teacher.image_size],
            "mean": list(teacher.input["mean"]),
            "std": list(teacher.input["std"]),
            "license": teacher.licence,
        },
    }
