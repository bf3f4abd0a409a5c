"""Known teachers by short name: the hub checkpoints recipes distil from.

A recipe looks a teacher up by its short name (``hub_name('mae_b16')``); this table names no recipe. Each
entry also says what the repo's timm ``config.json`` holds beyond its name (head size, input mean/std),
so a known teacher is described without any download (``known_config``; ``hub.describe``).
"""

from __future__ import annotations

import dataclasses

from hybrid_distill_jax.errors import ConfigError
from hybrid_distill_jax.teachers.families.base import CLIP_INPUT, IMAGENET_INPUT


@dataclasses.dataclass(frozen=True)
class KnownTeacher:
    hub: str  # hf-hub:timm/ARCHITECTURE.TAG
    what: str
    num_classes: int = 0
    input: dict = dataclasses.field(default_factory=lambda: IMAGENET_INPUT)


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
    "mae_b16": KnownTeacher("hf-hub:timm/vit_base_patch16_224.mae", "MAE ViT-B/16 encoder"),
    "mae_l16": KnownTeacher("hf-hub:timm/vit_large_patch16_224.mae", "MAE ViT-L/16 encoder"),
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
    architecture, _, tag = repo.split("/", 1)[1].partition(".")
    inputs = listed[0].input
    return {
        "architecture": architecture,
        "num_classes": listed[0].num_classes,
        "pretrained_cfg": {
            "tag": tag,
            "input_size": [3, 224, 224],
            "mean": list(inputs["mean"]),
            "std": list(inputs["std"]),
        },
    }
