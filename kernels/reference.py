"""Pure-torch specification of the sparse-pixel operators (also the CPU execution path).

Layout shared by every backend (torch, Triton, ONNX):

* The feature map lives in a dense, zero-bordered, channels-last buffer ``[B*(H+2)*(W+2), C]``
  (row ``r`` = pixel ``(b, y, x)`` with ``r = (b*(H+2) + y+1)*(W+2) + x+1``). The one-pixel zero
  border is the 3x3 conv's zero padding, so gathers need no bounds checks.
* Active pixels are a sorted int64 vector of buffer rows (spatial order, for locality).
* A 3x3 conv at the active pixels is an implicit GEMM over ``9*C_in``: row ``r`` gathers rows
  ``r + dy*(W+2) + dx`` for ``dy, dx in (-1, 0, 1)`` (``(ky, kx, c_in)`` order), times the conv weight
  reshaped to ``[9*C_in, C_out]`` (the paper's "3x3 -> 1x1 over 9C" reparameterization).

This module never imports the model: it only knows packed weights (:class:`SparseStage`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}

# Rows gathered per GEMM call: the im2col scratch is CHUNK_ROWS * 9C floats (4.7 MB at C=32). With addmm, 1024 rows
# (1.2 MB, in L2) were best (720p, 30 % scattered, 1 thread, an earlier CPU of the project: 328 ms per call against
# 461 ms at 16384).
# With oneDNN's matmul (affine), 4096 (AMD EPYC with AVX-512, 720p, interleaved, median of 9, 2 threads): 24.8-24.9
# against 26.1-26.9 ms at 1024 on 5 % scattered, 47.0-47.8 against 49.5-49.8 on 20 % blobs, 15.4-15.7 against
# 16.7-16.9 on 5 % blobs; 8192 and 16384 no better; at 1 thread 0.97-1.00 of 1024 (docs/performance.md).
CHUNK_ROWS = 4096


# The sparse kernels' GEMMs (im2col, mixers, tail) run on CPU through oneDNN's matmul
# (``torch.ops.mkldnn._linear_pointwise``, what inductor emits for a CPU linear) rather than ``addmm`` (MKL): on the
# kernels' shapes ([1024-4096 rows] x [16-288] x [12-64]) it was 35-40 % faster per GEMM at 2 threads, and whole
# sparse 720p calls took 0.90-0.95 of their addmm time at 5-50 % (AMD EPYC with AVX-512, 2026-12-08,
# docs/performance.md "oneDNN's matmul"). Same results as addmm to within fp32 rounding. False: addmm everywhere.
ONEDNN_LINEAR = True
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)     # oneDNN has no float64 matmul: addmm runs that
_ONEDNN_LINEAR_OP = torch.ops.mkldnn._linear_pointwise.default if torch.backends.mkldnn.is_available() else None


def affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x @ weight + bias`` (``x`` ``[N, K]``, ``weight`` ``[K, M]``, ``bias`` ``[M]``): oneDNN's matmul on CPU
    in fp32 and bf16, else ``addmm``. ``weight`` is best the transposed view of a contiguous ``[M, K]``
    (:meth:`SparseStage.from_convs` packs it so): oneDNN reads that without a copy.

    Under a ``TorchDispatchMode`` (``FlopCounterMode`` and the like) it is ``addmm`` too: such modes know ``addmm``
    (``FlopCounterMode`` has no formula for oneDNN's op and would count none of its FLOPs), and the result is the
    same to within rounding. ``torch.profiler`` is no such mode: it sees the oneDNN op.
    """
    if (ONEDNN_LINEAR and _ONEDNN_LINEAR_OP is not None and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES
            and not torch._C._len_torch_dispatch_stack()):
        return _ONEDNN_LINEAR_OP(x, weight.t(), bias, "none", [], "")
    return torch.addmm(bias, x, weight)


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """Apply the activation called ``name`` (relu | gelu | silu)."""
    try:
        return _ACTIVATIONS[name](x)
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}") from None


