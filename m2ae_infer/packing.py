"""The deploy network packed for the sparse executors: each masked stage as GEMM matrices, and the tail.

The executors own this packing (the torch and Triton executors and the exported sparse graph read it); the
model only exposes its structure: a stage is ``pointwise(act(spatial(x)))`` (``stage.spatial``,
``stage.act``, ``stage.pointwise``), the tail a 1x1 conv before the pixel shuffle.
"""
from __future__ import annotations

import torch

from .kernels.reference import SparseStage


def pack_stages(net) -> list[SparseStage]:
    """The masked stages of a deploy-form ``net`` in execution order (motion analyzer, then the blocks)."""
    if not net.inference_mode:
        raise ValueError("the sparse executors need the deploy form: call reparameterize_model(net) first")
    return [SparseStage.from_convs(stage.spatial, stage.act, list(stage.pointwise)) for stage in net.stages()]


def pack_tail(net) -> tuple[torch.Tensor, torch.Tensor]:
    """The tail 1x1 conv as a GEMM: weight ``[C, 3 * SHUFFLE**2]`` (the transposed view of the contiguous conv
    weight, as :func:`~m2ae_infer.kernels.reference.affine` reads it) and bias."""
    return net.tail.weight.detach().flatten(1).contiguous().t(), net.tail.bias.detach().clone()
