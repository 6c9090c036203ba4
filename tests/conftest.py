"""Test-session settings: small thread count (CI machines have 2 cores), `helpers` importable.

Only ``tests/`` goes on ``sys.path`` (not the repo root), so the installed ``m2ae_infer`` is what the
tests import: a stray ``import kernels`` would fail here as it fails for users.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)