@dataclass(frozen=True)
class SparseStage:
    """One masked residual stage ``x <- x + m * F(x)`` packed for GEMMs.

    ``F(x) = chain(act(im2col3x3(x) @ spatial_weight + spatial_bias))`` where ``chain`` applies
    ``mixers[0]``, then for every further mixer a simple gate (``a * b`` of the two channel halves)
    followed by that mixer.

    Attributes:
        spatial_weight: ``[9*C_in, C_mid]``, rows in ``(ky, kx, c_in)`` order.
        spatial_bias: ``[C_mid]``.
        act: activation name.
        mixers: ``((W [C_a, C_b], b [C_b]), ...)`` per-pixel linear maps; the last one outputs C_in.
    """

    spatial_weight: torch.Tensor
    spatial_bias: torch.Tensor
    act: str
    mixers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @classmethod
    def from_convs(cls, spatial: nn.Conv2d, act: str, mixers: list[nn.Conv2d]) -> "SparseStage":
        """Pack a 3x3 conv and a list of 1x1 convs (all with bias) into GEMM matrices."""
        # Each matrix is the transposed view of a contiguous [out, in] one: what oneDNN's matmul (affine) reads
        # without a copy; addmm takes either layout.
        w = spatial.weight.detach()
        c_out = w.shape[0]
        spatial_weight = w.permute(0, 2, 3, 1).reshape(c_out, -1).contiguous().t()
        packed = tuple((m.weight.detach().flatten(1).contiguous().t(), m.bias.detach().clone()) for m in mixers)
        return cls(spatial_weight, spatial.bias.detach().clone(), act, packed)

    def to(self, *args, **kwargs) -> "SparseStage":
        move = lambda t: t.to(*args, **kwargs)  # noqa: E731
        return SparseStage(move(self.spatial_weight), move(self.spatial_bias), self.act,
                           tuple((move(w), move(b)) for w, b in self.mixers))


