"""Training modes for the two kinds of teacher: supervised classification and MAE pre-training.

They let the demo (and users without checkpoints) distill from real, trained teachers. Both export a
plain ViT that ``teachers.*.checkpoint`` can point at.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hybrid_distill_jax import losses, masking
from hybrid_distill_jax.distill import normalize, pooled_features, vit_from_config
from hybrid_distill_jax.models import io as model_io
from hybrid_distill_jax.models.mae import MAE, mae_loss


def _model_from(config, num_classes: int):
    return vit_from_config(config.model, "model", image_size=config.image_size, num_classes=num_classes)


class SupervisedTask:
    """Cross-entropy classification of the training labels (a DeiT-like feature teacher)."""

    name = "supervised"
    frozen: dict = {}

    def __init__(self, config, num_classes: int):
        self.config = config
        self.num_classes = num_classes
        self.model = _model_from(config, num_classes)
        self.mean, self.std = tuple(config.model.mean), tuple(config.model.std)

    def init_params(self, rng):
        x = jnp.zeros((1, self.config.image_size, self.config.image_size, 3), jnp.float32)
        return self.model.init(rng, x)["params"]

    def static_args(self, step, total_steps):
        return None

    def stage_boundaries(self, total_steps):
        return [0]

    def loss_fn(self, params, frozen, batch, rng, static):
        out = self.model.apply(
            {"params": params},
            normalize(batch["image"], self.mean, self.std, self.config.image_size),
            train=True,
            rngs={"dropout": rng},
        )
        loss = losses.cross_entropy(
            out["logits"], batch["label"], self.num_classes, self.config.loss.label_smoothing
        )
        accuracy = jnp.mean((jnp.argmax(out["logits"], -1) == batch["label"]).astype(jnp.float32))
        return loss, {"loss": loss, "accuracy": accuracy}

    def feature_fn(self, params, images):
        out = self.model.apply(
            {"params": params}, normalize(images, self.mean, self.std, self.config.image_size)
        )
        return pooled_features(out, self.config.eval.pool, self.model.num_prefix)

    def export(self, params, directory):
        return model_io.save_model(
            directory,
            self.model,
            params,
            mean=self.mean,
            std=self.std,
            extra={"trained_by": "hybrid_distill_jax supervised"},
        )


class MAETask:
    """MAE: reconstruct the pixels of a random 75% of the patches from the other 25%."""

    name = "mae"
    frozen: dict = {}

    def __init__(self, config, num_classes: int):
        self.config = config
        self.encoder = _model_from(config, 0)
        mcfg = config.mae
        self.model = MAE(
            self.encoder,
            mcfg.decoder_width,
            mcfg.decoder_depth,
            mcfg.decoder_heads,
            dtype=self.encoder.dtype,
            param_dtype=self.encoder.param_dtype,
        )
        self.mean, self.std = tuple(config.model.mean), tuple(config.model.std)
        self.num_patches = self.encoder.grid**2
        self.keep = masking.keep_count(self.num_patches, mcfg.mask_ratio)

    def _keep_indices(self, rng, batch_size):
        scores = jnp.ones((batch_size, self.num_patches), jnp.float32)
        return masking.select_tokens(rng, scores, self.keep, "random")

    def init_params(self, rng):
        x = jnp.zeros((1, self.config.image_size, self.config.image_size, 3), jnp.float32)
        return self.model.init(rng, x, self._keep_indices(rng, 1))["params"]

    def static_args(self, step, total_steps):
        return None

    def stage_boundaries(self, total_steps):
        return [0]

    def loss_fn(self, params, frozen, batch, rng, static):
        rng_mask, rng_drop = jax.random.split(rng)
        images = normalize(batch["image"], self.mean, self.std, self.config.image_size)
        keep = self._keep_indices(rng_mask, images.shape[0])
        pred = self.model.apply({"params": params}, images, keep, train=True, rngs={"dropout": rng_drop})
        loss = mae_loss(pred, images, self.encoder.patch_size, keep, self.config.mae.norm_pix_loss)
        return loss, {"loss": loss}

    def feature_fn(self, params, images):
        out = self.encoder.apply(
            {"params": params["encoder"]}, normalize(images, self.mean, self.std, self.config.image_size)
        )
        return pooled_features(out, self.config.eval.pool, self.encoder.num_prefix)

    def export(self, params, directory):
        return model_io.save_model(
            directory,
            self.encoder,
            params["encoder"],
            mean=self.mean,
            std=self.std,
            extra={"trained_by": "hybrid_distill_jax mae"},
        )
