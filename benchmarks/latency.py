"""Wall-clock timing and peak memory: warm-up, repeats, median and spread (the only statistics we report)."""
from __future__ import annotations

import ctypes
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

    @classmethod
    def of(cls, times: list[float]) -> "Timing":
        return cls(statistics.median(times), min(times), max(times), len(times))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 5,
                     pause: float = 0.0) -> dict[str, Timing]:
    """Time several calls *alternately* (a, b, a, b, ...): a drift of the machine's speed during the
    measurement (shared VMs drift by 2x within minutes) then hits every call alike, so their ratio holds.

    ``pause``: seconds slept, untimed, before each timed call. Engines with their own thread pools (OpenVINO,
    ONNX Runtime, torch's OpenMP) fight when called back to back: timed after OpenVINO calls without a 30 ms
    pause, torch dense jumped to 553 ms (ENVIRONMENT.md §7); the pause lets the other pool's threads go
    idle first."""
    if repeats < 1 or warmup < 0 or pause < 0:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and pause >= 0, got repeats={repeats}, warmup={warmup}, "
                         f"pause={pause}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if pause:
                time.sleep(pause)
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: Timing.of(t) for name, t in times.items()}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int | None:
    """Bytes ``fn()`` needs at its peak above what the process held just before the call.

    CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's exact peak). CPU (Linux): the kernel's
    resident-set high-water mark ``VmHWM``, reset through ``/proc/self/clear_refs`` right before the call,
    after ``malloc_trim`` has handed freed heap memory back (else a call could reuse memory an earlier call
    left resident and look free). Memory an allocator keeps between calls by design (ONNX Runtime's arena)
    is not seen. ``None`` where neither works.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        ctypes.CDLL(None).malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                   # 5: reset the peak RSS to the current RSS
        before = _status_bytes("VmRSS")
    except (OSError, AttributeError, StopIteration):
        fn()
        return None
    fn()
    return _status_bytes("VmHWM") - before


def machine() -> dict:
    """What the numbers were measured on: record it beside every result."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
