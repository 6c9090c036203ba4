"""Synthetic local-motion-blur generator (m2ae_infer.data.synth)."""
from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("skimage", reason="the synthetic data generator needs scikit-image: "
                                      "pip install 'm2ae-infer[train]'")
import torch  # noqa: E402

from m2ae_infer.data import synth  # noqa: E402

CROP = 64


def _photo(name: str = "astronaut") -> np.ndarray:
    return synth.load_photo(name)


def _sample(seed: int, kind: str | None = None, photo: str = "astronaut") -> synth.Sample:
    return synth.make_sample(_photo(photo), np.random.default_rng(seed), CROP, kind=kind)


def _fields(s: synth.Sample) -> list:
    return [s.blurry, s.sharp, s.mask, s.trajectory, s.trajectories, s.kind]


def _same(a: synth.Sample, b: synth.Sample) -> bool:
    return all(np.array_equal(x, y) and (not isinstance(x, np.ndarray) or x.dtype == y.dtype)
               for x, y in zip(_fields(a), _fields(b)))


def test_photo_table_and_split():
    assert set(synth.TRAIN_PHOTOS).isdisjoint(synth.HELDOUT_PHOTOS)
    assert set(synth.TRAIN_PHOTOS) | set(synth.HELDOUT_PHOTOS) == set(synth.PHOTOS)
    assert 0.15 <= len(synth.HELDOUT_PHOTOS) / len(synth.PHOTOS) <= 0.3
    assert any(synth.PHOTOS[n].color for n in synth.HELDOUT_PHOTOS)
    data_dir = synth.skimage_data_dir()
    for name, info in synth.PHOTOS.items():
        assert info.name == name and info.source and info.license
        assert (data_dir / info.file).is_file(), f"{info.file} is not bundled in the installed wheel"
        assert info.file not in synth.EXCLUDED_FILES


@pytest.mark.parametrize("name", ["rocket", "camera"])
def test_load_photo(name):
    img = synth.load_photo(name)
    assert img.dtype == np.float32 and img.ndim == 3 and img.shape[2] == 3
    assert 0.0 <= img.min() and img.max() <= 1.0 and img.max() > 0.5
    if not synth.PHOTOS[name].color:
        assert np.array_equal(img[..., 0], img[..., 2])
    img[0, 0] = 0.123                       # a copy: the cache stays untouched
    assert synth.load_photo(name)[0, 0, 0] != np.float32(0.123)
    with pytest.raises(KeyError, match="unknown photo"):
        synth.load_photo("lena")


def test_missing_skimage_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(ImportError, match=r"m2ae-infer\[train\]"):
        synth.skimage_data_dir()


def test_deterministic():
    for kind in (None, "local", "global"):
        assert _same(_sample(11, kind), _sample(11, kind))
    a, b = _sample(11, "local"), _sample(12, "local")
    assert not np.array_equal(a.blurry, b.blurry)


