"""Blur-mask predictor and the mask helpers shared by every execution path.

The network works at half resolution (pixel-unshuffle x2), so the *working mask* is ``[B, 1, H/2, W/2]``
bool: one working pixel covers a 2x2 block of the input. A full-resolution user mask becomes a working
mask by max-pooling (a block is active if any of its 4 pixels is), and the working mask goes back to full
resolution by nearest upsampling (those are exactly the input pixels the network may change).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.reference import activation


class BlurMaskHead(nn.Module):
    """Dense blur-logit predictor on stem features.

    A stride-2 3x3 conv takes ``[B, C, h, w]`` to quarter resolution, then dilated 3x3 convs
    (dilation 2, 4, ...) widen the receptive field cheaply; a 1x1 conv gives one logit and a
    bilinear upsample returns it to ``[B, 1, h, w]``.

    Every mask head has this interface: ``forward(image, features)`` -> working-grid logits,
    ``coarse_logits(image, features)`` (local, tile by tile), ``upsample``, ``spatial_layers()`` (its chain of
    spatial layers, for the receptive field), ``reads_image`` (the chain starts at the image, not the stem
    features) and ``jump`` (input pixels per coarse logit cell).
    """

    reads_image = False
    jump = 4            # input pixels per logit cell: stem at 1/2, a stride-2 conv to 1/4

    def __init__(self, in_channels: int, channels: int, layers: int, act: str):
        super().__init__()
        self.act = act
        convs = [nn.Conv2d(in_channels, channels, 3, stride=2, padding=1)]
        for i in range(1, layers):
            convs.append(nn.Conv2d(channels, channels, 3, padding=2 ** i, dilation=2 ** i))
        self.convs = nn.ModuleList(convs)
        self.logit = nn.Conv2d(channels, 1, 1)

    def forward(self, image: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.coarse_logits(image, features), features.shape[-2:])

    def coarse_logits(self, image: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
        """Stem features ``[B, C, h, w]`` -> logits ``[B, 1, ceil(h/2), ceil(w/2)]`` before the upsample
        (``image`` is not read).

        Local (a finite receptive field, see :mod:`m2ae_infer.tiling`), so it can be computed tile by tile.
        """
        h = features
        for conv in self.convs:
            h = activation(conv(h), self.act)
        return self.logit(h)

    def spatial_layers(self) -> list[nn.Module]:
        return [*self.convs, self.logit]

    @staticmethod
    def upsample(logits: torch.Tensor, size) -> torch.Tensor:
        """Quarter-resolution logits -> ``[B, 1, *size]``. Not local: with ``size`` odd the source/target ratio
        ``ceil(h/2)/h`` differs from 1/2 and depends on the whole image's size, so tiled runs apply it once
        to the whole quarter-resolution map."""
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def binarize(logits: torch.Tensor, threshold: float = 0.5, dilation: int = 0) -> torch.Tensor:
    """``m = sigmoid(logits) > threshold``, then dilated by ``dilation`` working pixels. Returns bool."""
    mask = torch.sigmoid(logits) > threshold
    return dilate(mask, dilation)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Square dilation of a bool mask ``[B, 1, h, w]`` by ``radius`` pixels."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask.float(), 2 * radius + 1, stride=1, padding=radius) > 0


def pad_to_even(x: torch.Tensor) -> torch.Tensor:
    """Pad H and W of ``[B, C, H, W]`` to even sizes by replicating the last row/column.

    Replicate (not reflect) so that 1-pixel-wide images work too; the padding is cropped off at the end.
    """
    pad_h, pad_w = x.shape[-2] % 2, x.shape[-1] % 2
    if not (pad_h or pad_w):
        return x
    if x.dtype == torch.bool:
        return pad_to_even(x.to(torch.uint8)).bool()
    return F.pad(x, [0, pad_w, 0, pad_h], mode="replicate")


def working_mask(full_mask: torch.Tensor) -> torch.Tensor:
    """Full-resolution mask ``[B, 1, H, W]`` (bool) -> working mask ``[B, 1, ceil(H/2), ceil(W/2)]``."""
    even = pad_to_even(full_mask.bool())
    b, c, h, w = even.shape
    blocks = even.reshape(b, c, h // 2, 2, w // 2, 2)   # any pixel of each 2x2 block; 7x faster than a max-pool
    return (blocks[:, :, :, 0] | blocks[:, :, :, 1]).any(dim=-1)


def full_resolution(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Working mask -> the full-resolution pixels it lets the network change, cropped to ``size``."""
    *lead, h, w = mask.shape   # one copy (an expanded view reshaped), not two repeat_interleaves
    if mask.dtype == torch.bool and not torch.compiler.is_compiling():
        # each byte doubled along x at once (b * 257 as int16 holds b in both bytes, either endianness), then the
        # rows doubled by an expanded view: 10x faster than expanding single bools (0.07 against 0.74 ms at 720p).
        # Not under torch.compile: inductor fuses the plain expand, and its C++ code for these views fails to build
        # (torch 2.13: "Vectorized<bool> has no member named cast").
        pairs = (mask.contiguous().view(torch.uint8).to(torch.int16) * 257).view(torch.uint8)   # [..., h, 2w]
        up = pairs[..., :, None, :].expand(*lead, h, 2, 2 * w).reshape(*lead, 2 * h, 2 * w).view(torch.bool)
    else:
        up = mask[..., :, None, :, None].expand(*lead, h, 2, w, 2).reshape(*lead, 2 * h, 2 * w)
    return up[..., : size[0], : size[1]]
