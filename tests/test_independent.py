"""Independent evaluation-only blur generator (m2ae_infer.data.independent, issue 14)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("skimage", reason="the blur generators need scikit-image: pip install 'm2ae-infer[train]'")
signal = pytest.importorskip("scipy.signal")

from m2ae_infer.data import independent as ind  # noqa: E402
from m2ae_infer.data import synth  # noqa: E402

CROP = 80
NAMES = ("astronaut", "coffee", "camera")
assert all(n in synth.TRAIN_PHOTOS for n in NAMES)


@pytest.fixture(scope="module")
def photos():
    return [synth.load_photo(n) for n in NAMES]


@pytest.fixture(scope="module")
def fixed(photos):
    return ind.independent_set(photos, 10, seed=5, crop=CROP)


def _bytes(samples) -> list[bytes]:
    return [a.tobytes() for s in samples for a in (s.blurry, s.sharp, s.mask, s.trajectory, s.trajectories,
                                                  s.regions)] + [s.kind.encode() for s in samples]


def test_deterministic(photos, fixed):
    again = ind.independent_set(photos, 10, seed=5, crop=CROP)
    assert _bytes(again) == _bytes(fixed)
    other = ind.independent_set(photos, 10, seed=6, crop=CROP)
    assert all(not np.array_equal(a.blurry, b.blurry) for a, b in zip(fixed, other))


def test_set_layout_and_types(fixed):
    assert [s.kind for s in fixed] == ["local"] * 8 + ["sharp", "global"]
    for s in fixed:
        assert s.blurry.shape == s.sharp.shape == (CROP, CROP, 3)
        assert s.blurry.dtype == s.sharp.dtype == np.float32
        assert s.mask.dtype == bool and s.mask.shape == (CROP, CROP)
        assert s.regions.dtype == np.int8 and s.trajectory.shape == (synth.TRAJ_POINTS, 2)
        for img in (s.blurry, s.sharp):       # quantized to 8 bits
            assert np.array_equal(img, np.round(img * 255) / np.float32(255))
        assert np.array_equal(s.regions >= 0, s.mask)
        if s.kind != "sharp":
            assert s.trajectories.shape[1:] == (synth.TRAJ_POINTS, 2)
            assert np.all(s.trajectories[:, synth.TRAJ_POINTS // 2] == 0)     # mid-exposure = sharp frame


def test_outside_mask_identical(fixed):
    for s in fixed:
        assert np.array_equal(s.blurry[~s.mask], s.sharp[~s.mask])


def test_sharp_and_global(fixed):
    sharp, glob = fixed[8], fixed[9]
    assert not sharp.mask.any() and np.array_equal(sharp.blurry, sharp.sharp)
    assert sharp.trajectories.shape == (0, synth.TRAJ_POINTS, 2)
    assert glob.mask.all() and np.all(glob.regions == 0)


def test_local_blur_is_real(fixed):
    for s in fixed[:8]:
        assert s.mask.mean() > 0.002
        diff = np.abs(s.blurry - s.sharp).max(axis=2)
        assert diff[s.mask].mean() > 2.0 / 255      # visibly different inside the mask
        assert s.mask.mean() < 1.0


def test_kernels_normalised():
    rng = np.random.default_rng(0)
    kernels = [ind.motion_kernel(rng)[0] for _ in range(12)] + [ind.random_walk_kernel(rng)[0]]
    kernels += [ind.linear_kernel(35.0, 0.3)[0], ind.linear_kernel(5.0, 2.0)[0], ind.disk_kernel(4.5)]
    for k in kernels:
        assert k.ndim == 2 and k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
        assert k.shape[0] <= ind.MAX_SUPPORT
        assert k.min() >= 0 and abs(float(k.sum()) - 1.0) < 1e-5


def test_linear_kernel_geometry():
    """Horizontal 11 px line: one row, ~11 px long, centred; trajectory matches the kernel's moments."""
    k, traj = ind.linear_kernel(11.0, 0.0)
    c = k.shape[0] // 2
    rows = np.flatnonzero(k.sum(axis=1) > 1e-6)
    assert list(rows) == [c]
    cols = np.flatnonzero(k[c] > 0.25 * k[c].max())
    assert len(cols) == 11 and abs(cols.mean() - c) < 1e-6
    assert np.allclose(traj[[0, -1]], [[-5.5, 0.0], [5.5, 0.0]], atol=1e-4)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_trajectory_matches_kernel(seed):
    """The kernel's centroid (offset from its centre) is the time-average of its trajectory (x right, y down)."""
    k, traj = ind.random_walk_kernel(np.random.default_rng(seed))
    c = k.shape[0] // 2
    yy, xx = np.mgrid[:k.shape[0], :k.shape[1]] - c
    centroid = np.array([(k * xx).sum(), (k * yy).sum()])
    assert np.allclose(centroid, traj.mean(axis=0), atol=0.6)


def test_composite_against_convolve2d():
    """Independent reference: ``blurry = conv2d(alpha F, k) + (1 - conv2d(alpha, k)) B`` per channel."""
    rng = np.random.default_rng(7)
    B = rng.random((14, 16, 3))
    F = rng.random((14, 16, 3))
    alpha = np.zeros((14, 16))
    alpha[4:9, 5:11] = 1.0
    alpha[4, 5:11] = 0.5
    k = rng.random((5, 5)) * (rng.random((5, 5)) < 0.6)
    k[0, 4] = 3.0                                   # strongly asymmetric: catches a flipped kernel
    k /= k.sum()
    blurry, sharp = ind.composite(B, F, alpha, k)
    ka = signal.convolve2d(alpha, k, mode="same", boundary="fill")
    for c in range(3):
        ref = signal.convolve2d(alpha * F[..., c], k, mode="same", boundary="fill") + (1 - ka) * B[..., c]
        np.testing.assert_allclose(blurry[..., c], ref, atol=1e-9)
        np.testing.assert_allclose(sharp[..., c], alpha * F[..., c] + (1 - alpha) * B[..., c], atol=1e-12)
    # a point of foreground moves forward along the kernel: delta at (7, 8) lands at (7 + dy, 8 + dx)
    delta = np.zeros((14, 16))
    delta[7, 8] = 1.0
    out, _ = ind.composite(np.zeros((14, 16, 1)), np.ones((14, 16, 1)), delta, k)
    np.testing.assert_allclose(out[5:10, 6:11, 0], k, atol=1e-9)


def test_own_content_only_blur_tells(photos):
    """Own-content objects (F == B) with a delta kernel change nothing: only the blur marks them."""
    rng = np.random.default_rng(3)
    B = photos[0][:40, :40].astype(np.float64) ** ind.GAMMA
    alpha = ind._fill_polygons(ind._shape(rng, 40), 40)
    blurry, sharp = ind.composite(B, B, alpha, np.ones((1, 1)))
    np.testing.assert_allclose(blurry, B, atol=1e-9)
    np.testing.assert_allclose(sharp, B, atol=1e-12)


def test_independent_sample_kinds(photos):
    for kind in ("local", "sharp", "global"):
        s = ind.independent_sample(photos[1], np.random.default_rng(9), 48, kind=kind, other_photos=photos)
        assert s.kind == kind and s.blurry.shape == (48, 48, 3)
    with pytest.raises(ValueError):
        ind.independent_sample(photos[1], np.random.default_rng(9), 48, kind="defocus")
