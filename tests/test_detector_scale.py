"""The mask of a large image predicted at the detector's scale (m2ae_infer/detector_scale.py), against independent
references: block means computed in numpy, the mask head run by hand on them, the body run with that mask given,
FlopCounterMode on the real call, and the tiled run against the untiled one."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from m2ae_infer import Deblurrer
from m2ae_infer import detector_scale
from m2ae_infer.detector_scale import block_means, detector_factor
from m2ae_infer.errors import InvalidArgument
from m2ae_infer.model.mask import pad_to_even
from m2ae_infer.reparam import reparameterize_model
from m2ae_infer.tiling import receptive_field
from helpers import random_net

SIDE = 64   # a small detector side, so that small test images are "large"


@pytest.mark.parametrize("height,width,side,expected", [
    (400, 400, 1024, 1), (1024, 700, 1024, 1), (1025, 10, 1024, 2), (10, 2048, 1024, 2), (3000, 4224, 1024, 5),
    (5000, 300, 0, 1), (5000, 300, None, 1), (130, 65, 64, 3)])
def test_detector_factor_is_the_smallest_that_fits(height, width, side, expected):
    k = detector_factor(height, width, side)
    assert k == expected
    if side:
        assert -(-max(height, width) // k) <= side and (k == 1 or -(-max(height, width) // (k - 1)) > side)


def _numpy_block_means(image: np.ndarray, k: int) -> np.ndarray:
    """[B, C, H, W] -> means over k x k blocks, a block cut by the edge averaging the pixels it holds."""
    b, c, h, w = image.shape
    out = np.zeros((b, c, -(-h // k), -(-w // k)))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            out[:, :, i, j] = image[:, :, i * k:(i + 1) * k, j * k:(j + 1) * k].mean(axis=(2, 3))
    return out


@pytest.mark.parametrize("shape,k", [((1, 3, 20, 20), 4), ((2, 3, 23, 17), 3), ((1, 3, 9, 40), 5), ((1, 3, 7, 7), 8)])
@pytest.mark.parametrize("band_blocks", [1, 2, 64])
def test_block_means_equal_a_numpy_reference_in_any_bands(monkeypatch, shape, k, band_blocks):
    monkeypatch.setattr(detector_scale, "BAND_BLOCKS", band_blocks)
    image = torch.from_numpy(np.random.default_rng(3).random(shape).astype(np.float32))
    rows = []
    got = block_means(lambda top, bottom: rows.append(bottom - top) or image[..., top:bottom, :], shape[2], k)
    assert np.allclose(got.numpy(), _numpy_block_means(image.numpy().astype(np.float64), k), atol=1e-6)
    assert max(rows) <= band_blocks * k and sum(rows) == shape[2]      # every row read once, in bounded bands


@pytest.fixture(scope="module", params=["tiny", "tiny_v2"])
def net(request):
    return reparameterize_model(random_net(request.param, seed=17))


def _reference_probabilities(net, image: np.ndarray, k: int) -> torch.Tensor:
    """Blur probabilities on the working grid, by hand: numpy block means, the head's coarse logits, each coarse
    cell stretched over the jump * k input pixels it covers (bilinear), cut to the grid."""
    h, w = image.shape[:2]
    small = torch.from_numpy(_numpy_block_means(image.transpose(2, 0, 1)[None].astype(np.float64), k)).float()
    padded = pad_to_even(small)
    features = None if net.mask_head.reads_image else net.stem_features(padded)
    with torch.no_grad():
        coarse = net.mask_head.coarse_logits(padded, features)
    cell = net.mask_head.jump * k // 2
    logits = F.interpolate(coarse, size=(coarse.shape[-2] * cell, coarse.shape[-1] * cell), mode="bilinear",
                           align_corners=False)
    return torch.sigmoid(logits[0, 0, :(h + 1) // 2, :(w + 1) // 2])


@pytest.mark.parametrize("size", [(150, 203), (97, 64 * 3 + 1)])
def test_a_large_image_is_masked_at_the_detectors_scale_and_restored_at_full_size(net, size):
    h, w = size
    image = np.random.default_rng(5).random((h, w, 3)).astype(np.float32)
    k = detector_factor(h, w, SIDE)
    assert k > 1
    probabilities = _reference_probabilities(net, image, k)
    threshold = float(probabilities.median())           # about half the grid flagged
    deblurrer = Deblurrer(net, device="cpu", execution="sparse", threshold=threshold, detector_side=SIDE, tile=0)
    out, info = deblurrer.run(image, return_info=True)
    expected = (probabilities > threshold).repeat_interleave(2, 0).repeat_interleave(2, 1)[:h, :w].numpy()
    assert info.detector_scale == k
    assert 0 < expected.mean() < 1
    assert (info.mask != expected).mean() < 0.002      # equal up to probabilities within rounding of the threshold
    # the body ran at full size with that mask: the same as giving it
    given = Deblurrer(net, device="cpu", execution="sparse", detector_side=None, tile=0).run(image, mask=info.mask)
    assert np.array_equal(out, given)
    assert np.array_equal(out[~info.mask], image[~info.mask])


def test_images_up_to_the_side_are_masked_at_their_own_size(net):
    image = np.random.default_rng(6).random((SIDE, SIDE - 10, 3)).astype(np.float32)
    scaled = Deblurrer(net, device="cpu", detector_side=SIDE, threshold=0.5)
    native = Deblurrer(net, device="cpu", detector_side=None, threshold=0.5)
    (a, ia), (b, ib) = scaled.run(image, return_info=True), native.run(image, return_info=True)
    assert ia.detector_scale == 1 and np.array_equal(a, b) and np.array_equal(ia.mask, ib.mask)
    assert ia.flops_executed == ib.flops_executed


@pytest.mark.slow
def test_tiled_run_uses_the_same_scaled_mask_and_output(net):
    overlap = receptive_field(net).min_overlap
    h, w = max(3 * overlap + 6, 3 * SIDE + 6), 2 * overlap + 10
    image = np.random.default_rng(9).random((h, w, 3)).astype(np.float32)
    untiled = Deblurrer(net, device="cpu", threshold=0.5, detector_side=SIDE, tile=0)
    tiled = Deblurrer(net, device="cpu", threshold=0.5, detector_side=SIDE, tile=2 * overlap)
    (a, ia), (b, ib) = untiled.run(image, return_info=True), tiled.run(image, return_info=True)
    assert ib.tiles > 1 and ia.tiles == 1 and ia.detector_scale == ib.detector_scale > 1
    assert np.array_equal(ia.mask, ib.mask)
    assert np.abs(a - b).max() <= 1e-5


@pytest.mark.parametrize("tiled", [False, True], ids=["untiled", "tiled"])
def test_info_flops_equal_flop_counter_with_the_scaled_detector(net, tiled):
    overlap = receptive_field(net).min_overlap
    size = (max(3 * overlap + 6, 3 * SIDE + 6), 2 * overlap + 10) if tiled else (150, 131)
    image = np.random.default_rng(4).random((*size, 3)).astype(np.float32)
    deblurrer = Deblurrer(net, device="cpu", threshold=0.5, detector_side=SIDE, tile=2 * overlap if tiled else 0)
    counter = FlopCounterMode(display=False)
    with counter:
        deblurrer.run(image)
    _, info = deblurrer.run(image, return_info=True)
    assert info.detector_scale > 1 and info.flops_executed == counter.get_total_flops()


@pytest.mark.parametrize("bad", [-1, 1, SIDE - 1, 1.5, "1024", True])
def test_bad_detector_side_is_one_line_error(bad):
    with pytest.raises(InvalidArgument, match="detector_side must be at least 64 pixels, or 0"):
        Deblurrer(random_net("tiny_v2"), device="cpu", detector_side=bad)


def test_cli_detector_side_error_names_the_flag(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "m2ae_infer.cli", "--example", "-o", str(tmp_path),
                           "--detector-side", "8"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "m2ae-deblur: error: --detector-side must be at least 64 pixels, or 0 for the image's own size; got 8"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("side,expected", [(None, None), (0, None), (200, 200)])
def test_eval_runners_carry_the_detector_side(side, expected):
    from m2ae_infer.evaluate import _runners
    runners = _runners(random_net("tiny_v2"), "cpu", 0.5, 0, side)
    assert {r.detector_side for r in runners.values()} == {expected}
    # a Deblurrer handed in keeps its own
    again = _runners(runners["dense"])
    assert {r.detector_side for r in again.values()} == {expected}
