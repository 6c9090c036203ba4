"""Kernel-vs-reference checks shared by the tests and a command that prints the errors.

Each case builds random weights, runs a Triton kernel and the float64 torch reference (``F.conv2d`` /
``F.pixel_shuffle`` computed everywhere, then gated) on the *same* inputs: features and weights rounded to the
storage dtype first, then promoted, so the comparison measures the kernel's arithmetic only (FlagGems style).

    TRITON_INTERPRET=1 python -m m2ae_infer.kernels.triton_check            # CPU, through the interpreter
    python -m m2ae_infer.kernels.triton_check --device cuda                  # compiled, on a GPU
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .reference import SparseStage, activation, to_padded_buffer
from .triton_compact import compact_active_rows
from .triton_common import kernels_interpreted
from .triton_stage import _sparse_stage_kernel, pack_stage, sparse_stage_forward
from .triton_tail import pack_tail, sparse_tail_forward


# Tolerance policy (FlagGems style): |actual - expected| <= ATOL_FACTOR * res + res * |expected|, res the storage
# dtype's resolution. A stage rounds to storage three times in a row (activation, gate product, output) after
# accumulating 9*C products; the worst cases measured through the interpreter needed 0.5x (fp32), 1.1x (fp16)
# and 1.5x (bf16) of res as atol, so ATOL_FACTOR = 4 leaves room without hiding a wrong kernel.
RESOLUTION = {torch.float32: 1.3e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
ATOL_FACTOR = 4


def mismatches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask of the elements outside the tolerance of ``dtype``."""
    res = RESOLUTION[dtype]
    expected = expected.double()
    return (actual.double() - expected).abs() > ATOL_FACTOR * res + res * expected.abs()


@dataclass
class StageCase:
    """One stage run: the kernel's result next to the float64 reference, both ``[B, C, h, w]``."""

    actual: torch.Tensor       # kernel output interior, float64
    expected: torch.Tensor     # float64 reference
    inputs: torch.Tensor       # the (rounded) input features, float64
    mask: torch.Tensor         # [B, 1, h, w] bool
    src_unchanged: bool        # the stage never wrote its source buffer
    border_zero: bool          # the zero border of the destination buffer is intact


def random_convs(channels: int, mid: int, ffn: int, gated: bool, seed: int) -> list[torch.nn.Conv2d]:
    """float64 convs ``3x3 C->mid`` then ``mid->2*ffn``, ``ffn->C`` (gated) or ``mid->C``; O(1) activations."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(channels, mid, 3)] + ([(mid, 2 * ffn, 1), (ffn, channels, 1)] if gated else [(mid, channels, 1)])
    convs = []
    for c_in, c_out, k in shapes:
        conv = torch.nn.Conv2d(c_in, c_out, k, padding=k // 2).double()
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64) / (c_in * k * k) ** 0.5)
            conv.bias.copy_(torch.randn(c_out, generator=gen, dtype=torch.float64) * 0.1)
        convs.append(conv)
    return convs


def rounded(conv: torch.nn.Conv2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights as the kernel sees them: weight in ``dtype``, bias in fp32, both back in float64."""
    return conv.weight.detach().to(dtype).double(), conv.bias.detach().float().double()


def stage_case(channels: int, mid: int, ffn: int, act: str, gated: bool, mask: torch.Tensor, dtype: torch.dtype,
               device="cpu", block_m: int | None = None, seed: int = 0) -> StageCase:
    """Run one stage kernel at ``mask`` (``[B, 1, h, w]`` bool) against ``where(m, x + F(x), x)`` in float64."""
    convs = random_convs(channels, mid, ffn, gated, seed)
    batch, _, h, w = mask.shape
    x = torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    x64 = x.double()
    weights = [rounded(conv, dtype) for conv in convs]
    hid = activation(F.conv2d(x64, *weights[0], padding=1), act)
    if gated:
        a, b = F.conv2d(hid, *weights[1]).chunk(2, dim=1)
        hid = a * b
    expected = torch.where(mask, x64 + F.conv2d(hid, *weights[-1]), x64)

    packed = pack_stage(SparseStage.from_convs(convs[0], act, convs[1:]), dtype, device)
    src = to_padded_buffer(x.to(device))
    before = src.clone()
    dst = src.clone()
    rows, _ = compact_active_rows(mask.to(device))
    sparse_stage_forward(src, dst, rows, w, packed, block_m)
    grid = dst.view(batch, h + 2, w + 2, channels)
    return StageCase(actual=grid[:, 1:-1, 1:-1].permute(0, 3, 1, 2).double().cpu(), expected=expected, inputs=x64,
                     mask=mask, src_unchanged=torch.equal(src, before),
                     border_zero=bool(grid[:, [0, -1]].count_nonzero() == 0 and grid[:, :, [0, -1]].count_nonzero() == 0))


