"""The allocator setting the CPU executor applies: freed large blocks are reused, not faulted back in."""
from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
import torch

from m2ae_infer.allocator import keep_freed_memory

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc (Linux) only")


def _faults(fn) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@linux
def test_freed_blocks_are_reused_without_page_faults():
    if not keep_freed_memory():
        pytest.skip("this libc has no mallopt (not glibc)")
    pages = 64 * 2 ** 20 // os.sysconf("SC_PAGE_SIZE")
    _faults(lambda: torch.empty(16 * 2 ** 20).fill_(1.0))          # 64 MB: allocated, touched, freed
    again = _faults(lambda: torch.empty(16 * 2 ** 20).fill_(1.0))  # the same size again
    assert again < pages // 10, f"{again} page faults for {pages} pages: freed memory was handed back"


@linux
def test_environment_variable_leaves_the_allocator_alone():
    code = ("from m2ae_infer.allocator import keep_freed_memory; import m2ae_infer.executor; "
            "print(keep_freed_memory())")
    env = {**os.environ, "M2AE_KEEP_MALLOC": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
