"""Fused masked stage at the active pixels: 3x3 gather -> GEMM -> bias/act -> mixer GEMM(s) -> residual.

One program takes ``BLOCK_M`` active rows and, without writing anything in between to global memory:

1. gathers each row's 3x3 neighbourhood from the zero-bordered channels-last buffer, one tap (``[BLOCK_M, C]``)
   at a time, and accumulates ``tap @ W1[tap]`` (the implicit GEMM over ``9*C``; no im2col tensor);
2. adds the bias and applies the activation (relu | gelu (erf, as torch) | silu);
3. runs the pointwise chain of :func:`m2ae_infer.kernels.reference.pointwise_chain`: one mixer, or
   ``mix_in`` packed as its two halves ``(Wa, Wb)`` so the simple gate ``a * b`` needs no register slicing,
   then ``mix_out``;
4. adds the residual (the centre tap, already loaded) and stores ``x + F(x)`` at the same rows.

Why a double buffer: every update of a stage must be computed from the buffer as it was before the stage, and
programs run in any order on a GPU. So a stage reads ``src`` and writes ``dst[rows] = src[rows] + F(src)[rows]``
(fused, no ``[N, C]`` scratch, no atomics: one writer per row). The active set is the same for every stage, so
rows outside it hold the same values in both buffers (both start as copies of the features and are never written
there), and the next stage just swaps the roles. The cost is a second buffer, allocated once per image.

Storage fp32 / fp16 / bf16, fp32 accumulation; see :func:`.triton_common.dot_in_fp32` for the dot precision.
Torch reference: :func:`m2ae_infer.kernels.reference.sparse_stage_`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import SparseStage
from .triton_common import (STORAGE_DTYPES, block_size, check_storage, default_block_m, dot_in_fp32,
                            kernels_interpreted, tl, triton)

ACT_CODES = {"relu": 0, "gelu": 1, "silu": 2}


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    """``a @ b`` accumulated in fp32 (operands upcast and IEEE when ``DOT_FP32``)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _activation(x, ACT: tl.constexpr):
    if ACT == 0:
        return tl.maximum(x, 0.0)
    elif ACT == 1:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    else:
        return x / (1.0 + tl.exp(-x))     # silu (not tl.sigmoid: see triton_common)


