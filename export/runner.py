"""Executors that run exported graphs: :class:`~m2ae_infer.backends.Backend` for ONNX Runtime and TensorRT.

A backend (ONNX Runtime, TensorRT) only has to turn a :class:`GraphSpec` into something that runs one
image; this module handles batches, user masks, the ``auto`` choice and FLOP counting.

How ``execution="auto"`` decides (the graphs are batch 1 and take their decision before running):

* user mask: the working mask is computed here (max-pool, as the graphs do), its density picks the
  dense or sparse mask-input graph by :meth:`TorchExecutor.choose`'s rule.
* predicted mask, ``auto_policy="measure"`` (ONNX Runtime): the small ``mask`` graph (pad, stem, mask head)
  runs first; the density picks the dense or sparse *mask-input* graph, fed with that mask. The stem runs
  twice (~4 % of the dense FLOPs at the default config); :meth:`count_flops` does not include that stem.
* ``auto_policy="dense"`` (TensorRT): always the dense graph, no pre-pass (see ``trt.py``).

``mask_apart`` (OpenVINO bf16): predicted masks always come from the mask graph, whatever the execution.
"""
from __future__ import annotations

import torch

from ..backends import ExecutionResult
from ..executor import TorchExecutor
from ..model import M2AENet
from ..model.mask import full_resolution, working_mask
from .onnx import DEFAULT_OPSET, GraphSpec


class GraphExecutor:
    """Base class: runs per-image graphs built lazily by :meth:`_load` and cached per :class:`GraphSpec`.

    Args:
        net: deploy-form network the graphs are exported from (also counts FLOPs).
        dense_above: active fraction above which ``auto`` picks the dense graph.
        fp16: export float16 graphs.
        opset: ONNX opset of the exported graphs.
    """

    name = "graph"
    measures_memory = True
    auto_policy = "measure"     # or "dense": auto runs the dense graph without measuring the mask
    # predict the mask with the mask graph even where one graph could do all (an engine whose restoring graphs
    # run in lower precision keeps the mask graph at full precision, so the mask is fp32's)
    mask_apart = False

    def __init__(self, net: M2AENet, *, dense_above: float, fp16: bool = False, opset: int = DEFAULT_OPSET):
        self.torch_executor = TorchExecutor(net, dense_above=dense_above)   # validates net and dense_above
        self.net, self.dense_above, self.fp16, self.opset = net, dense_above, fp16, opset
        self._graphs: dict[GraphSpec, object] = {}

    # -- what a backend provides ----------------------------------------------------------------------
    def _load(self, spec: GraphSpec) -> object:
        """Build whatever runs ``spec`` (a session, an engine)."""
        raise NotImplementedError

    def _run(self, graph: object, spec: GraphSpec, image: torch.Tensor,
             mask: torch.Tensor | None) -> list[torch.Tensor]:
        """Run one image ``[1, 3, H, W]`` (and mask ``[1, 1, H, W]`` bool); outputs as CPU/device tensors."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------------------
    def spec(self, kind: str, mask_input: bool = False, threshold: float = 0.5, dilation: int = 0) -> GraphSpec:
        # Mask constants only matter when the graph predicts the mask: one mask-input graph serves all.
        if mask_input:
            threshold, dilation = 0.5, 0
        return GraphSpec(kind, mask_input, float(threshold), int(dilation), self.fp16, self.opset)

    def graph(self, spec: GraphSpec) -> object:
        """The runnable for ``spec``, exported and loaded on first use."""
        if spec not in self._graphs:
            self._graphs[spec] = self._load(spec)
        return self._graphs[spec]

    def choose(self, execution: str, active: int, total: int) -> str:
        """``"sparse"`` or ``"dense"`` (the same rule as the torch executor)."""
        return self.torch_executor.choose(execution, active, total)

    def prepare(self, execution: str, threshold: float = 0.5, dilation: int = 0) -> None:
        """Export and load now the graphs that ``execution`` needs for predicted masks."""
        self.choose(execution, 0, 1)   # validates the name
        if execution != "auto":
            self.graph(self.spec(execution, False, threshold, dilation))
        elif self.auto_policy == "dense":
            self.graph(self.spec("dense", False, threshold, dilation))
        else:
            self.graph(self.spec("mask", False, threshold, dilation))

    @torch.inference_mode()
    def run(self, image: torch.Tensor, mask: torch.Tensor | None = None, *, threshold: float = 0.5,
            dilation: int = 0, execution: str = "auto") -> ExecutionResult:
        """Restore ``image`` ``[B, 3, H, W]`` float32 in 0..1; ``mask``: optional ``[B, 1, H, W]`` bool.

        Same contract as :meth:`TorchExecutor.run`; the batch runs one image at a time.
        """
        self.choose(execution, 0, 1)
        images = [image[i:i + 1].contiguous() for i in range(image.shape[0])]
        masks = [None] * len(images) if mask is None else [mask[i:i + 1].bool().contiguous()
                                                           for i in range(mask.shape[0])]
        if execution == "auto" and self.auto_policy == "dense":
            execution = "dense"
        if execution == "auto" or (mask is None and self.mask_apart):
            if mask is None:   # the mask graph first, then its mask as a user mask
                spec = self.spec("mask", False, threshold, dilation)
                working = [self._run(self.graph(spec), spec, img, None)[0].to(image.device) for img in images]
                masks = [full_resolution(w, img.shape[-2:]) for w, img in zip(working, images)]
            else:
                working = [working_mask(m) for m in masks]
            if execution == "auto":
                active = sum(int(w.sum()) for w in working)
                execution = self.choose("auto", active, sum(w.numel() for w in working))
        mask_input = masks[0] is not None
        spec = self.spec(execution, mask_input, threshold, dilation)
        graph = self.graph(spec)
        outputs = [self._run(graph, spec, img, m) for img, m in zip(images, masks)]
        restored = torch.cat([o[0] for o in outputs]).to(image.device)
        working = torch.cat([o[1] for o in outputs]).to(image.device)
        return ExecutionResult(restored, working, execution, int(working.sum()))

    def count_flops(self, batch: int, height: int, width: int, active: int, execution: str,
                    predict_mask: bool = True, sparse_tiles: int = 0, tile_pixels: int = 0,
                    stem_cells: int | None = None) -> int:
        """FLOPs of the same call in torch (``FlopCounterMode`` on the torch executor, same shapes and active
        count): the graphs compute the same GEMMs/convolutions, so the count is that of the graph that ran
        (except the repeated stem of a measured ``auto`` call, see the module docstring)."""
        return self.torch_executor.count_flops(batch, height, width, active, execution, predict_mask, sparse_tiles,
                                              tile_pixels, stem_cells)
