"""m2ae-infer: local-motion deblurring that computes only where the picture is blurred.

The public names load on first use (PEP 562), so that importing the package (as every console script does before
its ``main`` runs) does not import torch: a Ctrl-C in the first second reaches the script's one-line handler.
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"Deblurrer": "api", "RunInfo": "api", "CheckpointError": "checkpoint", "load_checkpoint": "checkpoint",
          "save_checkpoint": "checkpoint", "M2AEConfig": "config", "ImageError": "imgio", "ImageWarning": "imgio",
          "save_image": "imgsave", "M2AENet": "model", "reparameterize_model": "reparam"}
__all__ = ["Deblurrer", "RunInfo", "M2AEConfig", "M2AENet", "reparameterize_model", "load_checkpoint",
           "save_checkpoint", "CheckpointError", "ImageError", "ImageWarning", "save_image"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value   # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
