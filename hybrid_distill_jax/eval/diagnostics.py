"""Attention diagnostics (the paper's evidence): average attention distance and NMI per layer and head.

Definitions (``docs/METHOD.md``, "Diagnostics"), computed on the post-softmax attention of every block
with the prefix (CLS, distillation token) rows and columns removed and the rows renormalised. Removing
the prefix columns and renormalising equals a softmax over the patch keys' logits only, which is how it
is computed here (in fp32).

* Average attention distance, in pixels of the model's input:
  ``AD = mean_q sum_k A[q, k] * patch * ||pos(q) - pos(k)||_2`` with ``pos`` the (row, column) of a patch.
* NMI (Park et al. 2023, "What do self-supervised ViTs learn?"), with the query prior uniform
  (``p(q) = 1/N``): ``A <- (A + 1e-8)`` renormalised per row, ``p(k) = sum_q p(q) A[q, k]``,
  ``MI = sum_{q,k} p(q) A[q, k] log(A[q, k] / p(k))``, ``H(K) = -sum_k p(k) log p(k)``,
  ``NMI = MI / sqrt(log N * H(K))``. 0 = every query attends alike (collapse), 1 = a permutation.

**Aggregation (our decision).** Both numbers are computed per image, per layer and per head, then
averaged over the images of a fixed evaluation set (a streamed sum over batches divided by the image
count). For NMI this means p(k) is the key marginal of *one image's* map, not of the whole set: the
attention map is a conditional distribution of one image, and pooling p(k) over images would count
"different images attend to different places" as query dependence, which is not what the metric asks.

``AttentionDiagnostics`` runs a model over batches; ``TrainingDiagnostics`` is the trainer's periodic
hook (``config.eval.diagnostics_every``), logging ``diag/...`` scalars.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hybrid_distill_jax.errors import write_atomically
from hybrid_distill_jax.models.build import normalize

NMI_EPS = 1e-8


# ---------------------------------------------------------------------------------------------- math


def patch_distances(grid: int, patch_size: int) -> np.ndarray:
    """Pixel distance between the centres of every pair of patches of a grid x grid image: [N, N]."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    pos = np.stack([rows.reshape(-1), cols.reshape(-1)], axis=1).astype(np.float64)
    return (patch_size * np.linalg.norm(pos[:, None] - pos[None], axis=-1)).astype(np.float32)


def patch_attention(logits: jax.Array, num_prefix: int = 1) -> jax.Array:
    """Attention logits [..., P+N, P+N] -> probabilities over patch keys for patch queries [..., N, N].

    Equal to softmax over all keys, prefix rows and columns removed, rows renormalised.
    """
    return jax.nn.softmax(logits[..., num_prefix:, num_prefix:].astype(jnp.float32), axis=-1)


def attention_distance(attn: jax.Array, distances: jax.Array) -> jax.Array:
    """Mean over queries of the attention-weighted distance: attn [..., N, N] -> [...]."""
    return jnp.mean(jnp.sum(attn * distances, axis=-1), axis=-1)


def nmi(attn: jax.Array, eps: float = NMI_EPS) -> jax.Array:
    """Normalised mutual information between query and key of attn [..., N, N] (rows sum to 1) -> [...]."""
    a = attn.astype(jnp.float32) + eps
    a = a / jnp.sum(a, axis=-1, keepdims=True)
    n = a.shape[-1]
    p_k = jnp.mean(a, axis=-2)  # uniform query prior 1/N
    mi = jnp.sum(a * jnp.log(a / p_k[..., None, :]), axis=(-2, -1)) / n
    h_k = -jnp.sum(p_k * jnp.log(p_k), axis=-1)
    return mi / jnp.sqrt(jnp.log(float(n)) * h_k)


# --------------------------------------------------------------------------------------------- runner


