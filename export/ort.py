"""ONNX Runtime backend: the network exported to ONNX in memory and run by ``onnxruntime``.

``Deblurrer(net, backend="onnxruntime", execution=...)`` builds an :class:`OrtExecutor`: on construction it
exports the graph the chosen execution needs (``sparse``: the sparse graph, ``dense``: the dense graph,
``auto``: the small mask graph, see :mod:`.runner`) as in-memory model bytes; other variants (user masks,
other thresholds) are exported on first use and cached. Providers: CPU, or CUDA then CPU when the device is
CUDA and ``onnxruntime-gpu`` is installed (else CPU, with a warning).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ..model import M2AENet
from .onnx import DEFAULT_OPSET, GraphSpec, export_onnx, ort_session
from .runner import GraphExecutor


# ONNX Runtime's own sparse/dense break-even on the project's 2-core CPU (720x480, blob masks, mask-input graphs,
# median of 7): sparse/dense 0.71 at 50 %, 0.96 at 65 %, 1.16 at 80 %; higher than torch's because ORT's dense
# convolutions are slower than oneDNN's channels-last path.
ORT_DENSE_ABOVE = 0.6


class OrtExecutor(GraphExecutor):
    """Runs the dense / sparse ONNX graphs of ``net`` in ONNX Runtime (interface of ``TorchExecutor``).

    Args:
        net: deploy-form network.
        dense_above: active fraction above which ``execution="auto"`` runs the dense graph
            (default :data:`ORT_DENSE_ABOVE`).
        device: ``"cpu"`` or a CUDA device (needs ``onnxruntime-gpu``; inputs/outputs stay torch tensors on it).
        threads: ONNX Runtime intra-op threads (None: its default, all cores).
        fp16, opset: as :class:`GraphSpec`.
    """

    name = "onnxruntime"
    measures_memory = False     # ORT's CPU arena keeps its memory between runs: a per-call RSS peak reads ~0

    def __init__(self, net: M2AENet, *, dense_above: float | None = None, device: str | torch.device = "cpu",
                 threads: int | None = None, fp16: bool = False, opset: int = DEFAULT_OPSET):
        import onnxruntime as ort

        super().__init__(net, dense_above=ORT_DENSE_ABOVE if dense_above is None else dense_above, fp16=fp16,
                         opset=opset)
        self.threads = threads
        self.providers: list = ["CPUExecutionProvider"]
        if torch.device(device).type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                # No TF32 for fp32 graphs: the 1e-4 agreement with torch (README: Contracts) needs full fp32 GEMMs.
                self.providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": 0}))
            else:
                warnings.warn("backend 'onnxruntime': this onnxruntime has no CUDA provider (install "
                              "onnxruntime-gpu instead of onnxruntime); running on the CPU", stacklevel=3)
        self.models: dict[GraphSpec, bytes] = {}    # the exported graphs, serialized (save them if you like)

    def _load(self, spec: GraphSpec):
        self.models[spec] = export_onnx(self.net, spec).SerializeToString()
        return ort_session(self.models[spec], self.threads, self.providers)

    def _run(self, session, spec: GraphSpec, image: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        feeds = {"image": image.detach().to("cpu", torch.float32).numpy()}
        if spec.mask_input:
            feeds["mask"] = mask.detach().to("cpu", torch.bool).numpy()
        return [torch.from_numpy(np.asarray(out)) for out in session.run(None, feeds)]
