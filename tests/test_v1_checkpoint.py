"""The v1 checkpoint (shipped until network v2) still loads and runs: its config has no ``detector`` key and
means the stem-feature head; sparse equals dense on it, and pixels outside its mask are untouched."""
from pathlib import Path

import numpy as np
import torch

from m2ae_infer import Deblurrer, load_checkpoint

V1 = Path(__file__).resolve().parents[1] / "m2ae_infer" / "assets" / "m2ae_v1.safetensors"


def test_v1_checkpoint_loads_as_the_stem_head():
    net = load_checkpoint(V1)
    assert net.config.detector == "stem" and not net.mask_head.reads_image and net.inference_mode


def test_v1_checkpoint_runs_sparse_equal_to_dense():
    image = np.random.default_rng(11).random((70, 90, 3)).astype(np.float32)
    mask = np.zeros((70, 90), bool)
    mask[20:50, 30:76] = True     # whole 2x2 working cells, so "outside the mask" is exact
    sparse = Deblurrer(V1, execution="sparse", tile=0).run(image, mask=mask)
    dense = Deblurrer(V1, execution="dense", tile=0).run(image, mask=mask)
    assert np.abs(sparse - dense).max() <= 1e-5
    assert np.array_equal(sparse[~mask], image[~mask]) and not np.array_equal(sparse[mask], image[mask])
    assert torch.is_tensor(Deblurrer(V1).run(torch.rand(3, 33, 41)))
