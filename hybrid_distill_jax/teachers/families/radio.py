"""NVIDIA C-RADIO v3/v4 backbones in timm's ``VisionTransformer`` layout (``vit_*_patch16_radio_v3/v4``):
a CLS token, register tokens (RADIO's other summary tokens among them), a position table for the patches
alone, LayerScale on some sizes, no final norm, OpenAI CLIP's mean/std.

RADIO stores its position table for a 128x128 patch grid. timm's loader resamples it to the model's grid
when the weights are loaded: bilinear, no antialiasing, with ``align_corners`` as each checkpoint's own
code used (timm's ``_RADIO_ALIGN_CORNERS``: True for C-RADIOv3-B and -H, False for v3-L, v3-g and v4).
Both choices are a family here, so a timm ``config.json`` picks one by its architecture name
(``timm_config.RADIO_FAMILIES``) and ``--family`` picks one for a bare file: ``radio`` (False) or
``radio_align_corners`` (True). The import resamples the table exactly so, to ``--image-size``, else to
the timm config's input size, else to 512 (every C-RADIO config's); our bicubic resampling would give
another table.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from hybrid_distill_jax.teachers.families.base import CLIP_INPUT, TIMM_LAYOUT, Family, register

RADIO_LAYOUT = dataclasses.replace(TIMM_LAYOUT, dist_token=None, map_head=None)
IMAGE_SIZE = 512  # timm's pretrained_cfg input size for every C-RADIO backbone


def linear_weights(old: int, new: int, align_corners: bool) -> np.ndarray:
    """[new, old] weights of 1-D linear resampling as torch's ``F.interpolate`` (``bilinear``, no antialias,
    an output size rather than a scale factor) computes them on the CPU, per axis.

    A target index ``i`` maps to ``i * (old - 1) / (new - 1)`` with ``align_corners``, else to
    ``(i + 0.5) * old / new - 0.5`` clamped at 0, and blends the two source entries around it (the last
    one alone past the end). torch computes that coordinate in float32, the second form with one rounding
    (a fused multiply-add); doing it in float64 instead moves a table resampled from a 128 grid by about
    2e-5 (values of order 1), the size of the tolerance the parity tests hold."""
    f32 = np.float32
    index = np.arange(new, dtype=np.float32)
    if old == new:
        source = index
    elif align_corners:
        scale = f32(old - 1) / f32(new - 1) if new > 1 else f32(0)
        source = scale * index
    else:
        scale = f32(old) / f32(new)
        source = (np.float64(scale) * (index.astype(np.float64) + 0.5) - 0.5).astype(np.float32)
        source = np.maximum(source, f32(0))
    low = np.minimum(np.floor(source).astype(np.int64), old - 1)
    high = np.minimum(low + 1, old - 1)
    frac = np.clip(source - low.astype(np.float32), f32(0), f32(1))
    weights = np.zeros((new, old), np.float64)
    np.add.at(weights, (np.arange(new), low), (f32(1) - frac).astype(np.float64))
    np.add.at(weights, (np.arange(new), high), frac.astype(np.float64))
    return weights


def resample_bilinear(grid: np.ndarray, new_grid: int, *, align_corners: bool) -> tuple[np.ndarray, str]:
    """A [g, g, D] position grid resampled to [new_grid, new_grid, D] as timm's RADIO loader does
    (bilinear is separable: rows, then columns)."""
    old = grid.shape[0]
    rows = linear_weights(old, new_grid, align_corners)
    cols = linear_weights(grid.shape[1], new_grid, align_corners)
    out = np.einsum("ai,bj,ijd->abd", rows, cols, np.asarray(grid, np.float64), optimize=True)
    how = f"bilinear, align_corners={align_corners}, no antialias: timm's C-RADIO loader"
    return out.astype(np.float32), how


def _radio(name: str, align_corners: bool, which: str) -> Family:
    return Family(
        name,
        RADIO_LAYOUT,
        act="gelu",
        norm_eps=1e-6,
        **CLIP_INPUT,
        image_size=IMAGE_SIZE,
        reads_timm_config=True,
        posemb_resampler=functools.partial(resample_bilinear, align_corners=align_corners),
        help=f"timm vit_*_patch16_radio_v3/v4 state dict, position grid resampled with align_corners "
        f"{align_corners} ({which})",
    )


register(_radio("radio", False, "C-RADIOv3-L/g, C-RADIOv4"))
register(_radio("radio_align_corners", True, "C-RADIOv3-B/H"))
