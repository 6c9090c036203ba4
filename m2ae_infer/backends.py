"""One interface for every engine that runs the deploy network, and the registry that builds them.

Every engine implements :class:`Backend`; :func:`make_backend` builds one by name and is the only place that
knows which class serves which name. The API (``Deblurrer(backend=...)``), tiling, export and ``m2ae-bench``
all go through it. The engines registered here:

==============  ==========================================  =====================================
name            class                                       runs on
==============  ==========================================  =====================================
``torch``       :class:`m2ae_infer.executor.TorchExecutor`   CPU, CUDA (fp32; bf16 where native)
``triton``      :class:`m2ae_infer.triton_executor.TritonExecutor`  CUDA (CPU: interpreter, checks only)
``onnxruntime`` :class:`m2ae_infer.export.ort.OrtExecutor`   CPU (CUDA with onnxruntime-gpu)
``tensorrt``    :class:`m2ae_infer.export.trt.TrtExecutor`   CUDA with TensorRT
``openvino``    :class:`m2ae_infer.export.openvino.OpenVinoExecutor`  CPU (fp32; bf16 where the CPU has it)
==============  ==========================================  =====================================

A new engine implements the protocol and calls :func:`register_backend` with a factory; nothing else names
engines. Factories import their heavy dependencies (triton, onnxruntime, tensorrt, openvino) only when called.

Precision: every engine runs ``"fp32"`` (the default, and what the 1e-5/1e-4 contracts hold for); an engine
that also offers ``"bf16"`` lists it in its entry's ``precisions`` (``torch`` and ``openvino``, where the hardware
runs bf16 natively; :mod:`m2ae_infer.precision` holds its error bound).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

from .errors import InvalidArgument

EXECUTIONS = ("auto", "sparse", "dense")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class ExecutionResult:
    """Output of one call: the restored image and how it was computed."""

    output: torch.Tensor        # [B, 3, H, W]
    mask: torch.Tensor          # working mask [B, 1, ceil(H/2), ceil(W/2)] bool
    execution: str              # "sparse" or "dense": what actually ran
    active_pixels: int          # True pixels of the working mask (over the batch)
    sparse_tiles: int = 0       # working-grid tiles the tile kernel computed (0: per pixel only, or dense)
    tile_pixels: int = 0        # active pixels inside those tiles (the rest ran per pixel)
    stem_cells: int | None = None   # tile-grid cells the stem ran at (kernels.cells); None: the dense stem


def choose_execution(execution: str, active: int, total: int, dense_above: float) -> str:
    """The rule every backend applies: ``auto`` runs dense above ``dense_above`` active fraction."""
    if execution not in EXECUTIONS:
        raise InvalidArgument("execution", f"execution must be one of {EXECUTIONS}, got {execution!r}")
    if execution != "auto":
        return execution
    return "dense" if active > dense_above * total else "sparse"


@runtime_checkable
class Backend(Protocol):
    """What an engine offers. Contracts (tests/test_backends.py and the per-engine tests): ``run`` equals the
    dense masked torch reference within the engine's tolerance and leaves unmasked pixels bit-identical;
    ``count_flops`` equals ``FlopCounterMode`` on the real call (for the non-torch engines: on the torch
    reference of the same call), given the call's ``active_pixels``, ``sparse_tiles``, ``tile_pixels`` and
    ``stem_cells``.

    Attributes:
        name: the registry name.
        dense_above: active fraction above which ``execution="auto"`` runs dense.
        measures_memory: whether a per-call RSS peak means anything (an arena allocator keeps memory).
    """

    name: str
    dense_above: float
    measures_memory: bool

    def choose(self, execution: str, active: int, total: int) -> str:
        """``"sparse"`` or ``"dense"`` for a call with ``active`` of ``total`` working pixels."""

    def prepare(self, execution: str, threshold: float = 0.5, dilation: int = 0) -> None:
        """Build now what the first call with these settings would build (graphs, engines); may do nothing."""

    def run(self, image: torch.Tensor, mask: torch.Tensor | None = None, *, threshold: float = 0.5,
            dilation: int = 0, execution: str = "auto") -> ExecutionResult:
        """Restore ``image`` ``[B, 3, H, W]`` float32 in [0, 1]; ``mask``: optional ``[B, 1, H, W]`` bool
        (predicted with ``threshold``/``dilation`` when omitted)."""

    def count_flops(self, batch: int, height: int, width: int, active: int, execution: str,
                    predict_mask: bool = True, sparse_tiles: int = 0, tile_pixels: int = 0,
                    stem_cells: int | None = None) -> int:
        """FLOPs one call of that shape executes with ``active`` working pixels, ``tile_pixels`` of them in
        ``sparse_tiles`` tiles, the stem at ``stem_cells`` cells or densely (None) (:class:`ExecutionResult`),
        without running it."""


@dataclass(frozen=True)
class BackendEntry:
    """A registered engine: how to build it and what its timings mean where it runs."""

    factory: Callable[..., Backend]
    summary: str
    # Devices on which its latency is meaningful; elsewhere it may still run (for checks), but the bench
    # skips it with ``untimed_reason``.
    timed_devices: tuple[str, ...] = ("cpu", "cuda")
    untimed_reason: str = ""
    precisions: tuple[str, ...] = ("fp32",)     # what ``make_backend(..., precision=)`` may ask of it

    def timed_on(self, device: str | torch.device) -> bool:
        return torch.device(device).type in self.timed_devices


_REGISTRY: dict[str, BackendEntry] = {}


def register_backend(name: str, factory: Callable[..., Backend], summary: str, **entry) -> None:
    """Add an engine: ``factory(network, *, device, execution, threshold, dilation, dense_above, threads,
    precision)`` returns a :class:`Backend` or raises ValueError (one line: why it cannot run here, what to install)."""
    _REGISTRY[name] = BackendEntry(factory, summary, **entry)


def backend_names() -> tuple[str, ...]:
    """Registered engine names, in registration order (``"auto"`` is not one: it means ``torch``)."""
    return tuple(_REGISTRY)


def backend_entry(name: str) -> BackendEntry:
    if name not in _REGISTRY:
        raise InvalidArgument("backend", f"backend must be one of {('auto', *_REGISTRY)}, got {name!r}")
    return _REGISTRY[name]


def check_precision(name: str, precision: str) -> None:
    """Raise InvalidArgument (one line) unless engine ``name`` (``"auto"``: torch) runs ``precision``."""
    if precision not in PRECISIONS:
        raise InvalidArgument("precision", f"precision must be one of {PRECISIONS}, got {precision!r}")
    name = "torch" if name == "auto" else name
    if precision not in backend_entry(name).precisions:
        offering = [n for n, e in _REGISTRY.items() if precision in e.precisions]
        raise InvalidArgument("precision", f"backend {name!r} runs fp32 only; precision={precision!r} is "
                              f"offered by backend {' or '.join(map(repr, offering)) or 'none'}")


def make_backend(name: str, network, *, device: str | torch.device = "cpu", execution: str = "auto",
                 threshold: float = 0.5, dilation: int = 0, dense_above: float | None = None,
                 threads: int | None = None, precision: str = "fp32", compile_dense: bool = False) -> Backend:
    """The engine ``name`` (``"auto"``: torch) for a deploy-form ``network`` on ``device``.

    ``execution``, ``threshold`` and ``dilation`` let engines that export or compile prepare what the first
    call will need; ``dense_above=None`` takes the engine's measured switch; ``threads``: the engine's own
    thread pool where it has one (torch uses ``torch.set_num_threads``); ``precision``: ``"fp32"`` or, for the
    engines whose entry lists it, ``"bf16"`` (:func:`check_precision`); ``compile_dense``: the torch engine's
    opt-in ``torch.compile`` of its dense path (:class:`~m2ae_infer.executor.TorchExecutor`; the other engines
    compile their graphs anyway). Raises ValueError when the engine cannot run here."""
    entry = backend_entry("torch" if name == "auto" else name)
    check_precision(name, precision)
    check_compile_dense(name, compile_dense)
    extra = {"compile_dense": True} if compile_dense else {}
    return entry.factory(network, device=torch.device(device), execution=execution, threshold=threshold,
                         dilation=dilation, dense_above=dense_above, threads=threads, precision=precision, **extra)


def check_compile_dense(name: str, compile_dense: bool) -> None:
    """Raise InvalidArgument (one line) if ``compile_dense`` is asked of an engine other than torch."""
    if not isinstance(compile_dense, bool):
        raise InvalidArgument("compile_dense", f"compile_dense must be True or False, got {compile_dense!r}")
    if compile_dense and name not in ("auto", "torch"):
        raise InvalidArgument("compile_dense", f"compile_dense is an option of backend 'torch' (torch.compile of "
                              f"its dense path); backend {name!r} compiles its own graphs: drop compile_dense")


# ------------------------------------------------------------------------------------ the engines
# ``dense_above=None`` is each engine's own measured switch: the classes take None for it.
def _torch(network, *, device, dense_above, precision, compile_dense=False, **_):
    from .executor import TorchExecutor
    return TorchExecutor(network.to(device), dense_above=dense_above, precision=precision,
                         compile_dense=compile_dense)


def _triton(network, *, device, dense_above, **_):
    from .triton_executor import TritonExecutor   # imports triton only now
    return TritonExecutor(network, dense_above=dense_above, device=device)


def _onnxruntime(network, *, device, execution, threshold, dilation, dense_above, threads, **_):
    try:
        from .export.ort import OrtExecutor
        executor = OrtExecutor(network, device=device, threads=threads, dense_above=dense_above)
        executor.prepare(execution, threshold, dilation)   # exports the graph ``execution`` needs, in memory
    except ImportError as exc:
        raise ValueError(f"backend 'onnxruntime' needs onnx, onnxscript and onnxruntime ({exc}); "
                         "pip install 'm2ae-infer[onnx]'") from None
    return executor


def _tensorrt(network, *, device, execution, threshold, dilation, dense_above, **_):
    from .export.trt import TensorRTUnavailable, TrtExecutor
    try:
        executor = TrtExecutor(network, device=device, dense_above=dense_above)
        executor.prepare(execution, threshold, dilation)
    except TensorRTUnavailable as exc:
        raise ValueError(f"backend 'tensorrt' is not available: {exc}") from None
    return executor


def _openvino(network, *, device, execution, threshold, dilation, dense_above, threads, precision):
    try:   # the CPU plugin: tensors on another device are copied to the CPU and the results back
        from .export.openvino import OpenVinoExecutor
        executor = OpenVinoExecutor(network, precision=precision, threads=threads, dense_above=dense_above)
        executor.prepare(execution, threshold, dilation)
    except ImportError as exc:
        raise ValueError(f"backend 'openvino' needs openvino ({exc}): pip install 'm2ae-infer[openvino]'") from None
    return executor


register_backend("torch", _torch, "torch ops: oneDNN dense convolutions, tile and per-pixel sparse kernels",
                 precisions=("fp32", "bf16"))
register_backend("triton", _triton, "fused sparse-pixel Triton kernels (CUDA)", timed_devices=("cuda",),
                 untimed_reason="needs a CUDA GPU; on a CPU the kernels run only in the Triton interpreter, "
                                "which checks correctness, not speed")
register_backend("onnxruntime", _onnxruntime, "the exported dense/sparse ONNX graphs in ONNX Runtime")
register_backend("tensorrt", _tensorrt, "TensorRT engines built from the ONNX graphs (CUDA)",
                 timed_devices=("cuda",), untimed_reason="needs CUDA and TensorRT")
register_backend("openvino", _openvino, "the exported dense/sparse ONNX graphs in OpenVINO's CPU plugin",
                 timed_devices=("cpu",), untimed_reason="OpenVINO's CPU plugin: timed on the CPU only",
                 precisions=("fp32", "bf16"))
