"""Export of the deploy network: ONNX graphs (dense and sparse), ONNX Runtime and TensorRT backends.

* :mod:`.graphs` - the torch modules that are exported (standard ops only).
* :mod:`.onnx` - export, ``onnx.checker``, verification against the torch executor in ONNX Runtime.
* :mod:`.ort` / :mod:`.trt` - :class:`~m2ae_infer.backends.Backend` engines (``make_backend``, ``Deblurrer(backend=...)``).
* :mod:`.cli` - ``m2ae-export``.

Nothing heavy is imported here: ``onnx``, ``onnxruntime`` and ``tensorrt`` load when used.
"""
from __future__ import annotations