@pytest.mark.parametrize("seed", range(6))
def test_local_sample(seed):
    s = _sample(seed, "local", photo=("astronaut", "coffee", "camera")[seed % 3])
    assert s.kind == "local"
    assert s.blurry.shape == s.sharp.shape == (CROP, CROP, 3)
    assert s.blurry.dtype == s.sharp.dtype == np.float32
    assert s.mask.dtype == bool and s.mask.shape == (CROP, CROP)
    for img in (s.blurry, s.sharp):
        assert 0.0 <= img.min() and img.max() <= 1.0
    assert s.mask.any() and not s.mask.all()
    # static background: bit-identical outside the mask; the blur is inside it
    assert np.array_equal(s.blurry[~s.mask], s.sharp[~s.mask])
    assert not np.array_equal(s.blurry[s.mask], s.sharp[s.mask])
    k = synth.TRAJ_POINTS
    assert s.trajectory.shape == (k, 2) and s.trajectory.dtype == np.float32
    assert s.trajectories.shape[1:] == (k, 2) and 1 <= len(s.trajectories) <= 2
    assert np.array_equal(s.trajectory, s.trajectories[0])
    for traj in s.trajectories:
        assert np.all(traj[k // 2] == 0)          # the sharp image is the mid-exposure frame
        length = synth._polyline_length(traj)
        assert synth.MIN_LENGTH - 1e-3 <= length <= synth.MAX_LENGTH + 1e-3


def test_mask_covers_every_difference():
    s = _sample(3, "local")
    differs = np.any(s.blurry != s.sharp, axis=2)
    assert differs.any() and not np.any(differs & ~s.mask)


def test_mask_is_swept_area_not_region():
    rng = np.random.default_rng(0)
    bg = rng.random((40, 48, 3)).astype(np.float32)
    layer = np.zeros((40, 48, 4), np.float32)
    layer[20:30, 20:30, :3] = 0.5
    layer[20:30, 20:30, 3] = 1.0                       # premultiplied, opaque 10x10 square
    u, v = np.array([5.0, 0.0]), np.zeros(2)            # x from -5 to +5 px over the exposure
    blurry, sharp, regions = synth._render_local(bg, [layer], [(u, v)])
    mask = regions >= 0
    expected = np.zeros((40, 48), bool)
    expected[20:30, 15:35] = True                       # the square swept 5 px either way
    assert np.array_equal(mask, expected)
    assert np.array_equal(sharp[20:30, 20:30], layer[20:30, 20:30, :3])
    assert np.array_equal(sharp[~expected], bg[~expected])
    assert np.all(np.abs(blurry[20:30, 15:20] - bg[20:30, 15:20]) > 0)  # partly covered


def test_sharp_sample():
    s = _sample(0, "sharp")
    assert np.array_equal(s.blurry, s.sharp) and not s.mask.any()
    assert not s.trajectory.any() and s.trajectories.shape == (0, synth.TRAJ_POINTS, 2)


def test_global_sample():
    s = _sample(0, "global")
    assert s.mask.all() and s.trajectories.shape == (1, synth.TRAJ_POINTS, 2)
    assert 0.0 <= s.blurry.min() and s.blurry.max() <= 1.0
    assert np.abs(s.blurry - s.sharp).mean() > 1e-3
    assert synth.MIN_LENGTH - 1e-3 <= synth._polyline_length(s.trajectory) <= synth.MAX_LENGTH + 1e-3


def test_motion_params_exact():
    traj = _sample(4, "local").trajectory.astype(np.float64)
    ux, uy, vx, vy = synth.motion_params(traj)
    t = np.linspace(-1, 1, len(traj))[:, None]
    rebuilt = np.array([ux, uy]) * t + np.array([vx, vy]) * t * t
    np.testing.assert_allclose(rebuilt, -traj, atol=1e-4)


def test_gray_and_small_photos():
    gray = synth.load_photo("text")[..., 0]              # 172 x 448, 2-D
    s = synth.make_sample(gray, np.random.default_rng(0), 200, kind="local")
    assert s.blurry.shape == (200, 200, 3)


def test_dataset_tensors_and_order_independence():
    ds = synth.SyntheticBlurDataset(size=6, seed=7, crop=CROP)
    assert ds.photos == list(synth.TRAIN_PHOTOS)
    later = ds[4]
    fresh = synth.SyntheticBlurDataset(size=6, seed=7, crop=CROP)
    for a, b in zip(later, fresh[4]):
        assert torch.equal(a, b)
    b, s, m, t = ds[0]
    assert b.shape == s.shape == (3, CROP, CROP) and b.dtype == torch.float32
    assert m.shape == (1, CROP, CROP) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert t.shape == (synth.TRAJ_POINTS, 2)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch.blurry.shape == (3, 3, CROP, CROP) and batch.trajectory.shape == (3, synth.TRAJ_POINTS, 2)
    other = synth.SyntheticBlurDataset(size=6, seed=8, crop=CROP)
    assert not torch.equal(other[4].blurry, later.blurry)
    with pytest.raises(IndexError):
        ds[6]


def test_training_dataset_never_uses_heldout():
    with pytest.raises(ValueError, match="held-out"):
        synth.SyntheticBlurDataset(photos=["astronaut", synth.HELDOUT_PHOTOS[0]], size=4, crop=CROP)
    ds = synth.SyntheticBlurDataset(size=4, crop=CROP)
    heldout = [synth._cached_photo(n) for n in synth.HELDOUT_PHOTOS]
    assert not any(img is h for img in ds.images for h in heldout)


def test_heldout_set():
    a = synth.heldout_set(10, crop=CROP)
    b = synth.heldout_set(10, crop=CROP)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert [s.kind for s in a] == ["local"] * 8 + ["sharp", "global"]
    for s in a:
        assert np.array_equal(s.blurry[~s.mask], s.sharp[~s.mask])


@pytest.mark.parametrize("kind", ["local", "sharp"])
def test_defocus_is_static_and_outside_the_mask(kind):
    photo = synth.load_photo("astronaut")
    plain = synth.make_sample(photo, np.random.default_rng(3), CROP, kind=kind)
    again = synth.make_sample(photo, np.random.default_rng(3), CROP, kind=kind, p_defocus=0.0)
    assert _same(plain, again)                         # p_defocus=0 draws nothing: old samples unchanged
    soft = synth.make_sample(photo, np.random.default_rng(3), CROP, kind=kind, p_defocus=1.0)
    assert np.array_equal(soft.blurry[~soft.mask], soft.sharp[~soft.mask])   # defocus is in the target too
    # the background (same crop: drawn before the defocus) loses detail where neither sample has an object
    static = ~(soft.mask | plain.mask)
    pairs = static[:, 1:] & static[:, :-1]
    detail = lambda img: np.abs(np.diff(img, axis=1))[pairs].mean()   # noqa: E731
    assert detail(soft.sharp) < detail(plain.sharp)


def test_validation_set_uses_training_photos_only(monkeypatch):
    asked = []
    real = synth._cached_photo
    monkeypatch.setattr(synth, "_cached_photo", lambda name: asked.append(name) or real(name))
    v = synth.validation_set(10, crop=CROP)
    assert asked and set(asked) <= set(synth.TRAIN_PHOTOS) and not set(asked) & set(synth.HELDOUT_PHOTOS)
    assert [s.kind for s in v] == ["local"] * 8 + ["sharp", "global"]
    assert all(_same(x, y) for x, y in zip(v, synth.validation_set(10, crop=CROP)))
    with pytest.raises(ValueError, match="1000"):
        synth.validation_set(1, seed=0)          # would collide with training seeds


def test_training_photos_and_dev_validation(monkeypatch):
    assert synth.training_photos() == synth.TRAIN_PHOTOS
    assert set(synth.training_photos(["coffee", "camera"])) == set(synth.TRAIN_PHOTOS) - {"coffee", "camera"}
    for bad, match in ((["lena"], "unknown"), (["chelsea"], "held out"), (list(synth.TRAIN_PHOTOS), "every")):
        with pytest.raises(ValueError, match=match):
            synth.training_photos(bad)
    asked = []
    real = synth._cached_photo
    monkeypatch.setattr(synth, "_cached_photo", lambda name: asked.append(name) or real(name))
    dev = synth.validation_set(4, crop=CROP, photos=["camera"])
    assert set(asked) == {"camera"}
    # camera is a gray photo and objects are cut from the same photos: every pixel has R == G == B
    assert all(np.array_equal(s.blurry[..., 0], s.blurry[..., 2]) for s in dev)
    assert not all(np.array_equal(s.blurry[..., 0], s.blurry[..., 2]) for s in synth.validation_set(4, crop=CROP))
    with pytest.raises(ValueError, match="held out"):
        synth.validation_set(1, crop=CROP, photos=["coins"])


@pytest.mark.parametrize("kind", ["local", "sharp", "global"])
def test_region_labels_cover_exactly_the_mask(kind):
    rng = np.random.default_rng(7)
    s = synth.make_sample(np.random.default_rng(0).random((80, 80, 3), dtype=np.float32), rng, crop=64, kind=kind)
    assert s.regions.shape == s.mask.shape and s.regions.dtype == np.int8
    assert np.array_equal(s.regions >= 0, s.mask)
    assert s.regions.max() < max(len(s.trajectories), 1)
