"""OpenVINO backend: the exported ONNX graphs compiled by OpenVINO's CPU plugin.

``Deblurrer(net, backend="openvino", execution=...)`` builds an :class:`OpenVinoExecutor`: like the ONNX Runtime
backend (:mod:`.ort`) it exports the dense / sparse / mask graphs in memory (:func:`.onnx.export_onnx`) and the
shared :class:`.runner.GraphExecutor` handles batches, user masks, ``auto`` and FLOP counting; here each graph
goes through ``openvino.convert_model`` and ``Core.compile_model(model, "CPU", ...)``.

Precision: ``"fp32"`` (default) pins ``INFERENCE_PRECISION_HINT=f32``; OpenVINO's own default is bf16 on CPUs
that have it, which breaks the 1e-4 agreement with torch. ``"bf16"`` is an opt-in for CPUs whose
``OPTIMIZATION_CAPABILITIES`` list ``BF16`` (AVX-512-BF16 / AMX); its error against the fp32 torch reference
is :data:`BF16_TOLERANCE`. On other CPUs OpenVINO would silently run f32, so bf16 is refused there. In bf16 a
predicted mask comes from the mask graph compiled in f32 (the same mask as fp32, as torch's bf16 keeps it), and
the restoring graph takes it as a user mask.
"""
from __future__ import annotations

import copy
import io

import numpy as np
import torch

from ..errors import M2AEError
from ..model import M2AENet
from ..model.mask import full_resolution
from ..precision import BF16_TOLERANCE as _PRECISION_BF16_TOLERANCE, error_against_fp32
from .onnx import DEFAULT_OPSET, GraphSpec, export_onnx
from .runner import GraphExecutor

PRECISIONS = {"fp32": "f32", "bf16": "bf16"}     # ours -> OpenVINO's INFERENCE_PRECISION_HINT

# OpenVINO's own sparse/dense break-even, from the interleaved 2-thread measurement of ENVIRONMENT.md §7 (the
# project's AVX-512 CPU, default deploy net, blob masks, 480p and 720p, OpenVINO 2026.4 f32; ratios there are to
# torch eager dense): OpenVINO dense 0.85-0.97, its sparse graph 0.39 at 20 % and 0.98-1.01 at 50 % active, i.e.
# sparse/dense ~0.40-0.46 at 20 % and ~1.01-1.19 at 50 %; interpolated, 1.0 is crossed near 46 %. Not re-measured
# on the machine this was written on (loaded by a training run, AVX2 only).
OPENVINO_DENSE_ABOVE = 0.45

# precision="bf16"'s error bound against the fp32 torch reference, shared by every bf16 engine (measured there).
BF16_TOLERANCE = _PRECISION_BF16_TOLERANCE


class OpenVinoUnavailable(M2AEError, ValueError):
    """OpenVINO cannot run what was asked here (one line: why, what to do)."""


def cpu_precisions() -> tuple[str, ...]:
    """Our precision names the CPU plugin runs natively here (``"fp32"`` always, ``"bf16"`` where listed)."""
    import openvino as ov

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ("fp32", "bf16") if "BF16" in caps else ("fp32",)


class OpenVinoExecutor(GraphExecutor):
    """Runs the dense / sparse ONNX graphs of ``net`` in OpenVINO on the CPU (the ``openvino`` Backend).

    Args:
        net: deploy-form network.
        dense_above: active fraction above which ``execution="auto"`` runs the dense graph
            (default :data:`OPENVINO_DENSE_ABOVE`).
        precision: ``"fp32"`` or ``"bf16"`` (CPUs with bf16 only; raises :class:`OpenVinoUnavailable` elsewhere).
        threads: ``INFERENCE_NUM_THREADS`` (None: OpenVINO's default, all cores).
        opset: as :class:`GraphSpec`.
    """

    name = "openvino"
    measures_memory = False     # the CPU plugin keeps its memory pools between inferences

    def __init__(self, net: M2AENet, *, dense_above: float | None = None, precision: str = "fp32",
                 threads: int | None = None, opset: int = DEFAULT_OPSET):
        import openvino as ov

        if precision not in PRECISIONS:
            raise OpenVinoUnavailable(f"backend 'openvino': precision must be one of {tuple(PRECISIONS)}, "
                                      f"got {precision!r}")
        if precision not in cpu_precisions():
            caps = ", ".join(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
            raise OpenVinoUnavailable(f"backend 'openvino': precision='bf16' needs a CPU with bf16 (AVX-512-BF16 "
                                      f"or AMX); this one offers {caps}; use precision='fp32'")
        super().__init__(net, dense_above=OPENVINO_DENSE_ABOVE if dense_above is None else dense_above, opset=opset)
        self.precision, self.threads = precision, threads
        self.mask_apart = precision == "bf16"     # bf16 restores; the mask graph predicts in f32 (see _load)
        self.core = ov.Core()
        self.config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)

    def _load(self, spec: GraphSpec):
        import openvino as ov

        model = ov.convert_model(io.BytesIO(export_onnx(self.net, spec).SerializeToString()))
        # the mask graph always in f32: bf16 logits flipped ~2 % of a photo's mask (49.7 -> 51.7 % active)
        config = {**self.config, "INFERENCE_PRECISION_HINT": "f32"} if spec.kind == "mask" else self.config
        return self.core.compile_model(model, "CPU", config)

    def _run(self, compiled, spec: GraphSpec, image: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        feeds = {"image": image.detach().to("cpu", torch.float32).numpy()}
        if spec.mask_input:
            feeds["mask"] = mask.detach().to("cpu", torch.bool).numpy()
        results = compiled(feeds)
        # copies: the arrays are views of the request's output buffers, overwritten by its next inference
        outputs = [torch.from_numpy(np.array(results[port])) for port in compiled.outputs]
        if self.precision == "bf16" and spec.kind != "mask":
            # bf16 may round the graph's own pass-through (its final Select); unmasked pixels are the input's.
            changed = full_resolution(outputs[1], image.shape[-2:])
            outputs[0] = torch.where(changed, outputs[0], image.cpu())
        return outputs


def bf16_error(net: M2AENet, image: torch.Tensor, mask: torch.Tensor, engine: str = "openvino") -> dict:
    """Max and mean abs error and PSNR (dB, peak 1) of a bf16 run against the fp32 torch dense reference
    ``net(image, mask)``, over the masked pixels (``image`` ``[1, 3, H, W]``, ``mask`` ``[1, 1, H, W]`` bool;
    unmasked pixels equal the input in both).

    ``engine``: ``"openvino"`` (this backend, dense graph; needs a bf16 CPU), or the network in torch as a
    stand-in where no bf16 CPU is at hand: ``"torch-autocast"`` (CPU bf16 autocast: convolutions in bf16, the
    residual stream in fp32) or ``"torch-bf16"`` (weights and every activation in bf16).
    """
    with torch.inference_mode():
        if engine == "openvino":
            output = OpenVinoExecutor(net, precision="bf16").run(image, mask, execution="dense").output
        elif engine == "torch-autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                output = net(image, mask).float()
        elif engine == "torch-bf16":
            output = copy.deepcopy(net).to(torch.bfloat16)(image.to(torch.bfloat16), mask).float()
        else:
            raise ValueError(f"engine must be 'openvino', 'torch-autocast' or 'torch-bf16', got {engine!r}")
    return error_against_fp32(net, image, mask, output)
