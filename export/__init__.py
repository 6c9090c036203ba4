"""Export of the deploy network: ONNX graphs (dense and sparse), ONNX Runtime and TensorRT backends.

* :mod:`.graphs` - the torch modules that are exported (standard ops only).
* :mod:`.onnx` - export, ``onnx.checker``, verification against the torch executor in ONNX Runtime.
* :mod:`.ort` / :mod:`.trt` - executors with the torch executor's interface (``Deblurrer(backend=...)``).
* :mod:`.cli` - ``m2ae-export``.

Nothing heavy is imported here: ``onnx``, ``onnxruntime`` and ``tensorrt`` load when used.
"""
from __future__ import annotations

EXPORT_BACKENDS = ("onnxruntime", "tensorrt")


def make_executor(backend: str, net, *, device: "torch.device", execution: str, threshold: float,
                  dilation: int, dense_above: float | None = None):
    """Executor for ``Deblurrer(backend=...)``: exports ``net`` (deploy form) and prepares the graphs that
    ``execution`` needs for predicted masks; ``dense_above=None`` takes the backend's measured switch.
    Raises ValueError for a backend that cannot run here."""
    switch = {} if dense_above is None else {"dense_above": dense_above}
    if backend == "onnxruntime":
        try:
            from .ort import OrtExecutor

            executor = OrtExecutor(net, device=device, **switch)
            executor.prepare(execution, threshold, dilation)
        except ImportError as exc:
            raise ValueError(f"backend 'onnxruntime' needs onnx, onnxscript and onnxruntime ({exc}); "
                             "pip install 'm2ae-infer[onnx]'") from None
        return executor
    if backend == "tensorrt":
        from .trt import TensorRTUnavailable, TrtExecutor
        try:
            executor = TrtExecutor(net, device=device, **switch)
            executor.prepare(execution, threshold, dilation)
        except TensorRTUnavailable as exc:
            raise ValueError(f"backend 'tensorrt' is not available: {exc}") from None
        return executor
    raise ValueError(f"export backends are {EXPORT_BACKENDS}, got {backend!r}")


__all__ = ["EXPORT_BACKENDS", "make_executor"]
