"""Tile-sparse execution of the masked stages: the CPU kernel for the dense parts of a mask (pure torch).

The per-pixel kernel (:mod:`m2ae_infer.kernels.reference`) gathers nine neighbours per active pixel and stage (an
im2col of ``9*C`` floats per row) and adds the update back with ``index_add_``: it moves about nine times the
data of a dense convolution and is memory-bound, so at 20-50 % active it gives back much of what its FLOPs save.
Here the working grid is cut into ``T x T`` tiles. Per stage, for a set of tiles:

1. every tile is gathered with a one-pixel halo (``[N, T+2, T+2, C]`` channels-last rows of the buffer), all
   before anything is written (in-stage updates must not leak into a neighbour's input);
2. the 3x3 conv runs over the batch of tiles as one oneDNN convolution without padding (the halo is its padding:
   real neighbours inside the image, the zero ring outside it), the per-pixel mixers as GEMMs;
3. the last mixer's GEMM accumulates onto the interior (``x + b + h @ W``: the residual costs no pass of its own),
   the tile's inactive pixels are copied back from the gathered ``x`` (bit for bit, whatever ``F`` gave there),
   and the interior is copied back (tiles are disjoint: ``index_copy_``, no ``index_add_``). The stage is
   memory-bound on this CPU, so every pass over the tiles counts: a ``torch.where`` over them cost as much as
   the 3x3 convolution (7 of 17 ms at 720p, 50 % blobs, 2 threads).

A tiled stage costs about a dense convolution over the tiles' area, whatever their fill; a per-pixel stage costs
about ``pixel / tile`` times more per active pixel (``executor.KERNEL_COSTS``). :func:`plan_tiles` therefore sends
each tile whose fill is at least ``min_fill`` to the tile kernel and the active pixels of the other tiles to the
per-pixel kernel: region masks run mostly tiled, scattered masks per pixel, and a mixed mask takes each part the
cheaper way. Both kernels work on one buffer and read it before either writes, so a stage is exactly the dense
masked stage.

Buffer: ``[B, Hp+2, Wp+2, C]``, the working grid padded up to multiples of ``T`` (``Hp``, ``Wp``) with a zero ring
(:func:`to_tile_buffer`); viewed as rows ``[P, C]`` it is the per-pixel kernel's layout for a ``Hp x Wp`` grid
(:func:`~m2ae_infer.kernels.reference.padded_rows`). The padding stays zero: no active pixel lies there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .reference import SparseStage, activation, pointwise_chain

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
    # only the ring and the padding are zeroed: filling the whole buffer first cost 2-6 ms of a 25 ms call (720p)
    buffer = features.new_empty((b, nty * tile + 2, ntx * tile + 2, c))
    buffer[:, 0].zero_()
    buffer[:, h + 1:].zero_()
    buffer[:, 1:h + 1, 0].zero_()
    buffer[:, 1:h + 1, w + 1:].zero_()
    buffer[:, 1:h + 1, 1:w + 1] = features.permute(0, 2, 3, 1)
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


def tile_stage_update(rows_view: torch.Tensor, patch_rows: torch.Tensor, inactive: torch.Tensor,
                      stage: SparseStage, spatial_weight: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """The tiles' new interiors ``[N*T*T, C]``: ``x + F(x)`` at their active pixels, ``x`` bit for bit at the
    ``inactive`` ones (:attr:`TilePlan.inactive`), read from ``rows_view`` ``[P, C]`` at ``patch_rows``
    (:func:`tile_rows`). Nothing is written; the caller copies the result to the interior rows.

    ``spatial_weight``: the stage's 3x3 conv ``[C_mid, C, 3, 3]`` (channels-last, :func:`spatial_weights`).
    """
    c = rows_view.shape[1]
    patches = rows_view.index_select(0, patch_rows).view(-1, tile + 2, tile + 2, c)   # [N, T+2, T+2, C]
    h = F.conv2d(patches.permute(0, 3, 1, 2), spatial_weight, stage.spatial_bias)    # [N, C_mid, T, T]
    h = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])                                 # [N*T*T, C_mid] rows
    weight, bias = stage.mixers[-1]
    n, area = patches.shape[0], tile * tile
    new = patches.new_empty((n * area, c))
    per = max(1, POINTWISE_ROWS // area)                 # tiles per piece: the per-pixel part in cache-sized pieces
    for first in range(0, n, per):
        rows = slice(first * area, min(n, first + per) * area)
        out = new[rows]
        # x + b of these tiles' interiors, contiguous: the last GEMM accumulates on it while it is in cache
        torch.add(patches[first:first + per, 1:-1, 1:-1], bias, out=out.view(-1, tile, tile, c))
        part = pointwise_chain(activation(h[rows], stage.act), stage.mixers[:-1], gate_last=len(stage.mixers) > 1)
        torch.addmm(out, part, weight, out=out)   # not addmm_: FlopCounterMode does not count the in-place op
    # inactive pixels: x itself, from the gathered patches (interior pixel (k, i, j) is patch row
    # k*(T+2)^2 + (i+1)*(T+2) + j+1)
    k, ij = inactive // area, inactive % area
    source = k * (tile + 2) ** 2 + (ij // tile + 1) * (tile + 2) + ij % tile + 1
    return new.index_copy_(0, inactive, patches.view(-1, c).index_select(0, source))


def spatial_weights(stages: list[SparseStage]) -> list[torch.Tensor]:
    """Each packed stage's ``[9*C, C_mid]`` GEMM matrix back as a channels-last ``[C_mid, C, 3, 3]`` conv weight
    (the inverse of :meth:`SparseStage.from_convs`' packing)."""
    weights = []
    for stage in stages:
        c_mid = stage.spatial_weight.shape[1]
        w = stage.spatial_weight.reshape(3, 3, -1, c_mid).permute(3, 2, 0, 1)
        weights.append(w.contiguous(memory_format=torch.channels_last))
    return weights