def active_pixels(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coordinates ``(b, y, x)`` (int64, each ``[N]``) of the True pixels of ``mask`` ``[B, H, W]``,
    in row-major (spatial) order."""
    return mask.nonzero(as_tuple=True)


def padded_rows(b: torch.Tensor, y: torch.Tensor, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Buffer rows of pixels ``(b, y, x)`` in the zero-bordered ``[B*(H+2)*(W+2), C]`` buffer."""
    return (b * (height + 2) + y + 1) * (width + 2) + x + 1


def neighbour_offsets(width: int, device=None) -> torch.Tensor:
    """Row offsets of the 3x3 neighbourhood in a buffer of padded width ``width + 2``, ``(ky, kx)`` order."""
    d = torch.arange(-1, 2, device=device)
    return (d[:, None] * (width + 2) + d[None, :]).reshape(9)


def pointwise_chain(h: torch.Tensor, mixers, gate_last: bool = False) -> torch.Tensor:
    """``[N, C_mid] -> [N, C]``: first mixer, then (simple gate, mixer) for each further one; ``gate_last``: a
    simple gate after the last one too (what the next mixer would take, for a caller that runs that one itself)."""
    for i, (w, b) in enumerate(mixers):
        if i:
            first, second = h.chunk(2, dim=1)
            h = first * second
        h = affine(h, w, b)
    if gate_last:
        first, second = h.chunk(2, dim=1)
        h = first * second
    return h


def sparse_stage_update(buffer: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor,
                        stage: SparseStage) -> torch.Tensor:
    """``F(x)`` at the active rows: gather 3x3 neighbourhoods -> GEMM -> act -> mixers.

    Args:
        buffer: ``[P, C]`` zero-bordered channels-last feature buffer.
        rows: ``[N]`` int64 active rows.
        offsets: ``[9]`` from :func:`neighbour_offsets`.
    Returns:
        ``[N, C]`` updates (not yet added). Computed from the buffer as it is, for all rows,
        before anything is written: in-stage updates must not leak into neighbours' inputs.
    """
    n, channels = rows.numel(), buffer.shape[1]
    out = buffer.new_empty((n, stage.mixers[-1][0].shape[1]))
    for start in range(0, n, CHUNK_ROWS):
        chunk = rows[start:start + CHUNK_ROWS]
        gathered = buffer.index_select(0, (chunk[:, None] + offsets).reshape(-1)).reshape(-1, 9 * channels)
        h = activation(affine(gathered, stage.spatial_weight, stage.spatial_bias), stage.act)
        out[start:start + CHUNK_ROWS] = pointwise_chain(h, stage.mixers)
    return out


def sparse_stage_(buffer: torch.Tensor, rows: torch.Tensor, offsets: torch.Tensor, stage: SparseStage) -> None:
    """In place: ``buffer[rows] += F(buffer)[rows]``. Rows not listed are never written."""
    update = sparse_stage_update(buffer, rows, offsets, stage)
    buffer.index_add_(0, rows, update)


def to_padded_buffer(features: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> zero-bordered channels-last buffer ``[B*(H+2)*(W+2), C]`` (a new tensor)."""
    b, c, h, w = features.shape
    buffer = features.new_zeros((b, h + 2, w + 2, c))
    buffer[:, 1:-1, 1:-1] = features.permute(0, 2, 3, 1)
    return buffer.view(-1, c)


def shuffle_targets(b: torch.Tensor, y: torch.Tensor, x: torch.Tensor, channels: int, scale: int,
                    height: int, width: int, channels_last: bool = False) -> torch.Tensor:
    """Flat indices into ``[B, channels, height, width]`` written by a pixel shuffle from working pixels.

    Working pixel ``(b, y, x)`` with ``channels*scale**2`` values ``k = (c*scale + i)*scale + j`` lands at
    ``(b, c, scale*y + i, scale*x + j)`` (``torch.nn.PixelShuffle`` order). Returns ``[N, channels*scale**2]``,
    indices into the contiguous memory of the tensor, or with ``channels_last`` of its channels-last memory
    (``[B, height, width, channels]``, what :func:`flat_memory` views).
    """
    c = torch.arange(channels, device=b.device)[:, None, None]
    i = torch.arange(scale, device=b.device)[None, :, None]
    j = torch.arange(scale, device=b.device)[None, None, :]
    if channels_last:
        plane = (i * width * channels + j * channels + c).reshape(-1)
        base = ((b * height + scale * y) * width + scale * x) * channels
    else:
        plane = (c * height * width + i * width + j).reshape(-1)              # offsets within one image
        base = (b * channels * height + scale * y) * width + scale * x      # [N]
    return base[:, None] + plane[None, :]


def flat_memory(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a contiguous or channels-last ``[B, C, H, W]`` tensor's memory (no copy)."""
    if t.is_contiguous():
        return t.view(-1)
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).view(-1)
    raise ValueError("flat_memory needs a contiguous or channels-last tensor")


def sparse_tail_(output: torch.Tensor, image: torch.Tensor, buffer: torch.Tensor, rows: torch.Tensor,
                 targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """In place: ``output[targets] = image[targets] + (buffer[rows] @ weight + bias)``.

    ``output``/``image``: ``[B, 3, H, W]``, both contiguous or both channels-last; ``weight``: ``[C, 3*s*s]``;
    ``targets`` from :func:`shuffle_targets` for that memory layout. Pixels not targeted keep whatever ``output``
    holds (the input, bit-exact).
    """
    delta = affine(buffer.index_select(0, rows), weight, bias)
    flat_targets = targets.reshape(-1)
    flat_memory(output)[flat_targets] = flat_memory(image)[flat_targets] + delta.reshape(-1)