@triton.jit
def _linear(h, w_ptr, b_ptr, k_dim, n_dim, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
            DOT_FP32: tl.constexpr):
    """``h [BLOCK_M, BLOCK_K] @ W[k_dim, n_dim] + b`` for a contiguous ``W``; padded lanes are zero."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    w = tl.load(w_ptr + offs_k[:, None] * n_dim + offs_n[None, :],
                mask=(offs_k[:, None] < k_dim) & (offs_n[None, :] < n_dim), other=0.0)
    bias = tl.load(b_ptr + offs_n, mask=offs_n < n_dim, other=0.0)
    return _dot(h.to(w.dtype), w, DOT_FP32) + bias[None, :]


@triton.jit
def _sparse_stage_kernel(
        src_ptr, dst_ptr, rows_ptr,
        w1_ptr, b1_ptr, wa_ptr, ba_ptr, wb_ptr, bb_ptr, wo_ptr, bo_ptr,
        n_rows, row_pitch, channels, mid, ffn,
        ACT: tl.constexpr, GATED: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_MID: tl.constexpr, BLOCK_FFN: tl.constexpr):
    """``dst[rows] = src[rows] + F(src)[rows]`` for one block of ``BLOCK_M`` active rows.

    Args:
        src_ptr, dst_ptr: ``[P, channels]`` zero-bordered channels-last buffers (row stride ``channels``,
            channel stride 1), storage dtype; rows outside ``rows`` must be equal in both.
        rows_ptr: ``[n_rows]`` int64 active rows (sorted; never a border row).
        w1_ptr: ``[9*channels, mid]`` storage dtype, row ``(ky*3 + kx)*channels + c``; b1_ptr ``[mid]`` fp32.
        wa_ptr, wb_ptr: ``[mid, ffn]`` the two halves of ``mix_in``; ba_ptr, bb_ptr ``[ffn]`` fp32 (``GATED``).
        wo_ptr: ``[ffn, channels]`` (``GATED``) or ``[mid, channels]``; bo_ptr ``[channels]`` fp32.
        n_rows: N; row_pitch: ``w + 2``, the buffer rows between vertical neighbours.
        channels, mid, ffn: C, C_mid, E.
    Grid: ``(cdiv(n_rows, BLOCK_M),)``: each program owns ``BLOCK_M`` consecutive entries of ``rows``.
    """
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n_rows
    rows = tl.load(rows_ptr + offs_m, mask=m_mask, other=0)
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < channels
    offs_mid = tl.arange(0, BLOCK_MID)
    mid_mask = offs_mid < mid
    load_mask = m_mask[:, None] & c_mask[None, :]

    # 1. implicit GEMM over the 9 taps; the border makes every neighbour of an active row a valid row.
    acc = tl.full((BLOCK_M, BLOCK_MID), 0.0, tl.float32)
    center = tl.full((BLOCK_M, BLOCK_C), 0.0, src_ptr.dtype.element_ty)
    for tap in tl.static_range(9):
        shift = (tap // 3 - 1) * row_pitch + (tap % 3 - 1)
        x = tl.load(src_ptr + (rows + shift)[:, None] * channels + offs_c[None, :], mask=load_mask, other=0.0)
        if tap == 4:
            center = x
        w = tl.load(w1_ptr + (tap * channels + offs_c)[:, None] * mid + offs_mid[None, :],
                    mask=c_mask[:, None] & mid_mask[None, :], other=0.0)
        acc += _dot(x, w, DOT_FP32)

    # 2. bias + activation (padded lanes stay act(0) = 0 and meet zero weight rows next).
    h = _activation(acc + tl.load(b1_ptr + offs_mid, mask=mid_mask, other=0.0)[None, :], ACT)

    # 3. pointwise chain.
    if GATED:
        a = _linear(h, wa_ptr, ba_ptr, mid, ffn, BLOCK_MID, BLOCK_FFN, DOT_FP32)
        b = _linear(h, wb_ptr, bb_ptr, mid, ffn, BLOCK_MID, BLOCK_FFN, DOT_FP32)
        update = _linear(a * b, wo_ptr, bo_ptr, ffn, channels, BLOCK_FFN, BLOCK_C, DOT_FP32)
    else:
        update = _linear(h, wo_ptr, bo_ptr, mid, channels, BLOCK_MID, BLOCK_C, DOT_FP32)

    # 4. residual, rounded once to the storage dtype.
    out = center.to(tl.float32) + update
    tl.store(dst_ptr + rows[:, None] * channels + offs_c[None, :], out.to(dst_ptr.dtype.element_ty), mask=load_mask)


@dataclass(frozen=True)
class PackedStage:
    """A :class:`SparseStage` laid out for :func:`sparse_stage_forward` (weights in the storage dtype,
    biases fp32, all contiguous). ``gated``: ``mix_in`` split as ``(wa, ba), (wb, bb)`` then ``wo``."""

    w1: torch.Tensor                     # [9C, C_mid]
    b1: torch.Tensor                     # [C_mid]
    wa: torch.Tensor | None              # [C_mid, E]
    ba: torch.Tensor | None
    wb: torch.Tensor | None
    bb: torch.Tensor | None
    wo: torch.Tensor                     # [E or C_mid, C]
    bo: torch.Tensor                     # [C]
    act: str

    @property
    def gated(self) -> bool:
        return self.wa is not None

    @property
    def channels(self) -> int:
        return self.wo.shape[1]

    @property
    def mid(self) -> int:
        return self.w1.shape[1]

    @property
    def ffn(self) -> int:
        return self.wa.shape[1] if self.gated else 0

    @property
    def dtype(self) -> torch.dtype:
        return self.w1.dtype


def pack_stage(stage: SparseStage, dtype: torch.dtype = torch.float32, device=None) -> PackedStage:
    """Pack once (at executor construction): split ``mix_in`` for the gate, cast weights to ``dtype``.

    Supports the two chains the network has: one mixer (motion analyzer) or gate-separated two mixers
    (body blocks). Anything else raises ``NotImplementedError``.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {dtype}")
    if stage.act not in ACT_CODES:
        raise ValueError(f"unknown activation {stage.act!r}; the kernel knows {sorted(ACT_CODES)}")
    device = stage.spatial_weight.device if device is None else device
    weight = lambda t: t.detach().to(device=device, dtype=dtype).contiguous()             # noqa: E731
    bias = lambda t: t.detach().to(device=device, dtype=torch.float32).contiguous()       # noqa: E731
    channels = stage.spatial_weight.shape[0] // 9
    if len(stage.mixers) == 1:
        (wo, bo), = stage.mixers
        gate = (None,) * 4
    elif len(stage.mixers) == 2:
        (wi, bi), (wo, bo) = stage.mixers
        if wi.shape[1] % 2:
            raise ValueError(f"the simple gate needs an even mixer width, got {wi.shape[1]}")
        ffn = wi.shape[1] // 2
        gate = (weight(wi[:, :ffn]), bias(bi[:ffn]), weight(wi[:, ffn:]), bias(bi[ffn:]))
    else:
        raise NotImplementedError(f"the Triton stage kernel runs 1 or 2 mixers, this stage has {len(stage.mixers)}")
    if wo.shape[1] != channels:
        raise ValueError(f"the last mixer must output C={channels} channels, got {wo.shape[1]}")
    return PackedStage(weight(stage.spatial_weight), bias(stage.spatial_bias), *gate, weight(wo), bias(bo), stage.act)


