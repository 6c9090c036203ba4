"""Tile-sparse execution of the masked stages: the CPU kernel for the dense parts of a mask (pure torch).

The per-pixel kernel (:mod:`m2ae_infer.kernels.reference`) gathers nine neighbours per active pixel and stage (an
im2col of ``9*C`` floats per row) and adds the update back with ``index_add_``: it moves about nine times the
data of a dense convolution and is memory-bound, so at 20-50 % active it gives back much of what its FLOPs save.
Here the working grid is cut into ``T x T`` tiles, and the tiles the plan runs stay gathered, each with a
one-pixel halo (``[N, T+2, T+2, C]`` channels-last patches, :func:`gather_tiles`), from the first stage to the
last (:func:`scatter_tiles`). Per stage (:func:`tile_stage_`):

1. the 3x3 conv runs over the batch of patches as one oneDNN convolution without padding (the halo is its
   padding: real neighbours inside the image, the zero ring outside it) and reads every patch before anything is
   written (in-stage updates must not leak into a neighbour's input); the per-pixel mixers run as GEMMs, in
   cache-sized pieces of whole tiles;
2. the update is added onto the interiors in place, and the tiles' inactive pixels get their first value back
   (bit for bit, whatever ``F`` gave there: they never change);
3. the halos are exchanged (:func:`exchange_halos`, :class:`TileHalo`): a halo pixel inside another tile comes
   from that tile's interior, one the per-pixel kernel updates from the buffer, and the tile pixels the per-pixel
   kernel reads go to the buffer; everything else a halo holds (inactive pixels, padding, the zero ring) never
   changes. Gathering every patch and copying every interior back each stage instead moved ``(T+2)**2 + T**2``
   rows per tile and stage, not ``4T+4`` at most: that version cost 0.434 / 0.866 of the dense call at 20 / 50 %
   blobs against 0.353 / 0.740 now (720p, 2 threads, both versions interleaved, median of 9; a first run of 7 gave
   0.495 / 0.837 against 0.413 / 0.739; docs/performance.md "Persistent tiles").

The stage is memory-bound on this CPU, so every pass over the tiles counts: a ``torch.where`` over them cost as
much as the 3x3 convolution (7 of 17 ms at 720p, 50 % blobs, 2 threads).

A tiled stage costs about a dense convolution over the tiles' area, whatever their fill; a per-pixel stage costs
about ``pixel / tile`` times more per active pixel (``executor.KERNEL_COSTS``). :func:`plan_tiles` therefore sends
each tile whose fill is at least ``min_fill`` to the tile kernel and the active pixels of the other tiles to the
per-pixel kernel: region masks run mostly tiled, scattered masks per pixel, and a mixed mask takes each part the
cheaper way. Both kernels read the features as they were before the stage and write after it, so a stage is exactly the
dense masked stage.

Buffer: ``[B, Hp+2, Wp+2, C]``, the working grid padded up to multiples of ``T`` (``Hp``, ``Wp``) with a zero ring
(:func:`to_tile_buffer`); viewed as rows ``[P, C]`` it is the per-pixel kernel's layout for a ``Hp x Wp`` grid
(:func:`~m2ae_infer.kernels.reference.padded_rows`). The padding stays zero: no active pixel lies there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .reference import (SparseStage, activation, affine, neighbour_offsets, padded_rows, pointwise_chain,
                        sparse_stage_update)

# Rows of the per-pixel maps (x + b, activation, mixers, gate) run at once after a stage's convolution, in whole
# tiles: their intermediates ([rows, 2C] floats) then stay in the cache instead of passing through memory per op.
POINTWISE_ROWS = 4096
TILE = 8   # working-grid pixels per tile side (16 input pixels); 4 and 16 were slower (docs/performance.md)


def tile_grid(height: int, width: int, tile: int = TILE) -> tuple[int, int]:
    """``(tiles down, tiles across)`` covering a ``height x width`` working grid."""
    return -(-height // tile), -(-width // tile)


def to_tile_buffer(features: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """``[B, C, h, w]`` -> zero-ringed channels-last buffer ``[B, Hp+2, Wp+2, C]`` (``Hp``, ``Wp``: multiples of
    ``tile``), a new tensor."""
    b, c, h, w = features.shape
    nty, ntx = tile_grid(h, w, tile)
    buffer = zero_ring_(features.new_empty((b, nty * tile + 2, ntx * tile + 2, c)), h, w)
    buffer[:, 1:h + 1, 1:w + 1] = features.permute(0, 2, 3, 1)
    return buffer


def zero_ring_(buffer: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero, in place, a ``[B, Hp+2, Wp+2, C]`` buffer's ring and its padding beyond the ``height x width`` grid
    (the zero padding of the stages' 3x3 convs); returns it. Only those are zeroed: filling the whole buffer first
    cost 2-6 ms of a 25 ms call (720p)."""
    buffer[:, 0].zero_()
    buffer[:, height + 1:].zero_()
    buffer[:, 1:height + 1, 0].zero_()
    buffer[:, 1:height + 1, width + 1:].zero_()
    return buffer


