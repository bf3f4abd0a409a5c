"""``mode='supervised'``: cross-entropy classification of the training labels.

It trains a DeiT-like feature teacher for the demo and for users without checkpoints; the export is a
plain ViT that a distillation teacher (``teachers.NAME.checkpoint``) can point at.
"""

from __future__ import annotations

import jax.numpy as jnp

from hybrid_distill_jax import losses
from hybrid_distill_jax.models.build import normalize, vit_from_config
from hybrid_distill_jax.tasks import base


@base.register
class SupervisedTask(base.Task):
    name = "supervised"

    @staticmethod
    def add_defaults(c):
        c.model = base.model_section()
        c.loss = base.loss_section()

    @staticmethod
    def check_config(config, *, check_teachers=True, deviceless=False):
        base.check_model_section(config)
        base.check_loss_section(config)

    def __init__(self, config, num_classes: int, *, abstract: bool = False, platform: str | None = None):
        super().__init__(config, num_classes, abstract=abstract, platform=platform)
        self.vit = vit_from_config(
            config.model,
            "model",
            platform=self.platform,
            image_size=config.image_size,
            num_classes=num_classes,
        )
        self.mean, self.std = tuple(config.model.mean), tuple(config.model.std)

    def init_params(self, rng):
        return self.vit.init(rng, jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32))["params"]

    def loss_fn(self, params, frozen, batch, rng, stage):
        out = self.vit.apply(
            {"params": params},
            normalize(batch["image"], self.mean, self.std, self.image_size),
            train=True,
            rngs={"dropout": rng},
        )
        loss = losses.cross_entropy(
            out["logits"], batch["label"], self.num_classes, self.config.loss.label_smoothing
        )
        accuracy = jnp.mean((jnp.argmax(out["logits"], -1) == batch["label"]).astype(jnp.float32))
        return loss, {"loss": loss, "accuracy": accuracy}
