"""Tiled execution: large images run in overlapping tiles, in bounded memory, with the untiled result.

Why a tiled run equals the untiled one (within float rounding):

* Every convolution of M2AENet is local, so an output pixel depends only on input pixels within its
  **receptive field**; :func:`receptive_field` computes it from the network's own layers. A tile is run on
  its *core* grown by ``overlap`` input pixels of real image on every side (clipped at the image border,
  where the tile then sees exactly the untiled border handling: zero padding, and ``pad_to_even``'s
  replicated last row/column); only the core is kept.
* Grids must line up: the body works on 2x2 input blocks and the mask head on ``jump x jump`` blocks (v1: 4,
  a stride-2 conv on the half-resolution features; v2: 8, the multi-scale detector's 1/8 trunk). Tile cores
  and overlaps are multiples of :attr:`ReceptiveField.align` (the head's jump, at least :data:`ALIGN` = 4),
  so a tile's blocks are the untiled run's blocks.
* The mask head ends with a bilinear upsample whose source/target ratio ``ceil(h/2)/h`` depends on the whole
  image's size when ``h`` is odd: it is *not* local. So a predicted mask is made in two passes: (1) per tile,
  the stem and the mask head's convolutions give the coarse logits of the tile's core, pasted
  into one map for the whole image (``ceil(H/jump) x ceil(W/jump)`` floats), which is then upsampled, thresholded
  and dilated once, exactly as untiled; (2) per tile, the executor runs the body on the tile grown by the
  body's own margin only (:attr:`Tiling.body_overlap`, 16 pixels against the v2 detector's 264), with that
  whole-image mask cropped to it (a user mask is cropped the same way).

The mask pass always runs the torch deploy network (stem and mask head, cheap); the body pass goes through the
executor's public ``run(image, mask)``, so every backend (torch, Triton, ONNX Runtime, TensorRT) tiles the same way.
:class:`~m2ae_infer.Deblurrer` runs the per-tile mask pass only with ``detector_side=0``: by default a tiled image
(2.5 MP, so more than 1024 pixels long) gets its mask at the detector's scale first
(:mod:`m2ae_infer.detector_scale`) and reaches :func:`run_tiled` as a given mask.

Memory: the float image is never built whole; tiles are read from the input in its own dtype
(:meth:`PreparedImage.region`) and written into one output buffer of that dtype (:meth:`PreparedImage.paste`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import InvalidArgument
from .flops import MaskPassFlops
from .model.mask import binarize, full_resolution, pad_to_even
from .model.network import SHUFFLE, M2AENet

__all__ = ["ALIGN", "AUTO_TILE_PIXELS", "DEFAULT_TILE", "ReceptiveField", "Tile", "Tiling", "plan_tiles",
           "receptive_field", "run_tiled"]

ALIGN = 4                  # input pixels per mask-head (quarter-resolution) pixel: tile grids align to it
DEFAULT_TILE = 1024        # core size of automatic tiles, input pixels
AUTO_TILE_PIXELS = 2_500_000  # tile="auto" tiles images (batch x H x W) above this many pixels


# ------------------------------------------------------------------------------------ receptive field
def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@dataclass
class _Reach:
    """Input pixels a chain of layers sees around one cell of its output grid.

    A cell of the current grid covers ``jump`` input pixels; the inputs a cell depends on extend ``before``
    pixels before the cell's first pixel and ``after`` pixels after its last.
    """

    jump: int = 1
    before: int = 0
    after: int = 0

    def unshuffle(self, factor: int) -> None:
        self.jump *= factor

    def conv(self, conv: nn.Module) -> None:
        # Output cell q reads input cells s*q - p ... s*q - p + (k-1)*d and covers input cells s*q ... s*q + s-1.
        # An average pool is a conv with dilation 1 (its right edge is replicate-padded, never read past).
        if isinstance(conv, nn.AvgPool2d):
            k, s = _pair(conv.kernel_size), _pair(conv.stride or conv.kernel_size)
            params = (k, s, (1, 1), _pair(conv.padding))
        else:
            params = (conv.kernel_size, conv.stride, conv.dilation, conv.padding)
        if isinstance(params[3], str) or any(v[0] != v[1] for v in params):
            raise ValueError(f"receptive_field: only square convs with int padding are handled, got {conv}")
        k, s, d, p = (v[0] for v in params)
        self.before += p * self.jump
        self.after += ((k - 1) * d - p - (s - 1)) * self.jump
        self.jump *= s

    @property
    def reach(self) -> int:
        """Largest distance from an output pixel to an input pixel it depends on."""
        return self.jump - 1 + max(self.before, self.after, 0)

    @property
    def margin(self) -> int:
        """Input pixels of context needed on each side of a core made of whole cells."""
        return max(self.before, self.after, 0)


@dataclass(frozen=True)
class ReceptiveField:
    """How far M2AENet looks, in input pixels (see :func:`receptive_field`).

    Attributes:
        body: context a tile needs on each side for its restored pixels (stem, every masked stage, tail).
        mask: context a tile needs on each side for its quarter-resolution mask logits (stem, mask head).
        body_reach / mask_reach: the largest distance from an output pixel (a quarter-resolution logit)
            to an input pixel it depends on; what a perturbation probe measures.
    """

    body: int
    mask: int
    body_reach: int
    mask_reach: int
    align: int = ALIGN      # input pixels per coarse mask-logit cell: tile grids align to it (4 v1, 8 v2)

    @property
    def min_overlap(self) -> int:
        """The smallest ``tile_overlap`` that gives the untiled result: both margins, rounded up to ``align``."""
        return _round_up(max(self.body, self.mask), self.align)


def receptive_field(net: M2AENet) -> ReceptiveField:
    """Receptive field of ``net`` (either form), walked layer by layer from its modules.

    Body: pixel-unshuffle x2, the stem conv, then each masked stage's convolutions, then the tail. Within a
    stage every conv is counted in sequence: exact for M2AENet (one 3x3 per stage, the rest 1x1, parallel
    RepVGG branches included) and on the safe side for anything else. Mask: unshuffle, stem, the mask head's
    convs (a stride-2 conv, then dilated ones) and its 1x1 logit, up to the quarter-resolution logits.
    Default config: body margin 16, mask margin 28 -> ``min_overlap`` 28 input pixels.
    """
    body = _Reach()
    body.unshuffle(SHUFFLE)
    body.conv(net.stem)
    for stage in net.stages():
        for module in stage.modules():
            if isinstance(module, nn.Conv2d):
                body.conv(module)
    body.conv(net.tail)
    head = net.mask_head
    mask = _Reach()
    if not head.reads_image:            # v1: the head reads the stem features
        mask.unshuffle(SHUFFLE)
        mask.conv(net.stem)
    for layer in head.spatial_layers():
        mask.conv(layer)
    if mask.jump != head.jump or head.jump % ALIGN:
        raise ValueError(f"mask head works on {mask.jump}x{mask.jump} input blocks; it declares {head.jump} "
                         f"and tiling needs a multiple of {ALIGN}")
    return ReceptiveField(body.margin, mask.margin, body.reach, mask.reach, head.jump)


# ------------------------------------------------------------------------------------------ planning
@dataclass(frozen=True)
class Tile:
    """One tile in input pixels: the core ``[top, bottom) x [left, right)`` it restores, the crop
    ``(top, bottom, left, right)`` its mask pass runs on (the core grown by the overlap, clipped to the image)
    and the smaller ``body_crop`` its body pass runs on (grown by the body's own reach only: the mask is already
    made for the whole image by then, so the detector's far wider context is not needed twice)."""

    top: int
    bottom: int
    left: int
    right: int
    crop: tuple[int, int, int, int]
    body_crop: tuple[int, int, int, int]


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _spans(length: int, tile: int, align: int) -> list[tuple[int, int]]:
    """``[0, length)`` cut into near-equal spans of at most ``tile`` (rounded up to align) starting on align."""
    count = math.ceil(length / tile)
    size = _round_up(math.ceil(length / count), align)
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def plan_tiles(height: int, width: int, tile: int, overlap: int, align: int = ALIGN,
               body_overlap: int | None = None) -> list[Tile]:
    """Tiles covering an ``height x width`` image, cores of at most ``tile`` pixels (a multiple of ``align``,
    the network's :attr:`ReceptiveField.align`); ``body_overlap`` (default ``overlap``) grows the body crops."""
    body_overlap = overlap if body_overlap is None else body_overlap
    if tile % align or overlap % align or body_overlap % align:
        raise ValueError(f"tile ({tile}), overlap ({overlap}) and body overlap ({body_overlap}) must be "
                         f"multiples of {align}")

    def grown(top, bottom, left, right, by):
        return max(top - by, 0), min(bottom + by, height), max(left - by, 0), min(right + by, width)
    return [Tile(top, bottom, left, right, grown(top, bottom, left, right, overlap),
                 grown(top, bottom, left, right, body_overlap))
            for top, bottom in _spans(height, tile, align) for left, right in _spans(width, tile, align)]


@dataclass(frozen=True)
class Tiling:
    """When and how a :class:`~m2ae_infer.Deblurrer` tiles (built by :meth:`resolve`).

    Attributes:
        tile: core size in input pixels (a multiple of ALIGN), or None: never tile.
        overlap: context on each side of a tile, input pixels (a multiple of ALIGN, >= the minimum); the mask
            pass reads it all.
        above: tile only images of more than this many pixels (batch x H x W); 0: always.
        body_overlap: context of the body pass: the body's receptive field, rounded up to ``align`` (at most
            ``overlap``; the v2 detector needs 264 pixels, the body 16). None: ``overlap``.
    """

    tile: int | None
    overlap: int
    above: int
    align: int = ALIGN
    body_overlap: int | None = None

    @classmethod
    def resolve(cls, tile: Any, overlap: Any, field: ReceptiveField) -> "Tiling":
        """Check the user's ``tile`` / ``tile_overlap``; errors are one line naming the fix."""
        minimum = field.min_overlap
        if overlap is None:
            overlap = minimum
        elif isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
            raise InvalidArgument("tile_overlap", f"tile_overlap must be None or an int >= {minimum}, got {overlap!r}")
        elif overlap < minimum:
            raise InvalidArgument("tile_overlap", f"tile_overlap={overlap} is smaller than this network's receptive field: tiles "
                             f"need at least {minimum} pixels of overlap to match the untiled result; "
                             "leave tile_overlap unset for the minimum")
        align = field.align
        overlap = _round_up(overlap, align)
        body = min(overlap, _round_up(field.body, align))
        if tile == "auto":
            return cls(DEFAULT_TILE, overlap, AUTO_TILE_PIXELS, align, body)
        if tile is None or tile == 0:
            return cls(None, overlap, 0, align, body)
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0:
            raise InvalidArgument("tile", f"tile must be 'auto', None/0 (never tile) or a positive int (tile size "
                                  f"in pixels), got {tile!r}")
        return cls(_round_up(tile, align), overlap, 0, align, body)

    def tiles(self, batch: int, height: int, width: int) -> list[Tile] | None:
        """The tiles for an image of this size, or None to run it whole."""
        if self.tile is None or batch * height * width <= self.above:
            return None
        if height <= self.tile and width <= self.tile:
            return None  # one tile is the whole image
        return plan_tiles(height, width, self.tile, self.overlap, self.align, self.body_overlap)


# ------------------------------------------------------------------------------------------- running
@dataclass
class TiledRun:
    """What :func:`run_tiled` did: the output buffer and the numbers :class:`RunInfo` reports."""

    output: torch.Tensor        # [B, C, H, W] in the input's dtype (PreparedImage.new_output), filled
    mask: torch.Tensor          # working mask of the whole image [B, 1, ceil(H/2), ceil(W/2)] bool
    active_pixels: int
    executions: set[str] = field(default_factory=set)
    flops_dense: int = 0
    flops_executed: int = 0
    seconds: float = 0.0
    tiles: int = 0

    @property
    def execution(self) -> str:
        """``"sparse"``, ``"dense"``, ``"mixed"`` (tiles differed) or ``"none"`` (no tile had blur)."""
        if len(self.executions) > 1:
            return "mixed"
        return next(iter(self.executions), "none")


def _working_mask(full: torch.Tensor) -> torch.Tensor:
    """Full-resolution bool ``[B, 1, H, W]`` -> working mask (any of each 2x2 block), without a float copy."""
    full = pad_to_even(full)
    b, _, h, w = full.shape
    return full.reshape(b, 1, h // 2, 2, w // 2, 2).any(dim=5).any(dim=3)


def _cells(x: int, jump: int) -> int:
    return -(-x // jump)


def _half(x: int) -> int:
    return -(-x // SHUFFLE)


@torch.inference_mode()
def run_tiled(prepared, tiles: list[Tile], executor, network: M2AENet, device: torch.device,
              user_mask: torch.Tensor | None, *, threshold: float, dilation: int, execution: str,
              count_flops: bool = True, flop_counter: MaskPassFlops | None = None) -> TiledRun:
    """Run ``executor`` over ``tiles`` of ``prepared`` (a :class:`~m2ae_infer.imgio.PreparedImage`).

    Args:
        executor: anything with TorchExecutor's ``run`` / ``count_flops`` (the body pass).
        network: the deploy network on ``device`` (the mask pass: stem and mask head).
        user_mask: full-resolution ``[B, 1, H, W]`` bool on ``device``, or None to predict the mask.
        count_flops: also count FLOPs (``flop_counter`` caches the mask-pass counts between calls).
    """
    start = time.perf_counter()
    batch, _, height, width = prepared.shape
    mask_flops = 0
    if user_mask is None:
        flop_counter = flop_counter or (MaskPassFlops(network) if count_flops else None)
        jump = network.mask_head.jump
        logits = torch.empty((batch, 1, _cells(height, jump), _cells(width, jump)), device=device)
        for t in tiles:
            top, bottom, left, right = t.crop
            crop = prepared.region(top, bottom, left, right).to(device)
            padded = pad_to_even(crop).contiguous(memory_format=torch.channels_last)   # as TorchExecutor.run
            coarse = network.mask_head.coarse_logits(padded, network.mask_features(padded))
            qt, ql = top // jump, left // jump
            rows, cols = slice(t.top // jump, _cells(t.bottom, jump)), slice(t.left // jump, _cells(t.right, jump))
            logits[..., rows, cols] = coarse[..., rows.start - qt:rows.stop - qt, cols.start - ql:cols.stop - ql]
            if flop_counter is not None:
                mask_flops += flop_counter(batch, bottom - top, right - left)
            del crop, padded, coarse
        mask = binarize(network.mask_head.upsample(logits, (_half(height), _half(width))), threshold, dilation)
        del logits
    else:
        mask = _working_mask(user_mask)
    run = TiledRun(prepared.new_output(), mask, int(mask.sum()), tiles=len(tiles))
    run.flops_dense = run.flops_executed = mask_flops
    for t in tiles:
        core = mask[..., t.top // SHUFFLE:_half(t.bottom), t.left // SHUFFLE:_half(t.right)]
        if not bool(core.any()):
            continue  # nothing to restore here: the output already holds the input, bit for bit
        top, bottom, left, right = t.body_crop
        crop = prepared.region(top, bottom, left, right).to(device)
        crop_mask = full_resolution(mask[..., top // SHUFFLE:_half(bottom), left // SHUFFLE:_half(right)],
                                    (bottom - top, right - left))
        result = executor.run(crop, crop_mask, threshold=threshold, dilation=dilation, execution=execution)
        h, w = t.bottom - t.top, t.right - t.left
        y, x = t.top - top, t.left - left
        prepared.paste(run.output, result.output[..., y:y + h, x:x + w],
                       full_resolution(core, (h, w)), t.top, t.left)
        run.executions.add(result.execution)
        if count_flops:
            crop_h, crop_w = bottom - top, right - left
            run.flops_dense += executor.count_flops(batch, crop_h, crop_w, 0, "dense", False)
            run.flops_executed += executor.count_flops(batch, crop_h, crop_w, result.active_pixels,
                                                       result.execution, False, result.sparse_tiles,
                                                       result.tile_pixels, result.stem_cells)
        del crop, crop_mask, result
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    run.seconds = time.perf_counter() - start
    return run
