"""Torch execution of the deploy network: dense masked, or sparse at the active pixels only.

Both paths share the dense stages (pad, stem, mask prediction) and differ in how the masked stages run:

* ``dense``: every stage computed everywhere with oneDNN channels-last convolutions, then gated.
* ``sparse``: features copied once into a zero-bordered channels-last buffer; each stage gathers the
  3x3 neighbourhoods of the active pixels, runs its GEMMs and adds its update back at those pixels only;
  the tail writes only the active pixels of the output, which starts as a copy of the input.
* ``auto``: sparse below ``dense_above`` active fraction, dense above (a measured break-even, docs/performance.md).
"""
from __future__ import annotations

import copy

import torch

from .allocator import keep_freed_memory
from .backends import ExecutionResult, choose_execution
from .flops import AffineFlops, count_isolated
from .kernels.reference import (active_pixels, neighbour_offsets, padded_rows, shuffle_targets,
                                sparse_stage_, sparse_tail_, to_padded_buffer)
from .model import M2AENet
from .model.mask import pad_to_even, working_mask
from .model.network import SHUFFLE
from .packing import pack_stages, pack_tail

# Active fraction above which `auto` runs the dense path. Measured with m2ae-bench on the project's 2-core AVX-512
# CPU, default config, 2 threads, dense and sparse timed alternately: sparse/dense latency 0.85-0.92 at 40 %
# active and 1.01-1.12 at 50 %, at 480p and 720p, blob and scattered masks (docs/performance.md).
DENSE_ABOVE = 0.45


def dense_front(net: M2AENet, image: torch.Tensor, mask: torch.Tensor | None, threshold: float,
                dilation: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The part every executor runs densely: ``(padded image, stem features, working mask)``.

    ``image`` ``[B, 3, H, W]`` is padded to even H, W (channels-last for oneDNN); the working mask is predicted
    (``threshold``, ``dilation``) or max-pooled from the user's full-resolution ``mask``.
    """
    padded = pad_to_even(image).contiguous(memory_format=torch.channels_last)
    features = net.stem_features(padded)
    if mask is None:
        return padded, features, net.predict_mask(padded, features, threshold, dilation)
    return padded, features, working_mask(mask.to(image.device))


class TorchExecutor:
    """Runs a deploy-form :class:`M2AENet` with torch ops on any device torch supports
    (the ``torch`` :class:`~m2ae_infer.backends.Backend`).

    Args:
        net: the network in deploy form (``reparameterize_model`` first).
        dense_above: active fraction above which ``execution="auto"`` chooses the dense path.
    """

    name = "torch"
    measures_memory = True

    def __init__(self, net: M2AENet, dense_above: float = DENSE_ABOVE):
        if not net.inference_mode:
            raise ValueError("TorchExecutor needs the deploy form: call reparameterize_model(net) first")
        if not 0.0 <= dense_above <= 1.0:
            raise ValueError(f"dense_above must lie in [0, 1], got {dense_above}")
        # channels-last weights: oneDNN's fast dense convolutions on CPU.
        self.net = net.eval().to(memory_format=torch.channels_last)
        if all(p.device.type == "cpu" for p in net.parameters()):
            keep_freed_memory()     # dense calls re-fault hundreds of MB per call otherwise (see allocator.py)
        self.dense_above = dense_above
        self.stages = pack_stages(net)
        self.tail_weight, self.tail_bias = pack_tail(net)   # [C, 12], [12]
        self._meta: TorchExecutor | None = None    # meta-device twin for FLOP counting
        self._flops = AffineFlops(self._count_on_meta)

    def choose(self, execution: str, active: int, total: int) -> str:
        return choose_execution(execution, active, total, self.dense_above)

    def prepare(self, execution: str, threshold: float = 0.5, dilation: int = 0) -> None:
        """Nothing to build ahead: eager torch."""
        choose_execution(execution, 0, 1, self.dense_above)   # validates the name

    @torch.inference_mode()
    def run(self, image: torch.Tensor, mask: torch.Tensor | None = None, *, threshold: float = 0.5,
            dilation: int = 0, execution: str = "auto") -> ExecutionResult:
        """Restore ``image`` ``[B, 3, H, W]`` (float32 in [0, 1]).

        Args:
            mask: optional full-resolution ``[B, 1, H, W]`` bool mask; predicted when omitted.
            threshold, dilation: mask prediction settings (ignored when ``mask`` is given).
            execution: ``"auto"``, ``"sparse"`` or ``"dense"``.
        """
        height, width = image.shape[-2:]
        padded, features, m = dense_front(self.net, image, mask, threshold, dilation)
        active = int(m.sum())
        chosen = self.choose(execution, active, m.numel())
        if chosen == "dense":
            out = self.net.masked_body(padded, features, m)
        else:
            out = self.sparse_body(padded.contiguous(), features, active_pixels(m[:, 0]))
        return ExecutionResult(out[..., :height, :width].contiguous(), m, chosen, active)

    def sparse_body(self, padded: torch.Tensor, features: torch.Tensor,
                    coords: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Masked stages and tail at the pixels ``coords = (b, y, x)`` of the working grid only.

        ``padded``: ``[B, 3, H, W]`` contiguous (H, W even); ``features``: ``[B, C, H/2, W/2]``.
        """
        h, w = features.shape[-2:]
        buffer = to_padded_buffer(features)
        rows = padded_rows(*coords, h, w)
        offsets = neighbour_offsets(w, device=buffer.device)
        for stage in self.stages:
            sparse_stage_(buffer, rows, offsets, stage)
        targets = shuffle_targets(*coords, padded.shape[1], SHUFFLE, *padded.shape[-2:])
        out = padded.clone()
        sparse_tail_(out, padded, buffer, rows, targets, self.tail_weight, self.tail_bias)
        return out

    def count_flops(self, batch: int, height: int, width: int, active: int, execution: str,
                    predict_mask: bool = True) -> int:
        """FLOPs one call executes (``active``: True working-mask pixels), from a per-shape cost model.

        Counted once per shape by ``FlopCounterMode`` on a meta-device twin running this executor's own
        code, so the count equals what ``FlopCounterMode`` sees on the real call; sparse counts are affine in
        ``active`` (:class:`~m2ae_infer.flops.AffineFlops`), and the counting never shows in a ``FlopCounterMode``
        (or any ``TorchDispatchMode``) around the caller (:func:`~m2ae_infer.flops.count_isolated`). Gathers and scatters move bytes,
        not FLOPs, and count zero.
        """
        return self._flops((batch, height, width, execution, predict_mask), active, execution != "dense")

    def _count_on_meta(self, key: tuple, active: int) -> int:
        batch, height, width, execution, predict_mask = key
        if self._meta is None:
            self._meta = TorchExecutor(copy.deepcopy(self.net).to("meta"), self.dense_above)
        net = self._meta.net

        def call() -> None:
            padded = pad_to_even(torch.empty((batch, 3, height, width), device="meta"))
            features = net.stem_features(padded)
            if predict_mask:
                net.mask_logits(padded, features)
            if execution == "dense":
                m = torch.empty((batch, 1, *features.shape[-2:]), dtype=torch.bool, device="meta")
                net.masked_body(padded, features, m)
            else:
                coords = tuple(torch.empty(active, dtype=torch.long, device="meta") for _ in range(3))
                self._meta.sparse_body(padded, features, coords)
        return count_isolated(call)
