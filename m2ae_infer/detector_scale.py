"""The blur mask of a large photo, predicted at the scale the detector was trained on.

The detector learned what blur looks like on photos whose long side is at most 1024 pixels (the corpus is
written at ``m2ae-data fetch --max-side 1024``). A photo at its native 2-5k pixels is softer per pixel (optics,
demosaicing, compression), and at that size the detector takes sharp texture for blur. Measured with the shipped
checkpoint (v2.2) on the sharp photos above 1024 pixels, at their native size (``m2ae-data fetch --max-side
20000``), share of working pixels flagged:

============================  ===================  ==============================  ==================
photos                        native resolution    averaged down, k = ceil(L/1024)   k = round(L/1024)
============================  ===================  ==============================  ==================
dev split, 6 (1077-2560 px)   19.3 % (max 56.8 %)  3.3 % (max 9.2 %)               4.1 % (max 13.8 %)
train split, 20 (1600-3264)   4.1 % (max 28.7 %)   3.0 % (max 8.0 %)               3.1 % (max 13.2 %)
============================  ===================  ==============================  ==================

So for an image whose long side ``L`` exceeds :data:`DETECTOR_SIDE`, :class:`~m2ae_infer.Deblurrer` predicts the
mask from the image averaged over ``k x k`` blocks, ``k = ceil(L / DETECTOR_SIDE)`` (the detector then sees at
most ``DETECTOR_SIDE`` pixels, as in training): the detector's coarse logits of that small image are upsampled
bilinearly onto the image's working grid (each coarse cell over the ``jump * k`` input pixels it covers), then
thresholded and dilated as usual (:func:`scaled_mask`). The body then runs at full resolution with that mask, in
every backend (it reaches them as a given mask). Images up to ``DETECTOR_SIDE`` are unchanged (``k = 1``).
A motion blur shorter than about ``k`` pixels is then below what the detector resolves; at the size such a photo is
viewed it is also below what the eye does.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .model.mask import binarize, pad_to_even
from .model.network import SHUFFLE, M2AENet
from .shipped import DETECTOR_SIDE    # the longest side the detector sees (the training corpus's)

BAND_BLOCKS = 64        # k x k blocks per band of rows averaged at once (bounded memory for huge images)


def detector_factor(height: int, width: int, side: int | None = DETECTOR_SIDE) -> int:
    """``k``: the smallest integer factor that brings the long side to at most ``side`` (1: none needed)."""
    if not side:
        return 1
    return max(1, -(-max(height, width) // side))


def block_means(region: Callable[[int, int], torch.Tensor], height: int, k: int) -> torch.Tensor:
    """The image averaged over ``k x k`` blocks: ``[B, C, ceil(H/k), ceil(W/k)]``; a block cut by the image's
    bottom or right edge is the mean of its pixels inside the image.

    ``region(top, bottom)``: the image's rows ``top:bottom`` as float ``[B, C, rows, W]``. Read in bands of
    :data:`BAND_BLOCKS` blocks, so a tiled run never holds the full-resolution image in float.
    """
    step = BAND_BLOCKS * k
    # ceil_mode with no padding: the windows past the edge average over the pixels they hold
    bands = [F.avg_pool2d(region(top, min(top + step, height)), k, ceil_mode=True) for top in range(0, height, step)]
    return torch.cat(bands, dim=2)


def scaled_logits(network: M2AENet, small: torch.Tensor, k: int, working: tuple[int, int]) -> torch.Tensor:
    """Mask logits ``[B, 1, *working]`` on the full image's working grid from ``small``, the image averaged over
    ``k x k`` blocks (:func:`block_means`). Coarse cell ``i`` covers input pixels ``jump*k*i ..`` of the full image,
    so the coarse map is upsampled to ``cells * jump * k / 2`` working pixels and cut to the grid."""
    padded = pad_to_even(small).contiguous(memory_format=torch.channels_last)
    head = network.mask_head
    coarse = head.coarse_logits(padded, network.mask_features(padded))
    per_cell = head.jump * k // SHUFFLE
    logits = head.upsample(coarse, (coarse.shape[-2] * per_cell, coarse.shape[-1] * per_cell))
    return logits[..., :working[0], :working[1]]


@torch.inference_mode()
def scaled_mask(network: M2AENet, region: Callable[[int, int], torch.Tensor], shape: tuple[int, int, int, int],
                k: int, threshold: float, dilation: int, device: torch.device) -> tuple[torch.Tensor, tuple[int, int]]:
    """The working mask ``[B, 1, ceil(H/2), ceil(W/2)]`` bool of an image of ``shape`` ``(B, C, H, W)``, predicted
    at ``1/k`` of its size, and the size ``(h, w)`` the detector saw (for its FLOP count).

    ``region(top, bottom)``: rows of the float image (on any device; moved to ``device``)."""
    _, _, height, width = shape
    small = block_means(lambda top, bottom: region(top, bottom).to(device), height, k)
    working = (-(-height // SHUFFLE), -(-width // SHUFFLE))
    mask = binarize(scaled_logits(network, small, k, working), threshold, dilation)
    return mask, tuple(small.shape[-2:])
