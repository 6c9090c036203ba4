"""Triton execution of the deploy network: the masked stages and the tail run as fused Triton kernels.

The dense parts (pad, stem, mask prediction) and the dense path run as in :class:`TorchExecutor`; the sparse path
compacts the active pixels on the device (:mod:`m2ae_infer.kernels.triton_compact`, one count read per call),
runs one fused kernel per stage (:mod:`m2ae_infer.kernels.triton_stage`, double-buffered) and one tail kernel
(:mod:`m2ae_infer.kernels.triton_tail`). Weights are packed once, here, at construction.

Where it runs: CUDA devices; or, with ``TRITON_INTERPRET=1`` set before the kernels are first imported, CPU
tensors through the Triton interpreter (slow: for verification). Importing this module imports neither triton
nor CUDA; constructing an executor does.
"""
from __future__ import annotations

import os

import torch

from .backends import ExecutionResult
from .errors import M2AEError
from .executor import TorchExecutor, dense_front
from .model import M2AENet
from .model.network import SHUFFLE

# Active fraction above which `auto` runs the dense path. NOT measured on a GPU (none was available): it is the
# torch CPU per-pixel kernel's break-even (0.85-0.92 of dense at 40 %, 1.01-1.12 at 50 %; docs/performance.md);
# kernels.triton_bench.gpu_stage_timings measures the per-stage break-even where CUDA exists.
TRITON_DENSE_ABOVE = 0.45


class TritonUnavailable(M2AEError, ValueError):
    """The Triton backend cannot run here (no CUDA and no interpreter, or no triton package)."""


def check_triton_runs_on(device: torch.device) -> None:
    """Raise :class:`TritonUnavailable` (one line) unless the kernels can run on ``device``."""
    device = torch.device(device)
    interpret = _interpret_requested()
    if device.type != "cuda" and not interpret:
        where = "no CUDA device here" if not torch.cuda.is_available() else f"device is {device.type!r}"
        raise TritonUnavailable(
            f"backend 'triton' needs a CUDA GPU ({where}); set TRITON_INTERPRET=1 to run the kernels on CPU through "
            "the Triton interpreter (slow, for verification), or use backend='torch'")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise TritonUnavailable("backend 'triton' needs the triton package: pip install triton (Linux; the version "
                                "your torch build pins, e.g. triton==3.7.1 for torch 2.13)") from None
    from .kernels import triton_stage
    from .kernels.triton_common import kernels_interpreted

    if device.type != "cuda" and not kernels_interpreted(triton_stage._sparse_stage_kernel):
        raise TritonUnavailable("the Triton kernels were imported before TRITON_INTERPRET=1 was set, so they "
                                "need a GPU; set TRITON_INTERPRET=1 before importing m2ae_infer's Triton kernels")


def _interpret_requested() -> bool:
    """``TRITON_INTERPRET`` read as Triton reads it, without importing triton."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


class TritonExecutor:
    """Runs a deploy-form :class:`M2AENet` with the Triton sparse-pixel kernels (the ``triton``
    :class:`~m2ae_infer.backends.Backend`).

    Args:
        net: the network in deploy form, on ``device``.
        dense_above: active fraction above which ``execution="auto"`` runs the (torch) dense path (None:
            :data:`TRITON_DENSE_ABOVE`).
        device: where the kernels run (CUDA, or CPU under ``TRITON_INTERPRET=1``); default: the net's device.
        dtype: storage dtype of the feature buffer and the packed weights in the kernels (float32, float16,
            bfloat16); GEMMs accumulate in fp32. Stem, mask head and dense path stay fp32 torch.
        block_m: active pixels per kernel program (default: 64 on GPU, 128 interpreted).
    """

    name = "triton"
    measures_memory = True

    def __init__(self, net: M2AENet, dense_above: float | None = None, device=None,
                 dtype: torch.dtype = torch.float32, block_m: int | None = None):
        if not net.inference_mode:
            raise ValueError("TritonExecutor needs the deploy form: call reparameterize_model(net) first")
        device = torch.device(device) if device is not None else next(net.parameters()).device
        check_triton_runs_on(device)
        from .kernels.triton_stage import pack_stage
        from .kernels.triton_tail import pack_tail

        dense_above = TRITON_DENSE_ABOVE if dense_above is None else dense_above
        self.torch = TorchExecutor(net.to(device), dense_above)   # stem, mask head, dense path, FLOP counts
        self.net, self.dense_above = self.torch.net, dense_above
        self.dtype, self.block_m = dtype, block_m
        self.stages = [pack_stage(s, dtype, device) for s in self.torch.stages]
        self.tail_weight, self.tail_bias = pack_tail(net.tail.weight, net.tail.bias, dtype, device)

    def choose(self, execution: str, active: int, total: int) -> str:
        return self.torch.choose(execution, active, total)

    def prepare(self, execution: str, threshold: float = 0.5, dilation: int = 0) -> None:
        """Nothing to build ahead: the kernels compile on their first launch."""
        self.torch.prepare(execution, threshold, dilation)

    @torch.inference_mode()
    def run(self, image: torch.Tensor, mask: torch.Tensor | None = None, *, threshold: float = 0.5,
            dilation: int = 0, execution: str = "auto") -> ExecutionResult:
        """Restore ``image`` ``[B, 3, H, W]`` (float32 in [0, 1]); arguments as :meth:`TorchExecutor.run`."""
        from .kernels.triton_compact import compact_active_rows

        height, width = image.shape[-2:]
        padded, features, m = dense_front(self.net, image, mask, threshold, dilation)
        rows, active = compact_active_rows(m)            # the one host read of this call
        chosen = self.choose(execution, active, m.numel())
        if chosen == "dense":
            out = self.net.masked_body(padded, features, m)
        else:
            out = self.sparse_body(padded.contiguous(), features, rows)
        return ExecutionResult(out[..., :height, :width].contiguous(), m, chosen, active)

    def sparse_body(self, padded: torch.Tensor, features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Masked stages and tail at the buffer ``rows`` only (from ``compact_active_rows``).

        ``padded``: ``[B, 3, H, W]`` contiguous (H, W even); ``features``: ``[B, C, H/2, W/2]``.
        """
        from .kernels.reference import to_padded_buffer
        from .kernels.triton_stage import sparse_stages_forward
        from .kernels.triton_tail import sparse_tail_forward

        out = padded.clone()
        if rows.numel() == 0:
            return out
        buffer = to_padded_buffer(features.to(self.dtype))
        buffer = sparse_stages_forward(buffer, rows, features.shape[-1], self.stages, self.block_m)
        sparse_tail_forward(out, padded, buffer, rows, self.tail_weight, self.tail_bias, SHUFFLE, self.block_m)
        return out

    def count_flops(self, batch: int, height: int, width: int, active: int, execution: str,
                    predict_mask: bool = True, sparse_tiles: int = 0, tile_pixels: int = 0,
                    stem_cells: int | None = None) -> int:
        """FLOPs of one call, counted by ``FlopCounterMode`` on the torch reference with the same shapes.

        The kernels run the same GEMMs as the torch sparse path (``9C x C_mid``, the mixers and the tail, at the
        same ``active`` rows), so the torch count is theirs; padded lanes (channel counts rounded up to a power
        of two, the last partial row block) are work the GPU does but are not counted.
        """
        return self.torch.count_flops(batch, height, width, active, execution, predict_mask, sparse_tiles,
                                     tile_pixels, stem_cells)
