"""The stem where the masked stages read it: the sparse front of the torch CPU path (pure torch).

Every masked stage reads the 3x3 neighbourhood of each pixel it computes, and a pixel no stage computes keeps its
stem features; so the stages and the tail read the stem features only at the pixels they compute and at those
pixels' 8 neighbours. For a sparse mask that is a small part of the working grid: the dense stem (a 6x6 stride-2
convolution of the whole image, 16 ms at 720p on 2 threads) and its copy into the tile buffer (``to_tile_buffer``:
a 29 MB feature map) are most of a sparse call's fixed cost when little is active.

Here the stem runs on the ``T x T`` cells of the tile buffer's grid that hold such a pixel (:func:`read_cells`):
each cell's ``(2T+4) x (2T+4)`` input window is gathered from the image (:func:`cell_windows`), the batch of windows goes
through one oneDNN convolution without padding, and the ``T x T`` outputs are written into their cells of the
buffer (:func:`stem_tile_buffer`). A cell's output is the dense stem's at those pixels (the same weights and
input window: equal within float rounding, bit for bit in every measurement on oneDNN; tests/test_cells.py). Cells no stage
reads are left unwritten: nothing reads them (the tests fill them with NaN to prove it). The zero ring and the
padding beyond the grid are zeroed (:func:`~kernels.tiles.zero_ring_`), as :func:`~kernels.tiles.to_tile_buffer` does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .tiles import TILE, TilePlan, tile_grid, zero_ring_

SHUFFLE = 2     # input pixels per working pixel (the network's pixel-unshuffle factor)
STEM_RADIUS = 2  # the stem, as a 6x6 stride-2 conv: working pixel y reads input rows 2y-2 .. 2y+3


def read_cells(plan: TilePlan, batch: int, height: int, width: int, tile: int = TILE) -> torch.Tensor:
    """``[N, 3]`` int64 ``(b, ty, tx)``, row-major: the cells of a ``height x width`` working grid whose stem
    features the stages read under ``plan``: every cell holding a computed pixel (a tile of the plan, a pixel of
    the per-pixel kernel) or a neighbour of one."""
    nty, ntx = tile_grid(height, width, tile)
    device = plan.index.device
    cells = torch.zeros((batch, nty, ntx), dtype=torch.bool, device=device)
    b, y, x = plan.pixels
    if b.numel():
        # a pixel's 3x3 neighbourhood lies in the cells of its rows y-1..y+1 and columns x-1..x+1; with T >= 2 these
        # are the cells of {y-1, y+1} x {x-1, x+1} (clamped to the grid: outside it is the zero ring)
        rows = ((y - 1).clamp(min=0) // tile, (y + 1).clamp(max=height - 1) // tile)
        cols = ((x - 1).clamp(min=0) // tile, (x + 1).clamp(max=width - 1) // tile)
        for cy in rows:
            for cx in cols:
                cells[b, cy, cx] = True
    if plan.tiles:   # a tile computes all its pixels: its 8 neighbouring cells are read too
        tiles = torch.zeros_like(cells)
        tiles[plan.index[:, 0], plan.index[:, 1], plan.index[:, 2]] = True
        cells |= F.max_pool2d(tiles[:, None].to(torch.float32), 3, stride=1, padding=1)[:, 0] > 0
    return cells.nonzero()


def stem_tile_buffer(padded: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cells: torch.Tensor,
                     grid: tuple[int, int], tile: int = TILE, dtype: torch.dtype | None = None,
                     fill: float | None = None) -> torch.Tensor:
    """The tile buffer ``[B, Hp+2, Wp+2, C]`` (:func:`~kernels.tiles.to_tile_buffer`'s layout) with the stem
    features at ``cells`` only (:func:`read_cells`).

    Args:
        padded: the even-sized image ``[B, 3, H, W]`` (``H, W = 2 * grid``).
        weight, bias: the stem as a ``[C, 3, 6, 6]`` stride-2 convolution (:meth:`M2AENet.stem_kernel`).
        dtype: the buffer's (the masked stages' precision); the stem itself runs in ``padded``'s.
        fill: the value of every cell not in ``cells`` (None: left as allocated; the tests pass NaN).
    """
    b, c = padded.shape[0], weight.shape[0]
    h, w = grid
    nty, ntx = tile_grid(h, w, tile)
    buffer = padded.new_empty((b, nty * tile + 2, ntx * tile + 2, c), dtype=dtype or padded.dtype)
    if fill is not None:
        buffer.fill_(fill)
    if cells.shape[0]:
        out = F.conv2d(cell_windows(padded, cells, tile), weight, bias, stride=SHUFFLE)     # [N, C, T, T]
        inner = buffer[:, 1:nty * tile + 1, 1:ntx * tile + 1]
        cell_view = inner.unflatten(1, (nty, tile)).unflatten(3, (ntx, tile)).permute(0, 1, 3, 2, 4, 5)
        cell_view[cells[:, 0], cells[:, 1], cells[:, 2]] = out.permute(0, 2, 3, 1).to(buffer.dtype)
    return zero_ring_(buffer, h, w)      # after the cells: their outputs past the grid must be zero too


def cell_windows(padded: torch.Tensor, cells: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """``[N, 3, 2T+4, 2T+4]``: the input window the stem reads for each cell of ``cells`` (zero outside the image).

    Cells whose window lies inside the image are read straight from it; only the cells at the image's borders
    go through zero-padded copies, of the bands they lie in (a padded copy of the whole image cost 2-3 ms at 720p).
    """
    b, _, height, width = padded.shape
    step, span = SHUFFLE * tile, SHUFFLE * tile + 2 * STEM_RADIUS
    first_row, first_col = step * cells[:, 1] - STEM_RADIUS, step * cells[:, 2] - STEM_RADIUS   # window corners
    top, bottom = first_row < 0, first_row + span > height
    left, right = first_col < 0, first_col + span > width
    edge = top | bottom | left | right
    groups = (top, bottom & ~top, left & ~top & ~bottom, right & ~(top | bottom | left), ~edge)
    patches = padded.new_empty((cells.shape[0], 3, span, span))
    if padded.device.type == "meta":      # counting FLOPs (executor's meta twin): the shape is all there is
        return patches
    for group in groups:
        pick = group.nonzero()[:, 0]
        if not pick.numel():
            continue
        rows, cols = first_row[pick], first_col[pick]
        r0, c0 = int(rows.min()), int(cols.min())
        region = _zero_padded(padded, r0, int(rows.max()) + span, c0, int(cols.max()) + span)
        sb, sc, sy, sx = region.stride()
        n_rows, n_cols = (region.shape[2] - span) // step + 1, (region.shape[3] - span) // step + 1
        windows = region.as_strided((b, n_rows, n_cols, 3, span, span), (sb, step * sy, step * sx, sc, sy, sx),
                                    region.storage_offset())
        patches[pick] = windows[cells[pick, 0], (rows - r0) // step, (cols - c0) // step]
    return patches


def _zero_padded(image: torch.Tensor, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """``image[..., r0:r1, c0:c1]`` with zeros where that lies outside the image: a view where it lies inside."""
    h, w = image.shape[-2:]
    inside = image[..., max(r0, 0):min(r1, h), max(c0, 0):min(c1, w)]
    pads = [max(-c0, 0), max(c1 - w, 0), max(-r0, 0), max(r1 - h, 0)]
    return F.pad(inside, pads) if any(pads) else inside
