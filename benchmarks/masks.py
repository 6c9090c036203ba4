"""Controlled masks for benchmarks: blobs (object-like regions) and scattered pixels at a chosen density.

Densities are set on the *working* grid (half resolution), which is what the network computes, and the
masks are returned at full resolution so they go through the same public path as a user's mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.mask import full_resolution

MASK_KINDS = ("blobs", "scattered")


def smooth_noise(batch: int, height: int, width: int, cell: int, generator: torch.Generator,
                 mode: str = "bicubic") -> torch.Tensor:
    """Low-pass noise ``[B, 1, H, W]``: uniform noise on a grid of about ``cell``-pixel cells, interpolated.
    Thresholded or ranked, it gives object-like regions (the bench's and the tests' blob masks)."""
    coarse = torch.rand(batch, 1, max(height // cell, 2), max(width // cell, 2), generator=generator)
    return F.interpolate(coarse, size=(height, width), mode=mode, align_corners=False)


def working_grid_mask(kind: str, height: int, width: int, density: float, seed: int = 0) -> torch.Tensor:
    """Bool mask ``[1, 1, height, width]`` on the working grid itself with exactly ``round(density * h * w)``
    True pixels: ``blobs`` (a few smooth regions, like moving objects) or ``scattered`` (independent pixels)."""
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    gen = torch.Generator().manual_seed(seed)
    if kind == "scattered":
        score = torch.rand(1, 1, height, width, generator=gen)
    else:   # low-pass noise: a few smooth regions, like moving objects
        score = smooth_noise(1, height, width, 24, gen)
    # Exactly round(density * h * w) active pixels: rank the scores.
    k = round(density * height * width)
    mask = torch.zeros(height * width, dtype=torch.bool)
    mask[score.flatten().argsort(descending=True)[:k]] = True
    return mask.view(1, 1, height, width)


def working_density_mask(kind: str, height: int, width: int, density: float, seed: int = 0) -> torch.Tensor:
    """Full-resolution bool mask ``[1, 1, H, W]`` whose working-grid active fraction is ``density`` (rounded to
    whole working pixels): :func:`working_grid_mask` on the ``ceil(H/2) x ceil(W/2)`` grid, up-sampled."""
    half = working_grid_mask(kind, (height + 1) // 2, (width + 1) // 2, density, seed)
    return full_resolution(half, (height, width))
