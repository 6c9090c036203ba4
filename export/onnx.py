"""ONNX export of the deploy network (dense and sparse graphs), its checks, and its verification in ONNX Runtime.

Graph interface (batch 1; H, W dynamic, odd sizes too):

============  =========================================  ===================================================
name          shape / dtype                               meaning
============  =========================================  ===================================================
``image``     ``[1, 3, height, width]`` float32           RGB in 0..1
``mask``      ``[1, 1, height, width]`` bool              only with ``mask_input=True``: pixels to restore
``restored``  ``[1, 3, height, width]`` float32           output; bit-identical to ``image`` outside the mask
``mask``      ``[1, 1, mask_height, mask_width]`` bool    working mask, ``ceil(H/2) x ceil(W/2)`` (output
                                                          ``working_mask`` when ``mask`` is an input)
============  =========================================  ===================================================

The threshold and dilation of the mask prediction are constants of the graph (``metadata_props`` record
them with the graph kind and precision). fp16 graphs compute in float16 with float32 inputs and outputs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write
from ..errors import M2AEError
from ..model import M2AENet
from ..model.mask import full_resolution
from .graphs import build_graph
from ..messages import one_line

DEFAULT_OPSET = 18        # erf-form GELU; runs in ONNX Runtime >= 1.14 and TensorRT 10/11 (opsets 9..24 parsed)
# The exporter writes >= 18 (asked for 17 it still wrote 18); 24 is the newest that ONNX Runtime 1.32 and
# TensorRT 10.15 both run (20+ use the Gelu op).
MIN_OPSET, MAX_OPSET = 18, 24
# Max abs difference vs the torch fp32 deploy network (the backends-agree contract, README: Contracts and the tests that hold them). fp16: 2.5 steps of an 8-bit image;
# measured 3e-4 .. 8e-4 with random tiny/default networks on the example photo (ONNX Runtime CPU).
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
# Share of working pixels whose predicted mask may differ from torch's: only pixels whose blur probability
# lies within rounding of the threshold can flip (fp32 ~ none; fp16 computes the logits in half precision).
MASK_FLIPS = {"fp32": 1e-3, "fp16": 1e-2}
_SAMPLE = (37, 50)        # trace size: odd and even sides, nothing the exporter could specialise on


class ExportError(M2AEError, RuntimeError):
    """The export or its verification failed; the message is one line."""


@dataclass(frozen=True)
class GraphSpec:
    """Which graph to export.

    Attributes:
        kind: ``"dense"`` (convolutions everywhere, gated), ``"sparse"`` (NonZero/Gather/MatMul/ScatterND at
            the active pixels only) or ``"mask"`` (``image -> mask`` only).
        mask_input: the graph takes ``mask [1, 1, H, W]`` bool instead of predicting it.
        threshold, dilation: mask prediction constants baked into the graph.
        fp16: compute in float16 (inputs/outputs stay float32).
        opset: ONNX opset of the default domain.
    """

    kind: str = "sparse"
    mask_input: bool = False
    threshold: float = 0.5
    dilation: int = 0
    fp16: bool = False
    opset: int = DEFAULT_OPSET

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "fp32"

    @property
    def input_names(self) -> list[str]:
        return ["image", "mask"] if self.mask_input else ["image"]

    @property
    def output_names(self) -> list[str]:
        if self.kind == "mask":
            return ["mask"]
        return ["restored", "working_mask" if self.mask_input else "mask"]


@contextlib.contextmanager
def _quiet():
    """The exporter logs warnings that mean nothing to a user (missing torchvision ops, empty attributes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def export_onnx(net: M2AENet, spec: GraphSpec = GraphSpec()):
    """Export ``net`` (deploy form) as the graph ``spec`` names; returns a checked ``onnx.ModelProto``.

    Uses the torch.export-based exporter (``dynamo=True``) with dynamic ``height``/``width``.
    Raises ExportError (one line) when the exporter or ``onnx.checker`` fails.
    """
    import onnx

    if not MIN_OPSET <= spec.opset <= MAX_OPSET:
        raise ExportError(f"opset {spec.opset} is not supported; use {MIN_OPSET}..{MAX_OPSET}")
    graph = build_graph(net, spec.kind, threshold=spec.threshold, dilation=spec.dilation,
                        mask_input=spec.mask_input, dtype=torch.float16 if spec.fp16 else torch.float32)
    height = torch.export.Dim("height", min=2, max=1 << 15)
    width = torch.export.Dim("width", min=2, max=1 << 15)
    args: tuple = (torch.rand(1, 3, *_SAMPLE, generator=torch.Generator().manual_seed(0)),)
    dynamic = {"image": {2: height, 3: width}}
    if spec.mask_input:
        args += (torch.zeros(1, 1, *_SAMPLE, dtype=torch.bool),)
        dynamic["mask"] = {2: height, 3: width}
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(graph, args, None, dynamo=True, opset_version=spec.opset,
                                        input_names=spec.input_names, output_names=spec.output_names,
                                        dynamic_shapes=dynamic, verbose=False)
        model = program.model_proto
    except Exception as exc:  # the exporter raises many types; the user gets one line
        raise_if_interrupted(exc)
        raise ExportError(f"torch.onnx.export failed for the {spec.kind} graph: "
                          f"{one_line(exc, 400)}") from exc
    _name_output_dims(model, spec)
    _set_metadata(model, net, spec)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected the {spec.kind} graph: {one_line(exc, 400)}") from exc
    return model


def raise_if_interrupted(exc: BaseException) -> None:
    """Raise ``KeyboardInterrupt`` when ``exc`` was caused by one: torch.export wraps a Ctrl-C that strikes inside
    its tracing into its own errors (TorchExportError <- AttributeError <- KeyboardInterrupt), which must not be
    reported as a failed export."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__


def _name_output_dims(model, spec: GraphSpec) -> None:
    """Give the outputs readable dims (the exporter writes sympy expressions such as ``Min(height, ...)``)."""
    dims = {"restored": [1, 3, "height", "width"], "mask": [1, 1, "mask_height", "mask_width"],
            "working_mask": [1, 1, "mask_height", "mask_width"]}
    for output in model.graph.output:
        shape = output.type.tensor_type.shape
        for dim, value in zip(shape.dim, dims[output.name]):
            dim.Clear()
            if isinstance(value, int):
                dim.dim_value = value
            else:
                dim.dim_param = value


def _set_metadata(model, net: M2AENet, spec: GraphSpec) -> None:
    meta = {"m2ae.graph": spec.kind, "m2ae.mask_input": str(spec.mask_input).lower(),
            "m2ae.threshold": repr(spec.threshold), "m2ae.dilation": str(spec.dilation),
            "m2ae.precision": spec.precision, "m2ae.batch": "1", "m2ae.config": json.dumps(net.config.to_dict())}
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name, model.doc_string = "m2ae-infer", __doc__.split("\n\n")[0]


def read_metadata(model) -> dict[str, str]:
    """``metadata_props`` of an exported model as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def op_counts(model) -> Counter:
    """Node types of the main graph with their counts."""
    return Counter(node.op_type for node in model.graph.node)


def save_onnx(model, path: str | os.PathLike, force: bool = False) -> None:
    """Write ``model`` atomically (temp file + rename); an existing file is kept unless ``force``."""
    write_atomic(Path(path), model.SerializeToString(), force)


def write_atomic(path: Path, data: bytes, force: bool) -> None:
    """Temp file beside ``path``, fsync, then rename (:func:`m2ae_infer.atomic.atomic_write`); without
    ``force`` never replaces an existing file (FileExistsError)."""
    with atomic_write(path, overwrite=force) as f:
        f.write(data)


def ort_session(model, threads: int | None = None, providers: list | None = None):
    """An ONNX Runtime session for a ModelProto or serialized bytes (CPU unless ``providers`` says otherwise)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3     # errors only
    if threads:
        options.intra_op_num_threads = threads
    if providers is None:
        providers = ["CPUExecutionProvider"]
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, sess_options=options, providers=providers)


@dataclass(frozen=True)
class Verification:
    """ONNX Runtime vs the torch deploy network on one image."""

    label: str
    size: tuple[int, int]
    max_abs_diff: float
    mask_flips: int            # working pixels whose mask differs from torch's prediction
    mask_pixels: int
    active_pixels: int         # True pixels of the graph's working mask
    passthrough_exact: bool    # pixels outside the mask bit-identical to the input
    precision: str             # "fp32" | "fp16": picks the tolerances

    @property
    def tolerance(self) -> float:
        return TOLERANCE[self.precision]

    @property
    def passed(self) -> bool:
        return (self.max_abs_diff <= self.tolerance and self.passthrough_exact
                and self.mask_flips <= MASK_FLIPS[self.precision] * self.mask_pixels)

    def line(self, backend: str = "onnxruntime") -> str:
        flips = f", mask differs at {self.mask_flips} of {self.mask_pixels} pixels" if self.mask_flips else ""
        verdict = "ok" if self.passed else "FAIL"
        return (f"{self.label} {self.size[0]}x{self.size[1]}, mask {self.active_pixels / self.mask_pixels:.1%}: "
                f"max |{backend} - torch| = {self.max_abs_diff:.2e} "
                f"(tolerance {self.tolerance:.0e}){flips}, pass-through "
                f"{'exact' if self.passthrough_exact else 'NOT exact'} -> {verdict}")


def verify_onnx(model, net: M2AENet, images: list[tuple[str, torch.Tensor, torch.Tensor | None]],
                spec: GraphSpec, threads: int | None = None) -> list[Verification]:
    """Run ``model`` in ONNX Runtime (CPU) on each ``(label, image [1,3,H,W], mask [1,1,H,W] or None)`` and
    compare with the torch deploy network (see :func:`verify_runner`)."""
    session = ort_session(model, threads, providers=["CPUExecutionProvider"])

    def run(image: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
        feeds = {"image": image.numpy()}
        if spec.mask_input:
            feeds["mask"] = mask.numpy()
        return [torch.from_numpy(a) for a in session.run(None, feeds)]

    return verify_runner(run, net, images, spec)


def verify_runner(run, net: M2AENet, images: list[tuple[str, torch.Tensor, torch.Tensor | None]],
                  spec: GraphSpec) -> list[Verification]:
    """Compare ``run(image, mask) -> [restored, working_mask]`` (any backend running the graph ``spec``) with
    :class:`TorchExecutor` on the same network in the same mode, the independent reference.

    When a predicted mask differs from torch's at a few borderline pixels, the restored images are compared
    with torch run on the graph's own mask, so that one flipped pixel is reported, not mistaken for a
    numerical error.
    """
    from ..executor import TorchExecutor

    reference = TorchExecutor(net)
    execution = "sparse" if spec.kind == "sparse" else "dense"
    results = []
    for label, image, mask in images:
        image = image.cpu()
        restored, working = (t.cpu() for t in run(image, mask if spec.mask_input else None))
        expected = reference.run(image.to(reference_device(net)), mask if spec.mask_input else None,
                                 threshold=spec.threshold, dilation=spec.dilation, execution=execution)
        flips = int((working != expected.mask.cpu()).sum())
        if flips:
            changed = full_resolution(working, image.shape[-2:]).to(reference_device(net))
            expected = reference.run(image.to(reference_device(net)), changed, execution=execution)
        outside = ~full_resolution(working, image.shape[-2:]).expand_as(image)
        results.append(Verification(
            label, tuple(image.shape[-2:]), float((restored - expected.output.cpu()).abs().max()), flips,
            working.numel(), int(working.sum()), bool(torch.equal(restored[outside], image[outside])),
            spec.precision))
    return results


def reference_device(net: M2AENet) -> torch.device:
    return next(net.parameters()).device


def example_inputs(odd_crop: tuple[int, int] = (1, 3)) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The bundled example photo and its blur mask, whole and cropped to an odd size (``H-1 x W-3``)."""
    from PIL import Image

    from ..shipped import EXAMPLE_MASK, EXAMPLE_PHOTO

    rgb = np.asarray(Image.open(EXAMPLE_PHOTO).convert("RGB"), dtype=np.float32) / 255.0
    blur = np.asarray(Image.open(EXAMPLE_MASK).convert("L")) > 127
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].contiguous()
    mask = torch.from_numpy(blur)[None, None]
    h, w = image.shape[-2] - odd_crop[0], image.shape[-1] - odd_crop[1]
    h, w = h - (1 - h % 2), w - (1 - w % 2)       # make both sides odd
    return [("example_blurry.png", image, mask),
            ("example_blurry.png[crop]", image[..., :h, :w].contiguous(), mask[..., :h, :w].contiguous())]
