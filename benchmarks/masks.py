"""Controlled masks for benchmarks: blobs (object-like regions) and scattered pixels at a chosen density.

Densities are set on the *working* grid (half resolution), which is what the network computes, and the
masks are returned at full resolution so they go through the same public path as a user's mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_KINDS = ("blobs", "scattered")


def working_density_mask(kind: str, height: int, width: int, density: float, seed: int = 0) -> torch.Tensor:
    """Full-resolution bool mask ``[1, 1, H, W]`` whose working-grid active fraction is ~``density``."""
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {kind!r}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must lie in [0, 1], got {density}")
    h, w = (height + 1) // 2, (width + 1) // 2
    gen = torch.Generator().manual_seed(seed)
    if kind == "scattered":
        score = torch.rand(1, 1, h, w, generator=gen)
    else:   # low-pass noise: a few smooth regions, like moving objects
        coarse = torch.rand(1, 1, max(h // 24, 2), max(w // 24, 2), generator=gen)
        score = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    # Exactly round(density * h * w) active pixels: rank the scores.
    k = round(density * h * w)
    half = torch.zeros(h * w, dtype=torch.bool)
    half[score.flatten().argsort(descending=True)[:k]] = True
    full = half.view(1, 1, h, w).repeat_interleave(2, -2).repeat_interleave(2, -1)
    return full[..., :height, :width]
