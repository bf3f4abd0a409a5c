"""Full fine-tuning (MAE protocol) of any exported or converted ViT, or of a ViT from scratch.

``mode='finetune'``: ``config.init_from`` names a model directory (``model.json`` + ``params.msgpack``,
exported by this library or converted from PyTorch); empty = a fresh ``config.model``. A new zero-init
classification head on global-average (``model.pool='gap'``) or CLS pooling replaces any old head.
Training runs in the common Trainer loop; this module supplies the task:

* layer-wise learning-rate decay (``finetune.layer_decay``): the update of a parameter of block ``i``
  (1-based; patch/position embedding and prefix tokens are layer 0, the final norm and the head layer
  ``depth + 1``) is scaled by ``layer_decay ** (depth + 1 - i)``, weight decay included (as MAE's
  ``lr_scale`` param groups);
* drop path (``model.drop_path``), mixup / cutmix switched per batch on device from the step's seeded
  RNG (``finetune.mixup``, ``finetune.cutmix``, ``finetune.mix_prob``, ``finetune.switch_prob``; timm's
  batch mode, partner = the batch reversed) and label smoothing (``loss.label_smoothing``) folded into
  the soft targets;
* evaluation: top-1 of the classifier on the eval split (``finetune_top1``), plus the frozen-feature
  k-NN / linear probe when ``eval.knn`` / ``eval.linear`` are on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hybrid_distill_jax import checks, teachers
from hybrid_distill_jax.errors import CheckpointError
from hybrid_distill_jax.models.build import MODEL_RANGES, normalize, vit_from_config
from hybrid_distill_jax.models.vit import resample_posemb
from hybrid_distill_jax.optim import make_optimizer
from hybrid_distill_jax.tasks import base

FINETUNE_RANGES = {
    "layer_decay": checks.Range(0.0, 1.0, open_lo=True, open_hi=False),
    "mixup": checks.Range(0.0, note="the Beta parameter; 0: off"),
    "cutmix": checks.Range(0.0, note="the Beta parameter; 0: off"),
    "mix_prob": checks.PROBABILITY,
    "switch_prob": checks.PROBABILITY,
}

# Top-level parameter names that sit below block 1 (layer id 0) for layer-wise lr decay.
EMBEDDING_NAMES = ("patch_embed", "pos_embed", "cls_token", "dist_token", "norm_pre")


def layer_id(path, depth: int) -> int:
    """0 for the embeddings, i for ``block{i}``, depth + 1 for everything after the last block."""
    top = str(getattr(path[0], "key", path[0]))
    if top in EMBEDDING_NAMES:
        return 0
    if top.startswith("block") and top[5:].isdigit():
        return int(top[5:])
    return depth + 1


def layer_scales(params, depth: int, decay: float):
    """The per-parameter update scale ``decay ** (depth + 1 - layer_id)`` as a tree of floats."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: float(decay ** (depth + 1 - layer_id(path, depth))), params
    )


