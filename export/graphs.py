"""Export-friendly torch modules: what the ONNX graphs compute, written so the exporter sees only standard ops.

The dense and sparse modules take ``image`` ``[1, 3, H, W]`` float32 in 0..1 (batch 1; any H, W >= 2, odd too) and
return ``(restored [1, 3, H, W] float32, mask [1, 1, ceil(H/2), ceil(W/2)] bool)``. With
``mask_input=True`` they take a second input ``mask`` ``[1, 1, H, W]`` bool instead of predicting it.

* :class:`DenseGraph` is :meth:`M2AENet.masked_body`: every stage as a convolution everywhere, gated
  with ``Where`` (so it exports to ``Conv``).
* :class:`SparseGraph` is the sparse executor's algorithm (``kernels/reference.py``) with no ``Conv`` in
  the masked stages: ``NonZero`` -> active rows of the zero-bordered channels-last buffer -> ``Gather``
  of the 3x3 neighbourhoods -> ``MatMul`` -> act -> mixers -> ``Gather`` + ``Add`` -> ``ScatterND``
  (replace, no ``reduction``: TensorRT rejects ScatterND reductions) -> tail the same way into the
  output, which starts as the input, so pixels outside the mask pass through bit-identical.

Why not reuse the executor's code as is: it pads with a Python ``if`` on the size (frozen by tracing),
chunks with a Python loop over the active count (data-dependent) and mutates in place.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.reference import activation, neighbour_offsets, padded_rows, shuffle_targets
from ..model import M2AENet
from ..checks import check_mask_settings
from ..model.mask import binarize
from ..model.network import SHUFFLE
from ..packing import pack_stages, pack_tail


def pad_to_even_gather(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, H + H%2, W + W%2]`` replicating the last row/column.

    Same values as :func:`m2ae_infer.model.mask.pad_to_even`, written as a ``Gather`` with clamped
    indices so that one graph serves even and odd sizes (a size test would be frozen at export).
    """
    height, width = x.shape[-2], x.shape[-1]
    rows = torch.arange(height + height % 2, device=x.device).clamp(max=height - 1)
    cols = torch.arange(width + width % 2, device=x.device).clamp(max=width - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


def upsample_mask(m: torch.Tensor) -> torch.Tensor:
    """Working mask ``[B, 1, h, w]`` -> ``[B, 1, 2h, 2w]`` (nearest), as Expand + Reshape."""
    b, c, h, w = m.shape
    return m[:, :, :, None, :, None].expand(b, c, h, SHUFFLE, w, SHUFFLE).reshape(b, c, SHUFFLE * h, SHUFFLE * w)


class ExportGraph(nn.Module):
    """Shared front: pad to even, stem, mask (predicted or the user's), and the final crop.

    Args:
        net: deploy-form network (copied; the copy is cast to ``dtype``).
        threshold, dilation: baked into the graph when the mask is predicted.
        mask_input: take the mask as a second input instead of predicting it.
        dtype: compute dtype (float32, or float16 for an fp16 graph). Inputs and ``restored`` stay
            float32; the pass-through pixels are taken from the float32 input, so they stay exact.
    """

    def __init__(self, net: M2AENet, threshold: float = 0.5, dilation: int = 0, mask_input: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not net.inference_mode:
            raise ValueError("export needs the deploy form: call reparameterize_model(net) first")
        check_mask_settings(threshold, dilation)
        # A CPU copy: export traces on the CPU, and the caller's network keeps its device and layout.
        self.net = copy.deepcopy(net).eval().to(device="cpu", dtype=dtype, memory_format=torch.contiguous_format)
        self.threshold, self.dilation, self.mask_input, self.dtype = float(threshold), int(dilation), mask_input, dtype

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = image.shape[-2], image.shape[-1]
        padded = pad_to_even_gather(image)                                    # float32 [1, 3, H2, W2]
        features = self.net.stem_features(padded.to(self.dtype))             # [1, C, h, w]
        if self.mask_input:
            # A working pixel is active when any of its 2x2 input pixels is (max-pool of the padded mask).
            full = pad_to_even_gather(mask.to(torch.float32))
            m = F.max_pool2d(full, SHUFFLE) > 0
        else:
            m = binarize(self.net.mask_logits(padded.to(self.dtype), features), self.threshold, self.dilation)
        restored = self.body(padded, features, m)
        return restored[:, :, :height, :width], m

    def body(self, padded: torch.Tensor, features: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DenseGraph(ExportGraph):
    """Dense masked execution: ``x <- where(m, x + F(x), x)`` per stage with convolutions, then the tail."""

    def body(self, padded: torch.Tensor, features: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        x = features
        for stage in self.net.stages():
            x = torch.where(m, x + stage(x), x)
        delta = self.net.shuffle(self.net.tail(x)).to(torch.float32)
        return torch.where(upsample_mask(m), padded + delta, padded)


class SparseGraph(ExportGraph):
    """Sparse execution: the masked stages and the tail touch the active working pixels only.

    Every stage reads its input rows from the buffer as it was before the stage (all gathers first),
    then writes ``old + update`` at the active rows: the executor's ``index_add_``, bit for bit, expressed
    as Gather + Add + ScatterND so that no scatter reduction is needed. With no active pixel every tensor
    of the body is empty and ``restored`` is the input.
    """

    def __init__(self, net: M2AENet, **kwargs):
        super().__init__(net, **kwargs)
        # The stages packed as GEMM matrices (the executor's SparseStage), registered as buffers so that
        # they become the graph's initializers (the unused conv weights are dropped by the exporter).
        stages = pack_stages(self.net)
        self._acts = [s.act for s in stages]
        self._mixer_counts = [len(s.mixers) for s in stages]
        for i, s in enumerate(stages):
            self.register_buffer(f"stage{i}_spatial_weight", s.spatial_weight)    # [9*C, C_mid]
            self.register_buffer(f"stage{i}_spatial_bias", s.spatial_bias)
            for j, (w, b) in enumerate(s.mixers):
                self.register_buffer(f"stage{i}_mixer{j}_weight", w)              # [C_a, C_b]
                self.register_buffer(f"stage{i}_mixer{j}_bias", b)
        tail_weight, tail_bias = pack_tail(self.net)
        self.register_buffer("tail_weight", tail_weight)   # [C, 12]
        self.register_buffer("tail_bias", tail_bias)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.matmul(x, getattr(self, f"{name}_weight")) + getattr(self, f"{name}_bias")

    def body(self, padded: torch.Tensor, features: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        _, channels, h, w = features.shape
        # Zero-bordered channels-last buffer [(h+2)*(w+2), C]: the border is the convs' zero padding.
        buffer = F.pad(features, [1, 1, 1, 1]).permute(0, 2, 3, 1).reshape(-1, channels)
        # NonZero on a float tensor: TensorRT's NonZero takes FP32/FP16 only (onnx-tensorrt operators.md). A 2-D
        # NonZero gives (y, x) in row-major order directly: no division of a flat index by the width (which
        # OpenVINO's CPU plugin computed inexactly, as a multiplication by the reciprocal).
        yx = torch.nonzero(m[0, 0].to(torch.float32))                                 # [N, 2] int64
        y, x = yx[:, 0], yx[:, 1]
        zero = torch.zeros_like(y)
        rows = padded_rows(zero, y, x, h, w)                                         # [N]
        neighbours = (rows[:, None] + neighbour_offsets(w, device=rows.device)[None, :]).reshape(-1)  # [N*9]
        for i, (act, n_mix) in enumerate(zip(self._acts, self._mixer_counts)):
            gathered = buffer.index_select(0, neighbours).reshape(-1, 9 * channels)  # [N, 9*C]
            h_mid = activation(self._linear(gathered, f"stage{i}_spatial"), act)
            for j in range(n_mix):
                if j:                                                                # simple gate
                    first, second = h_mid.chunk(2, dim=1)
                    h_mid = first * second
                h_mid = self._linear(h_mid, f"stage{i}_mixer{j}")
            # All rows were gathered above, before this write: updates never leak into neighbours' inputs.
            updated = buffer.index_select(0, rows) + h_mid
            buffer = torch.index_put(buffer, (rows,), updated)                       # ScatterND, replace
        delta = self._linear(buffer.index_select(0, rows), "tail").to(torch.float32)  # [N, 12]
        targets = shuffle_targets(zero, y, x, padded.shape[1], SHUFFLE, padded.shape[-2], padded.shape[-1])
        targets = targets.reshape(-1)                                                # [N*12]
        out = padded.reshape(-1)
        out = torch.index_put(out, (targets,), out.index_select(0, targets) + delta.reshape(-1))
        return out.reshape(padded.shape)


class MaskGraph(ExportGraph):
    """Only the front: ``image -> mask`` (pad, stem, mask head). Lets a runner learn the mask density
    before it picks the dense or the sparse graph (``execution="auto"``); ``forward`` returns the mask."""

    def __init__(self, net: M2AENet, **kwargs):
        if kwargs.get("mask_input"):
            raise ValueError("the mask graph predicts the mask; it has no mask input")
        super().__init__(net, **kwargs)

    def forward(self, image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        padded = pad_to_even_gather(image).to(self.dtype)
        features = self.net.stem_features(padded)
        return binarize(self.net.mask_logits(padded, features), self.threshold, self.dilation)


GRAPHS = {"dense": DenseGraph, "sparse": SparseGraph, "mask": MaskGraph}


def build_graph(net: M2AENet, kind: str, **kwargs) -> ExportGraph:
    """``kind`` ``"dense"``, ``"sparse"`` or ``"mask"``; keyword arguments as :class:`ExportGraph`."""
    if kind not in GRAPHS:
        raise ValueError(f"graph kind must be one of {sorted(GRAPHS)}, got {kind!r}")
    return GRAPHS[kind](net, **kwargs).eval()
