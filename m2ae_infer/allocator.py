"""glibc allocator settings for the CPU path: keep freed feature maps instead of faulting them back in.

A dense call allocates and frees a few hundred MB of feature maps (13 MB each at 480p). glibc hands blocks
that large straight back to the kernel (``munmap``, or a heap trim) and the next call page-faults every page
of them back in, zero-filled: at 480x854 that was 53 700 minor faults and 197 ms per dense call instead of
1 400 faults and 129 ms, measured on the project's 2-core CPU. glibc's own adaptive threshold makes it depend
on history too, so the same call swung between those two speeds from run to run.

:func:`keep_freed_memory` raises glibc's mmap and trim thresholds once per process so freed blocks are reused.
The peak memory is unchanged; the resident memory stays near the peak between calls. It changes a setting of
the whole process, so the torch executor calls it only on Linux with glibc, and ``M2AE_KEEP_MALLOC=1`` in the
environment leaves the allocator alone.
"""
from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30          # 1 GiB: larger than any feature map of a 4K image at the widest config

_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds to :data:`THRESHOLD` (once); True if they are set.

    Does nothing (returns False) off Linux, without glibc, or when ``M2AE_KEEP_MALLOC=1`` is set.
    """
    if "done" in _state:
        return _state["done"]
    ok = False
    if sys.platform.startswith("linux") and os.environ.get("M2AE_KEEP_MALLOC") != "1":
        try:
            libc = ctypes.CDLL(None)
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD))
        except (OSError, AttributeError):       # not glibc (musl has no mallopt)
            ok = False
    _state["done"] = ok
    return ok