def scale_by_layer_decay(depth: int, decay: float) -> optax.GradientTransformation:
    """Multiplies each update by its layer's scale (stateless; the scales follow the parameter names)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        scales = layer_scales(updates, depth, decay)
        return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

    return optax.GradientTransformation(init, update)


def mix_batch(
    rng,
    images,
    labels,
    num_classes: int,
    *,
    mixup: float,
    cutmix: float,
    prob: float,
    switch_prob: float,
    smoothing: float,
):
    """Mixup or cutmix of a batch with its reverse; returns (images, soft targets [B, C]).

    Per batch, with probability ``prob``, cutmix (Beta(cutmix, cutmix) area, box clipped to the image,
    lambda corrected to the real box) with probability ``switch_prob`` when both are on, else mixup
    (Beta(mixup, mixup)). Label smoothing ``smoothing`` spreads ``smoothing`` uniformly over the classes.
    """
    off = smoothing / num_classes
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off
    if mixup <= 0 and cutmix <= 0:
        return images, targets
    k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(rng, 6)
    apply = jax.random.uniform(k_apply) < prob
    if cutmix > 0 and mixup > 0:
        use_cut = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cut = jnp.asarray(cutmix > 0)
    lam_mix = jax.random.beta(k_mix, mixup, mixup) if mixup > 0 else jnp.float32(1.0)
    lam_cut = jax.random.beta(k_cut, cutmix, cutmix) if cutmix > 0 else jnp.float32(1.0)

    b, h, w = images.shape[:3]
    cut_rat = jnp.sqrt(1.0 - lam_cut)
    ch, cw = (h * cut_rat).astype(jnp.int32), (w * cut_rat).astype(jnp.int32)
    cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
    y1, y2 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x1, x2 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)  # [H, W]
    lam_box = 1.0 - ((y2 - y1) * (x2 - x1)).astype(jnp.float32) / (h * w)

    partner = images[::-1]
    mixed = jnp.where(
        use_cut, jnp.where(box[None, :, :, None], partner, images), lam_mix * images + (1 - lam_mix) * partner
    )
    lam = jnp.where(apply, jnp.where(use_cut, lam_box, lam_mix), 1.0).astype(jnp.float32)
    images = jnp.where(apply, mixed, images)
    return images, lam * targets + (1.0 - lam) * targets[::-1]


@base.register
class FinetuneTask(base.Task):
    """Supervised fine-tuning of a pre-trained (or fresh) ViT with a new classification head."""

    name = "finetune"

    @staticmethod
    def add_defaults(c):
        """MAE's fine-tuning protocol (ViT-B: 100 epochs, blr 5e-4, layer decay 0.65)."""
        c.model = base.model_section(pool="gap")
        c.loss = base.loss_section()
        c.init_from = ""  # an exported/converted model directory; "" = train config.model from scratch
        c.eval.pool = "gap"
        c.eval.knn = c.eval.linear = False  # the fine-tuned classifier's top-1 is always reported
        c.total_epochs = 100.0
        c.optim.update(dict(base_lr=5e-4, b2=0.999, min_lr=1e-6, warmup_epochs=5.0, grad_clip=0.0))
        c.finetune = ml_collections.ConfigDict(
            dict(layer_decay=0.65, mixup=0.8, cutmix=1.0, mix_prob=1.0, switch_prob=0.5)
        )

    @staticmethod
    def check_config(config, *, check_teachers=True, deviceless=False):
        base.check_loss_section(config)
        checks.check_ranges(config.finetune, FINETUNE_RANGES, prefix="finetune.")
        checks.one_of(config.model.pool, ("cls", "gap"), "model.pool")
        if not config.init_from:
            return base.check_model_section(config)
        checks.check_ranges(config.model, MODEL_RANGES, prefix="model.")
        meta = teachers.describe_for_validation(config.init_from, "init_from", deviceless)
        if meta is None:  # an hf-hub: name not fetched yet: checked once loaded
            return
        patch = meta["arch"]["patch_size"]
        checks.require(
            config.image_size % patch == 0,
            f"image_size={config.image_size} is not divisible by init_from's patch size {patch}",
        )

    def __init__(self, config, num_classes: int, *, abstract: bool = False, platform: str | None = None):
        super().__init__(config, num_classes, abstract=abstract, platform=platform)
        mcfg = config.model
        head = dict(num_classes=num_classes, pool=mcfg.pool, drop_path=mcfg.drop_path)
        if config.init_from:
            meta = teachers.describe(config.init_from, "init_from")
            # The pre-trained architecture, with this config's head, resolution and dtypes.
            mcfg = dict(
                meta["arch"],
                dtype=mcfg.get("dtype", "float32"),
                param_dtype=mcfg.get("param_dtype", "float32"),
                attn_impl=mcfg.get("attn_impl", ""),
            )
            self.mean, self.std = tuple(meta["input"]["mean"]), tuple(meta["input"]["std"])
        else:
            self.mean, self.std = tuple(mcfg.mean), tuple(mcfg.std)
        self.vit = vit_from_config(
            mcfg, "model", platform=self.platform, image_size=config.image_size, **head
        )

    def init_params(self, rng):
        return self.vit.init(rng, jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32))["params"]

    def pretrained_params(self, params):
        """``params`` (freshly initialised) with every backbone weight replaced by ``init_from``'s."""
        if not self.config.init_from:
            return params
        _, loaded, _ = teachers.load_model(self.config.init_from, "init_from")
        params = dict(jax.device_get(params))
        for name, value in loaded.items():
            if name == "head":  # the classifier is always new (other classes, other pooling)
                continue
            if name not in params:
                if name == "proj":  # CLIP's projection is not used by a classifier
                    continue
                raise CheckpointError(
                    f"init_from={self.config.init_from}: parameter {name!r} not in the model"
                )
            if name == "pos_embed":
                value = resample_posemb(jnp.asarray(value), self.vit.posemb_prefix, self.vit.grid)
            expected = jax.tree.map(np.shape, params[name])
            got = jax.tree.map(np.shape, value)
            if expected != got:
                raise CheckpointError(f"init_from: {name} has shapes {got}, the model expects {expected}")
            params[name] = jax.tree.map(lambda v, p: jnp.asarray(v, p.dtype), value, params[name])
        return params

    def make_optimizer(self, optim_cfg, batch_size: int, total_steps: int, warmup_steps: int):
        """AdamW as in ``optim.make_optimizer``, followed by the layer-wise learning-rate decay."""
        decay = float(self.config.finetune.layer_decay)
        extra = (scale_by_layer_decay(self.vit.depth, decay),) if decay != 1.0 else ()
        return make_optimizer(optim_cfg, batch_size, total_steps, warmup_steps, extra=extra)

    def loss_fn(self, params, frozen, batch, rng, stage):
        fcfg = self.config.finetune
        rng_mix, rng_drop = jax.random.split(rng)
        images, targets = mix_batch(  # on normalised fp32 images: mixing commutes with normalisation
            rng_mix,
            normalize(batch["image"], self.mean, self.std, self.image_size),
            batch["label"],
            self.num_classes,
            mixup=float(fcfg.mixup),
            cutmix=float(fcfg.cutmix),
            prob=float(fcfg.mix_prob),
            switch_prob=float(fcfg.switch_prob),
            smoothing=float(self.config.loss.label_smoothing),
        )
        out = self.vit.apply(
            {"params": params},
            images,
            train=True,
            rngs={"dropout": rng_drop},
        )
        logits = out["logits"].astype(jnp.float32)
        loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
        accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
        return loss, {"loss": loss, "accuracy": accuracy}

    def final_metrics(self, params) -> dict[str, float]:
        """Top-1 (%) of the fine-tuned classifier on the eval split (center crops)."""
        return {"finetune_top1": classify_accuracy(self.config, self.vit, self.mean, self.std, params)}

    def export_metadata(self) -> dict:
        return dict(super().export_metadata(), init_from=self.config.init_from)


def classify_accuracy(config, model, mean, std, params) -> float:
    """Top-1 (%) of a classifier ViT on ``config.data.eval_split`` (first ``eval.max_test`` images)."""
    from hybrid_distill_jax.data import eval_iterator

    params = jax.device_put(params)
    size = config.image_size

    @jax.jit
    def predict(images):
        return jnp.argmax(model.apply({"params": params}, normalize(images, mean, std, size))["logits"], -1)

    correct = total = 0
    batches = eval_iterator(
        config.data,
        config.data.eval_split,
        image_size=size,
        batch_size=config.eval.batch_size,
        max_examples=config.eval.max_test,
    )
    for batch in batches:
        pred = np.asarray(predict(batch["image"]))
        mask = batch["mask"]
        correct += int(((pred == batch["label"]) & mask).sum())
        total += int(mask.sum())
    return 100.0 * correct / max(total, 1)
