"""What every Triton kernel module here shares: the import guard, interpreter detection, block sizes.

Importing this module imports ``triton`` (never CUDA). ``TRITON_INTERPRET=1`` must be set before the kernel
modules are imported: ``@triton.jit`` decides at decoration time whether a kernel is compiled for a GPU or run by
the interpreter (numpy on the CPU), see :func:`kernels_interpreted`.

Kernels here call only Triton *builtins* (``tl.load``, ``tl.dot``, ``tl.full``, ``tl.exp``, ``tl.reduce``...) and
helpers of their own, never ``triton.language.standard``'s ``@jit`` functions (``tl.zeros``, ``tl.sum``,
``tl.cumsum``, ``tl.sigmoid``...): those are decorated once, when ``triton.language`` is first imported, and torch
imports it early (``torch.utils.flop_counter`` does). If that happened before ``TRITON_INTERPRET=1`` was set, an
interpreted kernel calling them fails with "Cannot call @triton.jit'd outside of the scope of a kernel".
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:   # pragma: no cover - exercised only where triton is missing
    raise ImportError(f"the Triton kernels need the triton package ({exc}); pip install triton "
                      "(Linux; the version your torch build pins, e.g. triton==3.7.1 for torch 2.13)") from None

__all__ = ["triton", "tl", "kernels_interpreted", "block_size", "dot_in_fp32",
           "check_storage", "STORAGE_DTYPES", "default_block_m"]

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# tl.dot needs every dimension >= 16 (tensor-core tiles); smaller channel counts are padded with masked lanes.
MIN_DOT_DIM = 16


def kernels_interpreted(kernel) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` object) was decorated in interpreter mode."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def block_size(n: int) -> int:
    """Power-of-two tile width covering ``n`` lanes (at least 16, so ``tl.dot`` accepts it)."""
    return max(MIN_DOT_DIM, triton.next_power_of_2(int(n)))


def dot_in_fp32(dtype: torch.dtype, interpreted: bool) -> bool:
    """Whether GEMM operands are upcast to fp32 (``input_precision="ieee"``) before ``tl.dot``.

    fp32 storage: always (IEEE, no TF32, so fp32 results stay within 1e-4 of torch). bf16 under the
    interpreter: also, because the interpreter's bf16 ``tl.dot`` returns garbage (triton-lang/triton#11584);
    the operands are rounded to bf16 first, so the result matches what a GPU's bf16 dot computes.
    fp16/bf16 on a GPU: native tensor-core dot with fp32 accumulation.
    """
    return dtype == torch.float32 or (interpreted and dtype == torch.bfloat16)


def default_block_m(interpreted: bool) -> int:
    """Active pixels per program: 64 on a GPU; 128 under the interpreter, which pays ~1 ms per program."""
    return 128 if interpreted else 64


def check_storage(*tensors: torch.Tensor) -> None:
    """Kernels index with the strides they are given, so every tensor must be contiguous."""
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"Triton kernels need contiguous tensors, got strides {t.stride()} for {tuple(t.shape)}")
