"""``mode='mae'``: MAE pre-training, reconstructing the pixels of a random 75% of the patches.

It trains the MIM teacher (whose attention relations a student imitates) for the demo and for users
without checkpoints; only the encoder is exported, as a plain ViT that ``teachers.NAME.checkpoint`` can
point at.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from hybrid_distill_jax import checks, masking
from hybrid_distill_jax.models.build import normalize, vit_from_config
from hybrid_distill_jax.models.mae import MAE, mae_loss
from hybrid_distill_jax.tasks.base import Task, check_model_section, model_section, register

MAE_RANGES = {
    "mask_ratio": checks.Range(0.0, 1.0, open_lo=True),
    "decoder_width": checks.ints(1),
    "decoder_depth": checks.ints(1),
    "decoder_heads": checks.ints(1),
}


@register
class MAETask(Task):
    name = "mae"

    @staticmethod
    def add_defaults(c):
        c.model = model_section(posemb="sincos2d")
        c.mae = ml_collections.ConfigDict(
            dict(mask_ratio=0.75, decoder_width=512, decoder_depth=8, decoder_heads=16, norm_pix_loss=True)
        )
        c.eval.pool = "gap"

    @staticmethod
    def check_config(config, *, check_teachers=True, deviceless=False):
        check_model_section(config)
        checks.check_ranges(config.mae, MAE_RANGES, prefix="mae.")

    def __init__(self, config, num_classes: int, *, abstract: bool = False, platform: str | None = None):
        super().__init__(config, num_classes, abstract=abstract, platform=platform)
        self.vit = vit_from_config(
            config.model, "model", platform=self.platform, image_size=config.image_size, num_classes=0
        )
        mcfg = config.mae
        self.mae = MAE(
            self.vit,
            mcfg.decoder_width,
            mcfg.decoder_depth,
            mcfg.decoder_heads,
            dtype=self.vit.dtype,
            param_dtype=self.vit.param_dtype,
        )
        self.mean, self.std = tuple(config.model.mean), tuple(config.model.std)
        self.num_patches = self.vit.grid**2
        self.keep = masking.keep_count(self.num_patches, mcfg.mask_ratio)

    def _keep_indices(self, rng, batch_size):
        scores = jnp.ones((batch_size, self.num_patches), jnp.float32)
        return masking.select_tokens(rng, scores, self.keep, "random")

    def init_params(self, rng):
        x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        return self.mae.init(rng, x, self._keep_indices(rng, 1))["params"]

    def vit_params(self, params):
        return params["encoder"]

    def loss_fn(self, params, frozen, batch, rng, stage):
        rng_mask, rng_drop = jax.random.split(rng)
        images = normalize(batch["image"], self.mean, self.std, self.image_size)
        keep = self._keep_indices(rng_mask, images.shape[0])
        pred = self.mae.apply({"params": params}, images, keep, train=True, rngs={"dropout": rng_drop})
        loss = mae_loss(pred, images, self.vit.patch_size, keep, self.config.mae.norm_pix_loss)
        return loss, {"loss": loss}