@dataclass(frozen=True)
class TilePlan:
    """How one call's active pixels are split between the two kernels (:func:`plan_tiles`).

    Attributes:
        index: ``[N, 3]`` int64 ``(b, ty, tx)`` of the tiles the tile kernel runs.
        tile_mask: ``[N, T, T, 1]`` bool, each such tile's own mask.
        pixels: ``(b, y, x)`` of the active pixels outside those tiles (the per-pixel kernel's share).
        tile_pixels: active pixels inside the tiles.
        inactive: ``[M]`` int64, the inactive pixels of the tiles as rows of the ``[N*T*T, C]`` interiors.
    """

    index: torch.Tensor
    tile_mask: torch.Tensor
    pixels: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    tile_pixels: int
    inactive: torch.Tensor

    @property
    def tiles(self) -> int:
        return self.index.shape[0]


def plan_tiles(mask: torch.Tensor, min_fill: float, tile: int = TILE) -> TilePlan:
    """Split the working mask ``[B, 1, h, w]`` bool: tiles inside the grid with at least ``min_fill`` of their
    ``T*T`` pixels active go to the tile kernel (``min_fill=0``: every such tile with an active pixel; above 1:
    none). Tiles that cross the grid's bottom or right edge always run per pixel: computing their part outside
    the grid would be work a dense pass does not do, so a sparse call never executes more than a dense one."""
    b, _, h, w = mask.shape
    nty, ntx = tile_grid(h, w, tile)
    padded = mask.new_zeros((b, nty * tile, ntx * tile))
    padded[:, :h, :w] = mask[:, 0]
    blocks = padded.view(b, nty, tile, ntx, tile).transpose(2, 3)      # [B, nty, ntx, T, T]
    fill = blocks.flatten(3).sum(dim=3)                                # [B, nty, ntx]
    tiled = (fill > 0) & (fill >= min_fill * tile * tile)
    tiled[:, h // tile:] = False                                       # crossing the bottom edge
    tiled[:, :, w // tile:] = False                                    # crossing the right edge
    index = tiled.nonzero()                                            # [N, 3], row-major
    rest = padded & ~tiled.repeat_interleave(tile, 1).repeat_interleave(tile, 2)
    tile_mask = blocks[index[:, 0], index[:, 1], index[:, 2]][..., None]
    return TilePlan(index, tile_mask, rest.nonzero(as_tuple=True), int(fill[tiled].sum()),
                    (~tile_mask).reshape(-1).nonzero()[:, 0])


def tile_rows(index: torch.Tensor, buffer_shape: tuple[int, ...], tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the ``[P, C]`` view of a ``[B, Hp+2, Wp+2, C]`` buffer for the tiles ``index``: each tile's haloed
    ``(T+2) x (T+2)`` patch (what a stage reads) and its ``T x T`` interior (what it writes), row-major."""
    _, height, width, _ = buffer_shape
    corner = (index[:, 0] * height + index[:, 1] * tile) * width + index[:, 2] * tile    # the patch's top left
    span = torch.arange(tile + 2, device=index.device)
    patch = (span[:, None] * width + span[None, :]).reshape(-1)
    inner = ((span[1:-1, None] * width + span[None, 1:-1])).reshape(-1)
    return (corner[:, None] + patch).reshape(-1), (corner[:, None] + inner).reshape(-1)


@dataclass(frozen=True)
class TileHalo:
    """Where the tiles' patches get their halos from while they stay gathered across the stages
    (:func:`tile_halo`). Positions are rows of the flat patches ``[N*(T+2)**2, C]``; buffer rows are rows of the
    ``[P, C]`` buffer view.

    Attributes:
        patch_rows: buffer rows of every patch pixel (the one gather before the first stage).
        inner_rows: buffer rows of the interiors (the one write back after the last stage).
        interior: positions of the interiors, tile-major (``[N*T*T]``, the order of ``inner_rows``).
        ring_to, ring_from: halo positions that lie in another tile's interior, and that interior position.
        pixel_ring_to, pixel_ring_from: halo positions at pixels the per-pixel kernel updates, and their buffer rows.
        export_from, export_to: interior positions the per-pixel kernel reads as neighbours, and their buffer rows.
        inactive: positions of the tiles' inactive pixels (they keep their first value through every stage).
    """

    patch_rows: torch.Tensor
    inner_rows: torch.Tensor
    interior: torch.Tensor
    ring_to: torch.Tensor
    ring_from: torch.Tensor
    pixel_ring_to: torch.Tensor
    pixel_ring_from: torch.Tensor
    export_from: torch.Tensor
    export_to: torch.Tensor
    inactive: torch.Tensor


def tile_halo(plan: TilePlan, buffer_shape: tuple[int, ...], pixel_rows: torch.Tensor, offsets: torch.Tensor,
              tile: int = TILE) -> TileHalo:
    """The halo exchange of ``plan``'s tiles in a ``[B, Hp+2, Wp+2, C]`` buffer whose other active pixels
    (``pixel_rows``, buffer rows) the per-pixel kernel updates with 3x3 ``offsets``
    (:func:`~m2ae_infer.kernels.reference.neighbour_offsets`). Every other pixel a halo reads (inactive, padding,
    the zero ring) never changes, so the first gather sets it once."""
    patch_rows, inner_rows = tile_rows(plan.index, buffer_shape, tile)
    device, side = patch_rows.device, tile + 2
    span = torch.arange(side, device=device)
    inside = ((span >= 1) & (span <= tile))
    inside = (inside[:, None] & inside[None, :]).reshape(-1)
    start = (torch.arange(plan.tiles, device=device) * side * side)[:, None]
    interior = (start + inside.nonzero()[:, 0]).reshape(-1)
    ring = (start + (~inside).nonzero()[:, 0]).reshape(-1)
    ring_rows = patch_rows[ring]
    total = buffer_shape[0] * buffer_shape[1] * buffer_shape[2]
    owner = torch.full((total,), -1, dtype=torch.long, device=device)
    owner[inner_rows] = interior
    source = owner[ring_rows]
    from_tile = source >= 0
    is_pixel = torch.zeros(total, dtype=torch.bool, device=device)
    is_pixel[pixel_rows] = True
    from_pixel = is_pixel[ring_rows]
    read = torch.zeros(total, dtype=torch.bool, device=device)
    read[(pixel_rows[:, None] + offsets).reshape(-1)] = True
    exported = read[inner_rows]
    return TileHalo(patch_rows, inner_rows, interior, ring[from_tile], source[from_tile], ring[from_pixel],
                    ring_rows[from_pixel], interior[exported], inner_rows[exported], interior[plan.inactive])


def gather_tiles(rows_view: torch.Tensor, halo: TileHalo, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiles' haloed patches ``[N, T+2, T+2, C]`` (a new tensor) and their inactive pixels' values."""
    patches = rows_view.index_select(0, halo.patch_rows).view(-1, tile + 2, tile + 2, rows_view.shape[1])
    return patches, patches.view(-1, rows_view.shape[1]).index_select(0, halo.inactive)


def tile_stage_(patches: torch.Tensor, inactive: torch.Tensor, fixed: torch.Tensor, stage: SparseStage,
                spatial_weight: torch.Tensor) -> None:
    """In place: each tile's interior ``x <- x + F(x)`` at its active pixels; the ``inactive`` positions (flat
    patches) get ``fixed`` back, bit for bit. Halos are read, never written (:func:`exchange_halos`).

    ``spatial_weight``: the stage's 3x3 conv ``[C_mid, C, 3, 3]`` (channels-last, :func:`spatial_weights`).
    """
    n, side, _, c = patches.shape
    tile = side - 2
    # the convolution reads every patch before the first interior is written
    h = F.conv2d(patches.permute(0, 3, 1, 2), spatial_weight, stage.spatial_bias)    # [N, C_mid, T, T]
    h = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])                                 # [N*T*T, C_mid] rows
    weight, bias = stage.mixers[-1]
    area = tile * tile
    per = max(1, POINTWISE_ROWS // area)                 # tiles per piece: the per-pixel part in cache-sized pieces
    for first in range(0, n, per):
        part = pointwise_chain(activation(h[first * area:(first + per) * area], stage.act), stage.mixers[:-1],
                               gate_last=len(stage.mixers) > 1)
        update = affine(part, weight, bias)
        patches[first:first + per, 1:-1, 1:-1] += update.view(-1, tile, tile, c)
    patches.view(-1, c).index_copy_(0, inactive, fixed)


def exchange_halos(patches: torch.Tensor, rows_view: torch.Tensor, halo: TileHalo) -> None:
    """After a stage (both kernels written): the per-pixel kernel's neighbours inside tiles go to the buffer, and
    every halo pixel that changed (another tile's interior, a per-pixel kernel's pixel) comes back to the patches."""
    flat = patches.view(-1, patches.shape[-1])
    if halo.export_to.numel():
        rows_view.index_copy_(0, halo.export_to, flat.index_select(0, halo.export_from))
    if halo.ring_to.numel():
        flat.index_copy_(0, halo.ring_to, flat.index_select(0, halo.ring_from))
    if halo.pixel_ring_to.numel():
        flat.index_copy_(0, halo.pixel_ring_to, rows_view.index_select(0, halo.pixel_ring_from))


def scatter_tiles(patches: torch.Tensor, rows_view: torch.Tensor, halo: TileHalo) -> None:
    """The tiles' interiors back into the buffer (after the last stage)."""
    flat = patches.view(-1, patches.shape[-1])
    rows_view.index_copy_(0, halo.inner_rows, flat.index_select(0, halo.interior))


def masked_stages_(rows_view: torch.Tensor, buffer_shape: tuple[int, ...], plan: TilePlan,
                   stages: list[SparseStage], tile_weights: list[torch.Tensor], halo: TileHalo | None = None) -> None:
    """In place: every masked stage at the plan's active pixels of the ``[P, C]`` buffer view (of a
    ``[B, Hp+2, Wp+2, C]`` :func:`to_tile_buffer`): its tiles by the tile kernel, kept gathered and their halos
    exchanged between stages, its other pixels by the per-pixel kernel; both updates of a stage are computed from
    the features as they were before it. ``tile_weights``: :func:`spatial_weights` of ``stages``; ``halo``:
    :func:`tile_halo` of the plan, built here when None."""
    grid_w = buffer_shape[2] - 2
    pixel_rows = padded_rows(*plan.pixels, buffer_shape[1] - 2, grid_w)
    offsets = neighbour_offsets(grid_w, device=rows_view.device)
    if plan.tiles:
        halo = tile_halo(plan, buffer_shape, pixel_rows, offsets) if halo is None else halo
        patches, fixed = gather_tiles(rows_view, halo)
    for stage, weight in zip(stages, tile_weights):
        update = sparse_stage_update(rows_view, pixel_rows, offsets, stage) if pixel_rows.numel() else None
        if plan.tiles:
            tile_stage_(patches, halo.inactive, fixed, stage, weight)
        if update is not None:
            rows_view.index_add_(0, pixel_rows, update)
        if plan.tiles:
            exchange_halos(patches, rows_view, halo)
    if plan.tiles:
        scatter_tiles(patches, rows_view, halo)


def spatial_weights(stages: list[SparseStage]) -> list[torch.Tensor]:
    """Each packed stage's ``[9*C, C_mid]`` GEMM matrix back as a channels-last ``[C_mid, C, 3, 3]`` conv weight
    (the inverse of :meth:`SparseStage.from_convs`' packing)."""
    weights = []
    for stage in stages:
        c_mid = stage.spatial_weight.shape[1]
        w = stage.spatial_weight.reshape(3, 3, -1, c_mid).permute(3, 2, 0, 1)
        weights.append(w.contiguous(memory_format=torch.channels_last))
    return weights
