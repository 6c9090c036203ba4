"""The errors the library raises on purpose, under one base class.

Every :class:`M2AEError` message is one line that names the problem and what to do. The kinds keep their
standard base too (an unreadable image is still a ``ValueError``), so ``except ValueError`` keeps working:

* :class:`InvalidArgument` - a bad argument to the API (``threshold``, ``tile_overlap``, ...)
* :class:`CostsFileError` - an unreadable ``M2AE_KERNEL_COSTS`` file (``ValueError``)
* ``ImageError`` (:mod:`m2ae_infer.imgio`), ``CheckpointError`` (:mod:`m2ae_infer.checkpoint_source`),
  ``CorpusError`` (:mod:`m2ae_infer.data.corpus`) - inputs that cannot be used (``ValueError``)
* ``ExportError`` (:mod:`m2ae_infer.export.onnx`) - an export that failed its checks (``RuntimeError``)
* ``TritonUnavailable``, ``TensorRTUnavailable`` - an engine that cannot run here
* ``OutputExistsError`` (:mod:`m2ae_infer.atomic`) - a write that would replace a file (``FileExistsError``)
"""
from __future__ import annotations


class M2AEError(Exception):
    """Base class of the library's own errors: one line, naming the problem and the fix."""


class InvalidArgument(M2AEError, ValueError):
    """A bad argument. ``parameter`` is its Python name, as the message spells it; a CLI re-words the message
    with its own flag (:meth:`for_flag`)."""

    def __init__(self, parameter: str, message: str):
        super().__init__(message)
        self.parameter = parameter

    def for_flag(self, flag: str) -> str:
        """The message with ``parameter=value`` / ``parameter`` spelled as the CLI flag (``--tile-overlap 5``)."""
        return str(self).replace(f"{self.parameter}=", f"{flag} ").replace(self.parameter, flag)


class CostsFileError(M2AEError, ValueError):
    """The file ``M2AE_KERNEL_COSTS`` names (this machine's sparse-kernel cost constants) is unreadable or wrong."""