def tail_case(channels: int, mask: torch.Tensor, dtype: torch.dtype, device="cpu", block_m: int | None = None,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the tail kernel at ``mask`` ``[B, 1, h, w]``; returns ``(actual, expected, image)``, ``[B, 3, 2h, 2w]``
    (``image`` and ``actual`` fp32, ``expected`` float64 from ``F.pixel_shuffle``)."""
    gen = torch.Generator().manual_seed(seed)
    batch, _, h, w = mask.shape
    features = torch.randn(batch, channels, h, w, generator=gen).to(dtype)
    image = torch.rand(batch, 3, 2 * h, 2 * w, generator=gen)
    conv = torch.nn.Conv2d(channels, 12, 1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64) / channels ** 0.5)
        conv.bias.copy_(torch.randn(12, generator=gen, dtype=torch.float64) * 0.1)
    weight, bias = rounded(conv, dtype)
    up = mask.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    expected = torch.where(up, image.double() + F.pixel_shuffle(F.conv2d(features.double(), weight, bias), 2),
                           image.double())
    tail_w, tail_b = pack_tail(conv.weight, conv.bias, dtype, device)
    rows, _ = compact_active_rows(mask.to(device))
    image_d = image.to(device)
    out = image_d.clone()
    sparse_tail_forward(out, image_d, to_padded_buffer(features.to(device)), rows, tail_w, tail_b, 2, block_m)
    return out.cpu(), expected, image


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Triton kernels vs float64 torch reference: max abs errors")
    parser.add_argument("--device", default="cpu", help="cpu (needs TRITON_INTERPRET=1) or cuda")
    parser.add_argument("--size", type=int, nargs=2, default=(13, 17), metavar=("H", "W"), help="working grid")
    parser.add_argument("--channels", type=int, nargs="+", default=(16, 32, 48), metavar="C")
    args = parser.parse_args(argv)
    if torch.device(args.device).type != "cuda" and not kernels_interpreted(_sparse_stage_kernel):
        print("the kernels need a GPU here: run with --device cuda, or set TRITON_INTERPRET=1 for the CPU")
        return 2
    gen = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 1, *args.size, generator=gen) < 0.4
    print(f"device {args.device}, batch 2, working grid {args.size[0]}x{args.size[1]}, "
          f"{int(mask.sum())} active pixels; max |kernel - float64 reference|")
    failed = 0

    def report(actual, expected, dtype) -> str:
        nonlocal failed
        bad = int(mismatches(actual, expected, dtype).sum())
        failed += bad
        return f"{(actual.double() - expected).abs().max().item():.2e}" + (f" ({bad} off)" if bad else "")

    for dtype in RESOLUTION:
        for c in args.channels:
            block = stage_case(c, c, c, "gelu", True, mask, dtype, args.device)
            motion = stage_case(c, 16, 0, "silu", False, mask, dtype, args.device)
            tail_out, tail_ref, _ = tail_case(c, mask, dtype, args.device)
            print(f"{str(dtype).removeprefix('torch.'):9s} C={c:2d}"
                  f"  block stage {report(block.actual, block.expected, dtype)}"
                  f"  motion stage {report(motion.actual, motion.expected, dtype)}"
                  f"  tail {report(tail_out, tail_ref, torch.float32)}")
    print("all within tolerance" if not failed else f"{failed} elements outside tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(_main())
