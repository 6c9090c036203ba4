"""GPU timings of the Triton stage kernel against dense cuDNN convolution (an entry for ``m2ae-bench``).

:func:`gpu_stage_timings` times, per channel count, feature-map size and mask density, one masked body stage
(3x3 conv C->C, act, mixer C->2E, simple gate, mixer E->C, residual) four ways:

* ``triton_stage_ms``: the fused Triton kernel at the active pixels (:func:`.triton_stage.sparse_stage_forward`);
* ``torch_sparse_stage_ms``: the torch gather/GEMM/scatter path (:func:`.reference.sparse_stage_`);
* ``dense_stage_ms``: the same stage computed everywhere with cuDNN (``F.conv2d``, channels-last) and gated;
* ``dense_conv3x3_ms``: the dense 3x3 convolution alone (a lower bound for any dense stage);

plus ``compact_ms`` (mask -> active rows, :func:`.triton_compact.compact_active_rows`) and ``max_abs_err`` of the
Triton stage against the fp32 dense torch stage (so every timed case is also a correctness check on that GPU).
Times come from ``triton.testing.do_bench`` (median). No GPU was available where this was written: it has
only run through the interpreter with a CPU timer (tests/test_triton.py), never on a GPU.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

from .reference import SparseStage, activation, neighbour_offsets, sparse_stage_, to_padded_buffer
from .triton_common import kernels_interpreted, triton
from .triton_compact import compact_active_rows
from .triton_stage import _sparse_stage_kernel, pack_stage, sparse_stage_forward

DEFAULT_CHANNELS = (16, 32, 48, 64)
DEFAULT_SIZES = ((270, 480), (540, 960))            # working grids of 540x960 and 1080x1920 images
DEFAULT_DENSITIES = (0.01, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)


def gpu_stage_timings(channels=DEFAULT_CHANNELS, sizes=DEFAULT_SIZES, densities=DEFAULT_DENSITIES, *,
                      dtype: torch.dtype = torch.float16, act: str = "gelu", ffn_expand: int = 1,
                      mask_kind: str = "blobs", device: str | torch.device = "cuda", warmup: int = 25,
                      rep: int = 100, seed: int = 0) -> list[dict]:
    """Time one masked stage: Triton kernel vs torch sparse vs dense cuDNN, over a grid of cases.

    Args:
        channels: feature widths C (the stage is C -> C, mixer width E = C * ffn_expand).
        sizes: working-grid sizes ``(h, w)`` of the feature map (half the image's H x W).
        densities: active fractions in ``(0, 1]``.
        dtype: storage dtype of features and weights (float32: IEEE fp32 dots, no TF32; float16/bfloat16:
            tensor cores with fp32 accumulation).
        mask_kind: ``"blobs"`` (object-like regions) or ``"random"`` (scattered pixels).
        device: a CUDA device.
        warmup, rep: ``triton.testing.do_bench`` budgets in ms.
    Returns:
        One dict per (C, size, density): ``channels, height, width, density, active, dtype, act, mask_kind,
        device_name, triton_stage_ms, torch_sparse_stage_ms, dense_stage_ms, dense_conv3x3_ms, compact_ms,
        dense_over_triton`` (> 1: the kernel is faster than the dense stage) and ``max_abs_err``.
    Raises:
        RuntimeError: without CUDA, or when the kernels were loaded in interpreter mode (no meaningful time).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("gpu_stage_timings needs a CUDA GPU (torch.cuda.is_available() is False); "
                           "the Triton kernels can only be checked for correctness here (TRITON_INTERPRET=1)")
    if kernels_interpreted(_sparse_stage_kernel):
        raise RuntimeError("gpu_stage_timings: the Triton kernels were loaded with TRITON_INTERPRET=1; "
                           "unset it to time compiled kernels")
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(f"gpu_stage_timings needs a CUDA device, got {device}")

    def bench(fn: Callable[[], object]) -> float:
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    with torch.cuda.device(device):
        rows = stage_timing_cases(channels, sizes, densities, dtype=dtype, act=act, ffn_expand=ffn_expand,
                                  mask_kind=mask_kind, device=device, bench=bench, seed=seed)
    name = torch.cuda.get_device_name(device)
    return [dict(row, device_name=name) for row in rows]


def cpu_timer(fn: Callable[[], object]) -> float:
    """One-shot wall time in ms (for running :func:`stage_timing_cases` through the interpreter)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def stage_timing_cases(channels, sizes, densities, *, dtype, act, ffn_expand, mask_kind, device,
                       bench: Callable[[Callable[[], object]], float], seed: int = 0) -> list[dict]:
    """The measurement loop of :func:`gpu_stage_timings` with any timer ``bench(fn) -> ms`` and device."""
    results = []
    for c in channels:
        gen = torch.Generator().manual_seed(seed + c)
        ffn = c * ffn_expand
        convs = [torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.Conv2d(c, 2 * ffn, 1), torch.nn.Conv2d(ffn, c, 1)]
        with torch.no_grad():
            for conv in convs:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) / conv.weight[0].numel() ** 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)
        stage = SparseStage.from_convs(convs[0], act, convs[1:]).to(device)
        packed = pack_stage(stage, dtype, device)
        torch_stage = stage.to(dtype=dtype)
        weights = [(conv.weight.detach().to(device, dtype), conv.bias.detach().to(device, dtype)) for conv in convs]
        for h, w in sizes:
            x32 = torch.randn(1, c, h, w, generator=gen).to(device)
            x = x32.to(dtype).contiguous(memory_format=torch.channels_last)
            src = to_padded_buffer(x32.to(dtype))
            dst = src.clone()
            offsets = neighbour_offsets(w, device=device)
            dense_conv = lambda: F.conv2d(x, *weights[0], padding=1)                          # noqa: E731
            dense_conv_ms = bench(dense_conv)
            for density in densities:
                m = _mask(mask_kind, density, h, w, seed + c).to(device)
                dense_ms = bench(lambda: _dense_stage(x, m, weights, act))
                compact_ms = bench(lambda: compact_active_rows(m))
                rows, n = compact_active_rows(m)
                triton_ms = bench(lambda: sparse_stage_forward(src, dst, rows, w, packed))
                scratch = src.clone()
                torch_ms = bench(lambda: sparse_stage_(scratch, rows, offsets, torch_stage))
                sparse_stage_forward(src, dst, rows, w, packed)
                expected = _dense_stage(x32, m, [(wt.float(), bs.float()) for wt, bs in weights], act)
                got = dst.view(1, h + 2, w + 2, c)[:, 1:-1, 1:-1].permute(0, 3, 1, 2).float()
                results.append(dict(
                    channels=c, height=h, width=w, density=density, active=n, dtype=str(dtype).removeprefix("torch."),
                    act=act, mask_kind=mask_kind, triton_stage_ms=triton_ms, torch_sparse_stage_ms=torch_ms,
                    dense_stage_ms=dense_ms, dense_conv3x3_ms=dense_conv_ms, compact_ms=compact_ms,
                    dense_over_triton=dense_ms / triton_ms if triton_ms > 0 else float("inf"),
                    max_abs_err=(got - expected).abs().max().item()))
    return results


def _dense_stage(x: torch.Tensor, m: torch.Tensor, weights, act: str) -> torch.Tensor:
    """``where(m, x + F(x), x)`` computed everywhere with convolutions (the dense masked stage)."""
    (w3, b3), (wi, bi), (wo, bo) = weights
    h = activation(F.conv2d(x, w3, b3, padding=1), act)
    a, b = F.conv2d(h, wi, bi).chunk(2, dim=1)
    return torch.where(m, x + F.conv2d(a * b, wo, bo), x)


def _mask(kind: str, density: float, h: int, w: int, seed: int) -> torch.Tensor:
    """``[1, 1, h, w]`` bool working-grid mask with ``density`` of its pixels True (the bench's masks)."""
    from ..benchmarks.masks import working_grid_mask
    if not 0.0 < density <= 1.0:
        raise ValueError(f"densities must lie in (0, 1], got {density}")
    if kind not in ("blobs", "random"):
        raise ValueError(f"mask_kind must be 'blobs' or 'random', got {kind!r}")
    return working_grid_mask("scattered" if kind == "random" else kind, h, w, density, seed)
