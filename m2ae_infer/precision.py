"""Precisions the engines may run in: ``"fp32"`` (the default, what the 1e-5/1e-4 contracts hold for) and the
``"bf16"`` opt-in, with its one documented error bound and the check that the hardware runs it natively.

bf16 is offered only where it is native (AVX-512-BF16 or AMX on a CPU, bf16 tensor cores on CUDA): emulated, it is
slower than fp32, which is never what a user asking for it wants. Every bf16 engine keeps the mask prediction in
fp32 (the same mask as fp32) and copies unmasked pixels from the input, so only the restored pixels carry bf16
rounding; :data:`BF16_TOLERANCE` bounds that rounding against the fp32 torch reference.
"""
from __future__ import annotations

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Error of a bf16 engine against the fp32 torch reference ``net(image, mask)``, over the masked pixels of the example
# photo with its mask, shipped checkpoint (tests assert it for every engine offering bf16 where the hardware has it).
# Measured on the project's AVX-512-BF16 CPU (2026-12-04, docs/performance.md "bf16"): torch precision="bf16"
# sparse max 5.0e-4 / mean 1.7e-5, dense 4.5e-4 / 1.3e-5; OpenVINO bf16 3.9e-4 / 1.4e-5; on the v1 checkpoint, whose
# body changes pixels more, torch sparse 0.0144 / 6.7e-4 and OpenVINO 0.0145 / 9.3e-4. The torch stand-ins of before
# (no bf16 CPU at hand then): CPU autocast max 0.0118, all-bf16 incl. the image 0.0113 / 1.5e-3 / 53.8 dB. The bounds
# keep the stand-ins' 2-2.5x margin, about 2x over v1's measured error.
BF16_TOLERANCE = {"max_abs": 0.03, "mean_abs": 3e-3, "min_psnr_db": 48.0}


def bf16_unavailable(device: torch.device | str) -> str | None:
    """Why ``device`` cannot run torch bf16 natively (one clause), or None where it can."""
    device = torch.device(device)
    if device.type == "cpu":
        # the CPU's own bf16 instructions (AVX-512-BF16 or AMX). oneDNN's _is_mkldnn_bf16_supported is not the
        # check: it is True on any AVX-512 CPU, where its bf16 kernels are emulated -- on the project's 2-core
        # AVX-512 Xeon without bf16 (2026-12-06) a dense 720p call took 759 ms in bf16 against 324 ms in fp32.
        # (private helpers of torch.cpu; a torch without them is taken to have no native bf16)
        native = any(getattr(torch.cpu, name, lambda: False)()
                     for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        if not torch.backends.mkldnn.is_available() or not native:
            return "this CPU has no native bf16 (AVX-512-BF16 or AMX)"
        return None
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else "this GPU has no native bf16"
    if device.type == "meta":
        return None
    return f"bf16 is offered on CPU and CUDA devices, not {device.type}"


def output_error(output: torch.Tensor, reference: torch.Tensor, inside: torch.Tensor) -> dict:
    """Max and mean absolute error and PSNR (dB, peak 1) of ``output`` against ``reference`` over the True
    elements of ``inside`` (the same shape), and how many values that is."""
    err = (output.float() - reference.float()).abs()[inside].double()
    mse = float((err ** 2).mean())
    return {"max_abs": float(err.max()), "mean_abs": float(err.mean()),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse)), "values": int(inside.sum())}


def error_against_fp32(net, image: torch.Tensor, mask: torch.Tensor, output: torch.Tensor) -> dict:
    """:func:`output_error` of ``output`` (an engine's result for ``image`` ``[B, 3, H, W]`` with the user mask
    ``mask`` ``[B, 1, H, W]`` bool) against the fp32 torch dense reference ``net(image, mask)``, over the masked
    pixels (outside them both equal the input)."""
    from .model.mask import full_resolution, working_mask

    with torch.inference_mode():
        reference = net(image, mask)
    return output_error(output, reference, full_resolution(working_mask(mask), image.shape[-2:]).expand_as(image))


def within_tolerance(error: dict, tolerance: dict = BF16_TOLERANCE) -> bool:
    """Whether an :func:`output_error` result lies inside ``tolerance``."""
    return (error["max_abs"] <= tolerance["max_abs"] and error["mean_abs"] <= tolerance["mean_abs"]
            and error["psnr_db"] >= tolerance["min_psnr_db"])