class AttentionDiagnostics:
    """Per-layer, per-head attention distance and NMI of a ViT, averaged over a stream of images.

    ``model`` is a ``VisionTransformer``; images are [0, 1] RGB, resized to ``image_size`` (default the
    model's) and normalised with ``mean``/``std``. Layers default to every block.
    """

    def __init__(self, model, mean, std, image_size: int | None = None, layers: Sequence[int] | None = None):
        self.model = model
        self.image_size = int(image_size or model.image_size)
        self.grid = self.image_size // model.patch_size
        self.layers = tuple(layers) if layers else tuple(range(1, model.depth + 1))
        distances = jnp.asarray(patch_distances(self.grid, model.patch_size))
        mean, std = tuple(mean), tuple(std)

        def batch_sums(params, images, mask):
            out = model.apply(
                {"params": params}, normalize(images, mean, std, self.image_size), attn_layers=self.layers
            )
            dist, info = [], []
            for layer in self.layers:
                attn = patch_attention(out["attn_logits"][layer], model.num_prefix)  # [B, H, N, N]
                dist.append(attention_distance(attn, distances))
                info.append(nmi(attn))
            weight = mask.astype(jnp.float32)[:, None, None]
            return {
                "distance": jnp.sum(jnp.stack(dist, axis=1) * weight, axis=0),  # [L, H]
                "nmi": jnp.sum(jnp.stack(info, axis=1) * weight, axis=0),
                "count": jnp.sum(mask.astype(jnp.float32)),
            }

        self._batch_sums = jax.jit(batch_sums)

    def __call__(self, params, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, Any]:
        """Streams ``batches`` ({"image", optional "mask"}) and returns the averaged diagnostics."""
        totals = None
        for batch in batches:
            images = batch["image"]
            mask = np.asarray(batch.get("mask", np.ones(images.shape[0], bool)), bool)
            sums = jax.device_get(self._batch_sums(params, images, mask))
            sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
            totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
        if totals is None or totals["count"] == 0:
            raise ValueError("attention diagnostics got no images")
        n = float(totals["count"])
        return {
            "layers": list(self.layers),
            "distance": (totals["distance"] / n).tolist(),  # [L][H], pixels
            "nmi": (totals["nmi"] / n).tolist(),  # [L][H]
            "num_images": int(n),
            "image_size": self.image_size,
            "patch_size": int(self.model.patch_size),
            "grid": self.grid,
        }


def summary_scalars(result: Mapping[str, Any]) -> dict[str, float]:
    """Per-layer head means (and the head spread of the distance) as flat scalars, e.g. for TensorBoard."""
    dist, info = np.asarray(result["distance"]), np.asarray(result["nmi"])
    out = {}
    for i, layer in enumerate(result["layers"]):
        out[f"distance/layer{layer}"] = float(dist[i].mean())
        out[f"distance_head_std/layer{layer}"] = float(dist[i].std())
        out[f"nmi/layer{layer}"] = float(info[i].mean())
    out["distance/mean"] = float(dist.mean())
    out["nmi/mean"] = float(info.mean())
    return out


# ------------------------------------------------------------------------------------ models and data


def fixed_eval_batches(data_cfg, image_size: int, num_images: int, batch_size: int, split: str | None = None):
    """The first ``num_images`` of the eval split (center crops), as a list of host batches."""
    from hybrid_distill_jax.data import eval_iterator

    split = split or data_cfg.eval_split
    batch_size = max(1, min(batch_size, num_images))
    it = eval_iterator(data_cfg, split, image_size=image_size, batch_size=batch_size, max_examples=num_images)
    return list(it)


def diagnose_model_dir(
    directory: str,
    data_cfg,
    *,
    num_images: int = 512,
    batch_size: int = 128,
    image_size: int = 0,
    split: str | None = None,
) -> dict[str, Any]:
    """Diagnostics of an exported or converted model directory on a data config's eval split."""
    from hybrid_distill_jax.models import io as model_io

    model, params, meta = model_io.load_model(directory, field="model")
    size = int(image_size or meta["input"]["image_size"])
    runner = AttentionDiagnostics(model, meta["input"]["mean"], meta["input"]["std"], size)
    result = runner(params, fixed_eval_batches(data_cfg, size, num_images, batch_size, split))
    result["model_dir"] = os.path.abspath(directory)
    return result


class TrainingDiagnostics:
    """The trainer's periodic hook: diagnostics of the model being trained on a fixed eval set."""

    def __init__(self, config, task):
        self.task = task
        self.runner = AttentionDiagnostics(task.vit, task.mean, task.std, config.image_size)
        self.batches = fixed_eval_batches(
            config.data, config.image_size, config.eval.diagnostics_examples, config.eval.batch_size
        )

    def __call__(self, params) -> dict[str, float]:
        result = self.runner(self.task.vit_params(params), self.batches)
        return {f"diag/{k}": v for k, v in summary_scalars(result).items()}


def save(results: Mapping[str, Any], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, json.dumps(results, indent=1).encode())
    return path
