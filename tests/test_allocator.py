"""The allocator setting the CPU executor applies: freed feature maps are reused, not faulted back in.

Measured in fresh processes (the setting is process-wide): page faults of a repeated dense call with the
setting against the same call with ``M2AE_KEEP_MALLOC=1`` (glibc's defaults).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc (Linux) only")

PROBE = """
import resource, torch
from m2ae_infer import M2AEConfig, M2AENet, reparameterize_model
from m2ae_infer.allocator import keep_freed_memory
from m2ae_infer.executor import TorchExecutor
torch.set_num_threads(1)
ex = TorchExecutor(reparameterize_model(M2AENet(M2AEConfig())))
image = torch.rand(1, 3, 480, 640)
for _ in range(2):
    ex.run(image, execution="dense")
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ex.run(image, execution="dense")
print(keep_freed_memory(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    kept, faults = out.stdout.split()
    return kept, int(faults)


def test_dense_calls_reuse_freed_feature_maps():
    kept, faults = _probe()
    if kept != "True":
        pytest.skip("this libc has no mallopt (not glibc)")
    default_kept, default_faults = _probe(M2AE_KEEP_MALLOC="1")
    assert default_kept == "False"                     # the opt-out leaves the allocator alone
    # 480x640 at 32 channels: ~9.8 MB per feature map, tens of them per call; glibc's defaults hand them back.
    assert faults * 4 < default_faults, f"{faults} page faults with the setting, {default_faults} without"
