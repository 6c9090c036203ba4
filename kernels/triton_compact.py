"""Active-pixel compaction on the device: working mask -> sorted buffer rows, two passes, no atomics.

Pass 1 (``_count_kernel``): each program counts the True pixels of its block of the flattened mask.
Between the passes, ``torch.cumsum`` over the per-block counts gives each block's first output slot (on the
device, no sync). Pass 2 (``_compact_kernel``): each program ranks its True pixels with an in-block cumsum
(``tl.associative_scan``) and writes
their buffer rows at ``start + rank``. Blocks are ordered, and pixels inside a block keep their order, so the rows
come out sorted (row-major pixel order) and deterministic, exactly like ``mask.nonzero()``.

The host reads one number per call: the total count, to size the row vector and the stage grids (the executor
needs it anyway to choose sparse or dense). Torch reference: :func:`torch_active_rows`.
"""
from __future__ import annotations

import torch

from .reference import active_pixels, padded_rows
from .triton_common import tl, triton

COMPACT_BLOCK = 1024


# tl.reduce / tl.associative_scan with our own combine function, not tl.sum / tl.cumsum: see triton_common.
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _count_kernel(mask_ptr, counts_ptr, n_pixels, BLOCK: tl.constexpr):
    """Per-block count of True pixels.

    Args:
        mask_ptr: ``[n_pixels]`` uint8 (the bool working mask ``[B, 1, h, w]`` flattened), contiguous.
        counts_ptr: ``[cdiv(n_pixels, BLOCK)]`` int32 output, one count per program.
    Grid: ``(cdiv(n_pixels, BLOCK),)``, one program per block of ``BLOCK`` consecutive pixels.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    flags = tl.load(mask_ptr + offs, mask=offs < n_pixels, other=0) != 0
    tl.store(counts_ptr + pid, tl.reduce(flags.to(tl.int32), 0, _add))


@triton.jit
def _compact_kernel(mask_ptr, starts_ptr, rows_ptr, n_pixels, height, width, BLOCK: tl.constexpr):
    """Write the buffer row of every True pixel at its rank among all True pixels.

    Args:
        mask_ptr: ``[n_pixels]`` uint8, as in ``_count_kernel``; pixel ``i = (b*height + y)*width + x``.
        starts_ptr: ``[cdiv(n_pixels, BLOCK)]`` int64: exclusive prefix sum of the block counts.
        rows_ptr: ``[N]`` int64 output, ``N`` = total True pixels; row ``(b*(height+2) + y+1)*(width+2) + x+1``
            of the zero-bordered buffer (:func:`m2ae_infer.kernels.reference.padded_rows`).
        height, width: working-grid size (``h, w``).
    Grid: ``(cdiv(n_pixels, BLOCK),)``.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    flags = (tl.load(mask_ptr + offs, mask=offs < n_pixels, other=0) != 0).to(tl.int32)
    slot = tl.load(starts_ptr + pid) + tl.associative_scan(flags, 0, _add).to(tl.int64) - 1   # inclusive rank
    plane = height * width
    b = offs // plane
    y = (offs % plane) // width
    x = offs % width
    row = (b * (height + 2) + y + 1) * (width + 2) + x + 1
    tl.store(rows_ptr + slot, row, mask=flags != 0)


def compact_active_rows(mask: torch.Tensor, block: int = COMPACT_BLOCK) -> tuple[torch.Tensor, int]:
    """Sorted buffer rows of the True pixels of a working mask, computed on the mask's device.

    Args:
        mask: ``[B, 1, h, w]`` or ``[B, h, w]`` bool (other dtypes: nonzero = active).
        block: pixels per program (a power of two).
    Returns:
        ``(rows, n)``: ``rows`` ``[n]`` int64 equal to ``torch_active_rows(mask)``; ``n`` read once from the device.
    """
    height, width = mask.shape[-2:]
    if mask.dtype != torch.bool:
        mask = mask != 0
    flat = mask.reshape(-1).contiguous().view(torch.uint8)
    n_pixels = flat.numel()
    n_blocks = triton.cdiv(n_pixels, block)
    if n_blocks == 0:
        return torch.empty(0, dtype=torch.int64, device=mask.device), 0
    counts = torch.empty(n_blocks, dtype=torch.int32, device=mask.device)
    _count_kernel[(n_blocks,)](flat, counts, n_pixels, BLOCK=block)
    ends = torch.cumsum(counts, 0, dtype=torch.int64)
    n = int(ends[-1])                                  # the one host read per call
    rows = torch.empty(n, dtype=torch.int64, device=mask.device)
    if n:
        _compact_kernel[(n_blocks,)](flat, ends - counts, rows, n_pixels, height, width, BLOCK=block)
    return rows, n


def torch_active_rows(mask: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`compact_active_rows`: ``padded_rows(*active_pixels(mask))``."""
    height, width = mask.shape[-2:]
    return padded_rows(*active_pixels(mask.reshape(-1, height, width)), height, width)
