"""Tail at the active pixels: per-pixel linear ``C -> 3*s*s`` -> pixel-shuffle write -> add to the input.

The output starts as a copy of the (even-padded) input image; each program takes ``BLOCK_M`` active rows,
computes their ``3*s*s`` tail values with one GEMM and writes ``image + delta`` straight to the ``s x s`` output
pixels each working pixel owns (``torch.nn.PixelShuffle`` order). Every output pixel has one writer and pixels
outside the mask are never written, so they stay bit-identical to the input.
Torch reference: :func:`m2ae_infer.kernels.reference.sparse_tail_`.
"""
from __future__ import annotations

import torch

from .triton_common import (block_size, check_storage, default_block_m, dot_in_fp32, kernels_interpreted, tl,
                            triton)
from .triton_stage import _dot


@triton.jit
def _sparse_tail_kernel(buf_ptr, rows_ptr, w_ptr, b_ptr, image_ptr, out_ptr,
                        n_rows, channels, height, width,
                        SCALE: tl.constexpr, OUT_CHANNELS: tl.constexpr, DOT_FP32: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[shuffle(rows)] = image[shuffle(rows)] + buf[rows] @ W + b`` for one block of active rows.

    Args:
        buf_ptr: ``[B*(height+2)*(width+2), channels]`` zero-bordered channels-last buffer (row stride
            ``channels``), storage dtype.
        rows_ptr: ``[n_rows]`` int64 active rows; row ``(b*(height+2) + y+1)*(width+2) + x+1`` is working
            pixel ``(b, y, x)``.
        w_ptr: ``[channels, OUT_CHANNELS*SCALE**2]`` storage dtype, contiguous; b_ptr ``[OUT_CHANNELS*SCALE**2]``
            fp32.
        image_ptr, out_ptr: ``[B, OUT_CHANNELS, SCALE*height, SCALE*width]`` contiguous (NCHW strides
            ``(OUT_CHANNELS*H*W, H*W, W, 1)``), same dtype; ``out`` already holds a copy of ``image``.
        height, width: working grid ``h, w``.
    Grid: ``(cdiv(n_rows, BLOCK_M),)``.
    """
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_rows
    rows = tl.load(rows_ptr + offs_m, mask=m_mask, other=0)
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < channels
    x = tl.load(buf_ptr + rows[:, None] * channels + offs_c[None, :], mask=m_mask[:, None] & c_mask[None, :],
                other=0.0)
    n_out = OUT_CHANNELS * SCALE * SCALE
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < n_out
    w = tl.load(w_ptr + offs_c[:, None] * n_out + offs_k[None, :], mask=c_mask[:, None] & k_mask[None, :],
                other=0.0)
    delta = _dot(x, w, DOT_FP32) + tl.load(b_ptr + offs_k, mask=k_mask, other=0.0)[None, :]

    # Working pixel (b, py, px) from its buffer row; value k = (c*SCALE + i)*SCALE + j lands at
    # (b, c, SCALE*py + i, SCALE*px + j).
    pitch = width + 2
    plane = (height + 2) * pitch
    b = rows // plane
    py = (rows % plane) // pitch - 1
    px = rows % pitch - 1
    c = offs_k // (SCALE * SCALE)
    i = (offs_k // SCALE) % SCALE
    j = offs_k % SCALE
    out_h = SCALE * height
    out_w = SCALE * width
    target = (((b * OUT_CHANNELS)[:, None] + c[None, :]) * out_h + (SCALE * py)[:, None] + i[None, :]) * out_w \
        + (SCALE * px)[:, None] + j[None, :]
    store_mask = m_mask[:, None] & k_mask[None, :]
    image = tl.load(image_ptr + target, mask=store_mask, other=0.0)
    tl.store(out_ptr + target, (image.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=store_mask)


def pack_tail(weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype = torch.float32,
              device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [C, K] in dtype, b [K] fp32)`` from a 1x1 conv weight ``[K, C, 1, 1]`` (or a ``[C, K]`` matrix)."""
    device = weight.device if device is None else device
    matrix = weight.detach().flatten(1).t() if weight.dim() == 4 else weight.detach()
    return (matrix.to(device=device, dtype=dtype).contiguous(),
            bias.detach().to(device=device, dtype=torch.float32).contiguous())


def sparse_tail_forward(out: torch.Tensor, image: torch.Tensor, buffer: torch.Tensor, rows: torch.Tensor,
                        weight: torch.Tensor, bias: torch.Tensor, scale: int = 2,
                        block_m: int | None = None) -> None:
    """In place on ``out``: ``out[targets] = image[targets] + (buffer[rows] @ weight + bias)``.

    Args:
        out, image: ``[B, 3, s*h, s*w]`` contiguous, same dtype; ``out`` starts as a copy of ``image``.
        buffer: ``[B*(h+2)*(w+2), C]`` features (storage dtype of ``weight``).
        rows: ``[N]`` int64 active rows.
        weight, bias: from :func:`pack_tail`, ``[C, 3*s*s]`` and ``[3*s*s]``.
    """
    check_storage(out, image, buffer, rows, weight, bias)
    batch, out_channels, out_h, out_w = image.shape
    if out.shape != image.shape or out.dtype != image.dtype:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must match image {tuple(image.shape)} {image.dtype}")
    if out_h % scale or out_w % scale or weight.shape != (buffer.shape[1], out_channels * scale * scale):
        raise ValueError(f"tail weight {tuple(weight.shape)} / image {tuple(image.shape)} do not fit a "
                         f"x{scale} pixel shuffle of {buffer.shape[1]} channels")
    height, width = out_h // scale, out_w // scale
    if buffer.shape[0] != batch * (height + 2) * (width + 2) or buffer.dtype != weight.dtype:
        raise ValueError(f"buffer {tuple(buffer.shape)} {buffer.dtype} does not match the image / weight")
    n = rows.numel()
    if n == 0:
        return
    interpreted = kernels_interpreted(_sparse_tail_kernel)
    block_m = block_m or default_block_m(interpreted)
    _sparse_tail_kernel[(triton.cdiv(n, block_m),)](
        buffer, rows, weight, bias, image, out, n, buffer.shape[1], height, width,
        SCALE=scale, OUT_CHANNELS=out_channels, DOT_FP32=dot_in_fp32(weight.dtype, interpreted),
        BLOCK_M=block_m, BLOCK_C=block_size(buffer.shape[1]), BLOCK_K=block_size(out_channels * scale * scale))