def sparse_stage_forward(src: torch.Tensor, dst: torch.Tensor, rows: torch.Tensor, width: int,
                         stage: PackedStage, block_m: int | None = None) -> None:
    """``dst[rows] = src[rows] + F(src)[rows]`` (in place on ``dst``; ``src`` is only read).

    Args:
        src, dst: ``[B*(h+2)*(w+2), C]`` buffers of the stage's dtype, equal outside ``rows``.
        rows: ``[N]`` int64 active rows (e.g. from :func:`.triton_compact.compact_active_rows`).
        width: ``w``, the working width (the buffer's padded width is ``w + 2``).
        block_m: active rows per program (default :func:`.triton_common.default_block_m`).
    """
    check_storage(src, dst, rows)
    if src.dtype != stage.dtype or dst.dtype != stage.dtype or src.shape != dst.shape:
        raise ValueError(f"buffers {src.dtype}{tuple(src.shape)} / {dst.dtype}{tuple(dst.shape)} do not match "
                         f"the stage's {stage.dtype} weights")
    if src.shape[1] != stage.channels:
        raise ValueError(f"buffer has {src.shape[1]} channels, the stage expects {stage.channels}")
    n = rows.numel()
    if n == 0:
        return
    interpreted = kernels_interpreted(_sparse_stage_kernel)
    block_m = block_m or default_block_m(interpreted)
    # Without a gate the kernel never reads wa/ba/wb/bb; any valid pointer fills the slots.
    gate = (stage.wa, stage.ba, stage.wb, stage.bb) if stage.gated else (stage.wo, stage.bo) * 2
    grid = (triton.cdiv(n, block_m),)
    _sparse_stage_kernel[grid](
        src, dst, rows, stage.w1, stage.b1, *gate, stage.wo, stage.bo,
        n, width + 2, stage.channels, stage.mid, stage.ffn,
        ACT=ACT_CODES[stage.act], GATED=stage.gated, DOT_FP32=dot_in_fp32(stage.dtype, interpreted),
        BLOCK_M=block_m, BLOCK_C=block_size(stage.channels), BLOCK_MID=block_size(stage.mid),
        BLOCK_FFN=block_size(max(stage.ffn, 1)))


def sparse_stages_forward(buffer: torch.Tensor, rows: torch.Tensor, width: int, stages: list[PackedStage],
                          block_m: int | None = None) -> torch.Tensor:
    """Run ``stages`` in order at ``rows``; returns the buffer holding the result (``buffer`` or its twin).

    ``buffer`` is the zero-bordered ``[B*(h+2)*(w+2), C]`` feature buffer; it is used as one of the two
    ping-pong buffers, so its active rows are overwritten by intermediate results.
    """
    if rows.numel() == 0 or not stages:
        return buffer
    src, dst = buffer, buffer.clone()
    for stage in stages:
        sparse_stage_forward(src, dst, rows, width, stage, block_m)
        src, dst = dst, src
    return src
