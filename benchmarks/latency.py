"""Wall-clock timing: warm-up, repeats, median and spread (the only statistics we report)."""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timed calls after ``warmup`` untimed ones."""

    median: float
    minimum: float
    maximum: float
    repeats: int

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the repeats landed."""
        return (self.maximum - self.minimum) / self.median if self.median else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "spread": self.spread}


def time_call(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> Timing:
    """Time ``fn()``; CUDA work is synchronized so GPU time is included."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), repeats)


def machine() -> dict:
    """What the numbers were measured on: record it beside every result."""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
