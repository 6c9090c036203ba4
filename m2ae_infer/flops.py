"""FLOP accounting without re-running the network: counts taken once per shape, then a cost model.

``RunInfo`` reports the FLOPs a call executed. Counting them by re-running the network under
``FlopCounterMode`` on every call cost more than the sparse work itself (measured: 75 of 97 ms at 5 % active,
720x480), and a ``FlopCounterMode`` or profiler the *user* wrapped around ``run()`` counted those re-runs too.
Here:

* a count is taken once per shape, by ``FlopCounterMode`` on a meta-device copy of the network running the
  same code the real call runs (so it equals what ``FlopCounterMode`` sees on the real call), and cached;
* the sparse body's FLOPs are affine in the number of active working pixels (every active pixel runs the same
  GEMM rows) and, for the tile kernel, of active tiles (every tile runs the same convolution), so one count per
  shape and one per such number (0 and 1) give the count for any mask exactly;
* when a ``TorchDispatchMode`` (a ``FlopCounterMode``, say) is active around the caller, the count runs in a
  thread of its own: the dispatch-mode stack is thread-local, so that counter never sees the meta run. Without
  one it runs inline (a helper thread inside torch at a Ctrl-C aborted the process at shutdown, exit -6).
"""
from __future__ import annotations

import copy
import threading
from typing import Callable

import torch

from .model.mask import pad_to_even


def count_isolated(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` under a fresh ``FlopCounterMode``, hidden from any dispatch mode around the caller."""
    # Imported here: torch.utils.flop_counter imports triton when it is installed, and importing m2ae_infer
    # must not (tests/test_lazy_imports.py).
    from torch.utils.flop_counter import FlopCounterMode

    result: dict[str, object] = {}

    def work() -> None:
        try:
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                fn()
            result["flops"] = int(counter.get_total_flops())
        except BaseException as exc:   # re-raised in the caller's thread
            result["error"] = exc

    if not _dispatch_modes_active():
        work()      # nothing around the caller to hide from: count inline (no thread outlives a Ctrl-C)
    else:
        _in_own_thread(work)
    if "error" in result:
        raise result["error"]
    return result["flops"]


def _dispatch_modes_active() -> bool:
    """Whether a TorchDispatchMode (a FlopCounterMode, say) is active in this thread; True if torch cannot say."""
    length = getattr(torch._C, "_len_torch_dispatch_stack", None)
    return length is None or length() > 0


def _in_own_thread(work: Callable[[], None]) -> None:
    thread = threading.Thread(target=work, name="m2ae-flop-count")
    thread.start()
    try:
        thread.join()
    except BaseException:
        # Ctrl-C while waiting: let the count finish (milliseconds) before the interrupt propagates, so no
        # thread is still inside torch when the interpreter shuts down (that aborted the process, exit -6).
        thread.join()
        raise


class AffineFlops:
    """``flops(key, counts)`` = ``fixed(key) + sum(counts[i] * slope_i(key))``, each term counted once per ``key``.

    ``count(key, counts)`` does the counting (e.g. a meta-device run) for a tuple of counts (active pixels,
    active tiles, ...): once with all zeros and once per entry with that entry 1, so ``1 + len(counts)`` times
    per key. A dense call has no counts (``()``): one count per key.
    """

    def __init__(self, count: Callable[[tuple, tuple[int, ...]], int]):
        self._count = count
        self._cache: dict[tuple, tuple[int, tuple[int, ...]]] = {}

    def __call__(self, key: tuple, counts: tuple[int, ...]) -> int:
        if key not in self._cache:
            zeros = (0,) * len(counts)
            fixed = self._count(key, zeros)
            slopes = tuple(self._count(key, zeros[:i] + (1,) + zeros[i + 1:]) - fixed for i in range(len(counts)))
            self._cache[key] = (fixed, slopes)
        fixed, slopes = self._cache[key]
        return fixed + sum(n * slope for n, slope in zip(counts, slopes, strict=True))


class MaskPassFlops:
    """FLOPs of the mask pass on a crop (the stem where the mask head reads it, ``M2AENet.mask_features``, and the
    mask-head convs, as :func:`m2ae_infer.tiling.run_tiled` runs it per tile), counted once per crop shape on a
    meta-device copy of ``net``."""

    def __init__(self, net: torch.nn.Module):
        self.net = copy.deepcopy(net).to("meta")
        self._cache: dict[tuple[int, int, int], int] = {}

    def __call__(self, batch: int, height: int, width: int) -> int:
        key = (batch, height, width)
        if key not in self._cache:
            def call() -> None:
                padded = pad_to_even(torch.empty((batch, 3, height, width), device="meta"))
                self.net.mask_head.coarse_logits(padded, self.net.mask_features(padded))
            self._cache[key] = count_isolated(call)
        return self._cache[key]
