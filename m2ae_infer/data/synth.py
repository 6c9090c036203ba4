"""Synthetic local motion blur on real photographs bundled with scikit-image (network v1's data, docs/model_card_v1.md).

A sample is built from a random crop of a photo (the static background) and 1-2 soft-edged object
regions (ellipse, smooth random blob, or an image segment) whose pixels are cut from another crop.
Each region moves along its own trajectory (straight or quadratic, 3-40 px); the blurry image is the
average, in linear light, of densely sampled sub-frames; the sharp image is the sub-frame at mid-exposure.
Outside the blur mask (the union of the regions' alpha over all sub-frames) blurry == sharp bit-exactly.
Some samples are fully sharp, some globally blurred (camera motion). Everything is drawn from the
``np.random.Generator`` passed in, so a seed fixes the sample byte for byte.

Trajectory convention: ``trajectory[k] = (dx, dy)``, the forward displacement in pixels of the moving
content at time ``t_k`` (``K`` instants evenly in ``[-1, 1]``) relative to its position in the sharp image,
so ``trajectory[K // 2] == 0``. It is exactly quadratic, ``d(t) = u t + v t^2``: ``motion_params`` gives
``(u, v)`` in the gather convention of ``m2ae_infer.model.motion.reblur`` (``d = -trajectory``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

KINDS = ("local", "sharp", "global")
TRAJ_POINTS = 15            # K points returned per trajectory (matches M2AEConfig.motion_points)
MIN_LENGTH, MAX_LENGTH = 3.0, 40.0
ALPHA_EPS = 0.01            # sub-frame alpha below this is cut to 0: the mask is where any alpha > eps
GAMMA = 2.2                 # sub-frames are averaged in linear light (x ** GAMMA)
_INSTALL_HINT = ('the synthetic blur generator needs scikit-image (which brings scipy): '
                 'pip install "m2ae-infer[train]"')


@dataclass(frozen=True)
class PhotoInfo:
    name: str
    file: str       # file name in the installed ``skimage/data`` folder (shipped inside the wheel)
    color: bool     # False: gray photo, replicated to RGB
    source: str
    license: str


PHOTOS: dict[str, PhotoInfo] = {p.name: p for p in (
    PhotoInfo("astronaut", "astronaut.png", True, "NASA Great Images (Eileen Collins)", "public domain"),
    PhotoInfo("chelsea", "chelsea.png", True, "Stefan van der Walt (Chelsea the cat)", "CC0"),
    PhotoInfo("coffee", "coffee.png", True, "Rachel Michetti / Pikolo Espresso Bar", "CC0"),
    PhotoInfo("rocket", "rocket.jpg", True, "SpaceX Photos (DSCOVR launch, Falcon 9)", "public domain"),
    PhotoInfo("hubble_deep_field", "hubble_deep_field.jpg", True, "NASA / HubbleSite (XDF)", "public domain"),
    PhotoInfo("retina", "retina.jpg", True, "Wikimedia Commons (Mikael Haggstrom), fundus photo", "CC0 1.0"),
    PhotoInfo("immunohistochemistry", "ihc.png", True, "CMMI, IHC microscopy",
              "no known copyright restrictions"),
    PhotoInfo("camera", "camera.png", False, "Lav Varshney (photographer)", "CC0"),
    PhotoInfo("coins", "coins.png", False, "Brooklyn Museum Collection (Greek coins from Pompeii)",
              "no known copyright restrictions"),
    PhotoInfo("brick", "brick.png", False, "CC0Textures Bricks25 (perspective-corrected, gray)", "CC0"),
    PhotoInfo("grass", "grass.png", False, "DeviantArt linolafett Grass-01 (crop, gray)", "CC0"),
    PhotoInfo("gravel", "gravel.png", False, "CC0Textures Gravel04 (crop, gray)", "CC0"),
    PhotoInfo("text", "text.png", False, "Wikipedia File:Corner.png", "public domain"),
    PhotoInfo("cell", "cell.png", False, "Mueller et al. 2018, quantitative phase image", "CC0"),
)}

# Fixed once, by name (~21 %, two colour photos among them). Never train on these.
HELDOUT_PHOTOS: tuple[str, ...] = ("chelsea", "rocket", "coins")
TRAIN_PHOTOS: tuple[str, ...] = tuple(n for n in PHOTOS if n not in HELDOUT_PHOTOS)

# Bundled image files deliberately left out (documentation only).
EXCLUDED_FILES: dict[str, str] = {
    "clock_motion.png": "already motion-blurred, no sharp ground truth",
    "motorcycle_left.png": "Middlebury 2014 stereo; license not stated by scikit-image",
    "motorcycle_right.png": "Middlebury 2014 stereo; license not stated by scikit-image",
    "moon.png": "source and license not stated", "page.png": "source and license not stated",
    "microaneurysms.png": "102x102, smaller than a training crop",
    "horse.png": "drawing", "phantom.png": "synthetic", "color.png": "synthetic",
    "logo.png": "synthetic", "chessboard_GRAY.png": "synthetic", "chessboard_RGB.png": "synthetic",
}


def _ndimage():
    try:
        from scipy import ndimage
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return ndimage


def skimage_data_dir() -> Path:
    """The installed ``skimage/data`` folder (the photos are read from disk; nothing is downloaded)."""
    try:
        import skimage
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return Path(skimage.__file__).resolve().parent / "data"


@functools.lru_cache(maxsize=None)
def _cached_photo(name: str) -> np.ndarray:
    if name not in PHOTOS:
        raise KeyError(f"unknown photo {name!r}; known: {', '.join(PHOTOS)}")
    path = skimage_data_dir() / PHOTOS[name].file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this scikit-image install does not bundle it")
    from PIL import Image
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / np.float32(255.0)
    arr.setflags(write=False)
    return arr


def load_photo(name: str) -> np.ndarray:
    """Photo ``name`` (a key of ``PHOTOS``) as float32 ``[H, W, 3]`` RGB in ``[0, 1]`` (gray replicated)."""
    return _cached_photo(name).copy()


@dataclass
class Sample:
    blurry: np.ndarray        # float32 [H, W, 3] in [0, 1]
    sharp: np.ndarray         # float32 [H, W, 3] in [0, 1]
    mask: np.ndarray          # bool [H, W]: union of the moving content over the exposure
    trajectory: np.ndarray    # float32 [K, 2] (dx, dy) of the first moving region (zeros if sharp)
    kind: str                 # "local" | "sharp" | "global"
    trajectories: np.ndarray  # float32 [R, K, 2], one per moving region (R = 0 if sharp)
    regions: np.ndarray       # int8 [H, W]: index into ``trajectories`` of the region whose motion covers
                              # each pixel (later regions on top), -1 where nothing moves


def motion_params(trajectory: np.ndarray) -> np.ndarray:
    """``(u_x, u_y, v_x, v_y)`` with ``-trajectory(t) = u t + v t^2`` (the network's gather convention)."""
    t = np.linspace(-1.0, 1.0, len(trajectory))
    basis = np.stack([t, t * t], axis=1)
    coef, *_ = np.linalg.lstsq(basis, -np.asarray(trajectory, np.float64), rcond=None)
    return coef.reshape(-1).astype(np.float32)


def _trajectory_coeffs(rng: np.random.Generator, points: int,
                       length: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``u, v`` of ``d(t) = u t + v t^2`` whose K-point polyline is 3-40 px long (``length``, when given); half
    are straight."""
    # Log-uniform: as many 3-10 px blurs as 10-40 px ones (uniform lengths put 80 % of samples above 10 px,
    # beyond what a network with a ~30 px receptive field can undo, and training stalled on them).
    if length is None:
        length = float(np.exp(rng.uniform(np.log(MIN_LENGTH), np.log(MAX_LENGTH))))
    theta = rng.uniform(0.0, 2.0 * np.pi)
    bend = rng.uniform(-0.5, 0.5) if rng.random() < 0.5 else 0.0   # sagitta / chord
    u = 0.5 * np.array([np.cos(theta), np.sin(theta)])
    v = bend * np.array([-np.sin(theta), np.cos(theta)])
    scale = length / _polyline_length(_trajectory(u, v, points))
    return u * scale, v * scale


def _trajectory(u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(-1.0, 1.0, n)[:, None]
    return u[None] * t + v[None] * t * t


def _polyline_length(traj: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(traj, axis=0), axis=1).sum())


def _subframes(u: np.ndarray, v: np.ndarray) -> int:
    """Odd number of sub-frames, about 2 per pixel of travel (no ghosting), mid-exposure included."""
    n = max(15, int(np.ceil(2.0 * _polyline_length(_trajectory(u, v, 64)))) + 1)
    return n | 1


def _random_crop(img: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    if h < crop or w < crop:
        img = np.pad(img, ((0, max(0, crop - h)), (0, max(0, crop - w)), (0, 0)), mode="symmetric")
        h, w = img.shape[:2]
    y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    out = img[y:y + crop, x:x + crop]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1]
    return np.ascontiguousarray(out, dtype=np.float32)


def _textured_crop(img: np.ndarray, crop: int, rng: np.random.Generator, tries: int = 4) -> np.ndarray:
    """The most textured of ``tries`` random crops (mean absolute gradient): a flat object (sky, a black
    Hubble background) moving over a flat background leaves no visible blur, and labelling it blurred
    teaches the mask head noise."""
    crops = [_random_crop(img, crop, rng) for _ in range(tries)]
    energy = [np.abs(np.diff(c, axis=0)).mean() + np.abs(np.diff(c, axis=1)).mean() for c in crops]
    return crops[int(np.argmax(energy))]


def _ellipse(rng: np.random.Generator, n: int) -> np.ndarray:
    cy, cx = rng.uniform(0.2, 0.8, 2) * n
    a, b = rng.uniform(0.08, 0.3, 2) * n
    th = rng.uniform(0.0, np.pi)
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    xr = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
    yr = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
    return (xr / a) ** 2 + (yr / b) ** 2 <= 1.0


def _blob(rng: np.random.Generator, n: int, nd) -> np.ndarray:
    """Smooth random shape: a Gaussian bump perturbed by low-pass noise, thresholded, one component."""
    cy, cx = rng.uniform(0.25, 0.75, 2) * n
    s = rng.uniform(0.1, 0.22) * n
    noise = nd.gaussian_filter(rng.standard_normal((n, n)), sigma=rng.uniform(0.04, 0.1) * n, mode="wrap")
    noise /= noise.std() + 1e-12
    yy, xx = np.mgrid[:n, :n].astype(np.float64)
    field = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * s * s)) * (1.0 + 0.4 * noise)
    labels, count = nd.label(field > 0.5)
    if count == 0:
        return _ellipse(rng, n)
    keep = labels[int(cy), int(cx)] or 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    return labels == keep


def _segment(rng: np.random.Generator, src: np.ndarray, nd) -> np.ndarray:
    """A Felzenszwalb segment of the source crop covering 3-30 % of it (ellipse if there is none)."""
    from skimage.segmentation import felzenszwalb
    n = src.shape[0]
    labels = felzenszwalb(src, scale=float(rng.uniform(100, 400)), sigma=0.8, min_size=n * n // 100)
    frac = np.bincount(labels.ravel()) / float(n * n)
    cand = np.flatnonzero((frac > 0.03) & (frac < 0.3))
    if cand.size == 0:
        return _ellipse(rng, n)
    return nd.binary_fill_holes(labels == cand[rng.integers(cand.size)])


def _defocus(bg: np.ndarray, rng: np.random.Generator, nd) -> np.ndarray:
    """``bg`` with a static, *defocused* region (Gaussian blur, sigma 1-4 px, soft edge over a large blob, or
    the whole crop): blur that is not motion. It stays in the sharp target and outside the mask, so the mask
    head learns that smooth or out-of-focus content is not to be restored (real photos have bokeh)."""
    n = bg.shape[0]
    sigma = float(rng.uniform(1.0, 4.0))
    soft = np.stack([nd.gaussian_filter(bg[..., c], sigma, mode="reflect") for c in range(3)], axis=2)
    if rng.random() < 0.3:
        return soft.astype(np.float32)
    region = _blob(rng, n, nd) | _ellipse(rng, n)
    alpha = nd.gaussian_filter(region.astype(np.float32), sigma=2.0)[..., None]
    return (alpha * soft + (1.0 - alpha) * bg).astype(np.float32)


def _object_layer(rng: np.random.Generator, src: np.ndarray, nd) -> np.ndarray:
    """Premultiplied linear RGB + soft alpha ``[n, n, 4]`` of one object cut from ``src`` (linear)."""
    n = src.shape[0]
    shape = rng.choice(3, p=[0.35, 0.35, 0.3])
    hard = _ellipse(rng, n) if shape == 0 else _blob(rng, n, nd) if shape == 1 else _segment(rng, src, nd)
    alpha = nd.gaussian_filter(hard.astype(np.float32), sigma=rng.uniform(0.4, 1.2))
    return np.concatenate([src * alpha[..., None], alpha[..., None]], axis=2).astype(np.float32)


def _shift(padded: np.ndarray, pad: int, dx: float, dy: float, h: int, w: int) -> np.ndarray:
    """Bilinear sub-pixel shift: ``out[y, x] = img[y - dy, x - dx]`` read from ``img`` padded by ``pad``."""
    sy, sx = -dy, -dx
    y0, x0 = int(np.floor(sy)), int(np.floor(sx))
    wy, wx = np.float32(sy - y0), np.float32(sx - x0)
    ys, xs = pad + y0, pad + x0
    top = padded[ys:ys + h, xs:xs + w] * (1 - wx) + padded[ys:ys + h, xs + 1:xs + 1 + w] * wx
    bot = padded[ys + 1:ys + 1 + h, xs:xs + w] * (1 - wx) + padded[ys + 1:ys + 1 + h, xs + 1:xs + 1 + w] * wx
    return top * (1 - wy) + bot * wy


def _render_local(bg: np.ndarray, layers: list[np.ndarray], coeffs: list, frames: int | None = None):
    """``(blurry, sharp, regions)``: the layers moving over ``bg``, averaged over sub-frames (about 2 per pixel of
    travel: a smooth smear), or over ``frames`` positions only (odd: a video's consecutive frames averaged, whose
    movers leave separate copies where they move fast), the middle one the sharp frame."""
    h, w = bg.shape[:2]
    n_sub = frames if frames is not None else max(_subframes(u, v) for u, v in coeffs)
    paths = [_trajectory(u, v, n_sub) for u, v in coeffs]
    pad = int(np.ceil(max(np.abs(p).max() for p in paths))) + 2
    padded = [np.pad(layer, ((pad, pad), (pad, pad), (0, 0))) for layer in layers]
    acc = np.zeros_like(bg, dtype=np.float64)
    regions = np.full((h, w), -1, dtype=np.int8)
    sharp = bg
    for k in range(n_sub):
        frame = bg
        for r, (layer, lp, path) in enumerate(zip(layers, padded, paths)):
            moved = layer if k == n_sub // 2 else _shift(lp, pad, path[k][0], path[k][1], h, w)
            on = moved[..., 3] > ALPHA_EPS
            regions[on] = np.maximum(regions[on], r)
            a = np.where(on, moved[..., 3], np.float32(0.0))[..., None]
            frame = frame * (1 - a) + moved[..., :3] * on[..., None]
        acc += frame
        if k == n_sub // 2:
            sharp = frame
    return (acc / n_sub).astype(np.float32), sharp.astype(np.float32), regions


def _render_global(bg: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    h, w = bg.shape[:2]
    path = _trajectory(u, v, _subframes(u, v))
    pad = int(np.ceil(np.abs(path).max())) + 2
    padded = np.pad(bg, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")   # reflect borders
    acc = np.zeros_like(bg, dtype=np.float64)
    for dx, dy in path:
        acc += _shift(padded, pad, dx, dy, h, w)
    return (acc / len(path)).astype(np.float32)


def _to_display(lin: np.ndarray) -> np.ndarray:
    return np.clip(lin, 0.0, 1.0) ** np.float32(1.0 / GAMMA)


def _as_rgb(photo: np.ndarray) -> np.ndarray:
    photo = np.asarray(photo, dtype=np.float32)
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    if photo.ndim != 3 or photo.shape[2] != 3:
        raise ValueError(f"photo must be [H, W, 3] or [H, W], got shape {photo.shape}")
    return photo


def make_sample(photo: np.ndarray, rng: np.random.Generator, crop: int = 128, *,
                object_photos: Sequence[np.ndarray] | None = None, p_local: float = 0.8,
                p_sharp: float = 0.1, kind: str | None = None, max_regions: int = 2,
                points: int = TRAJ_POINTS, p_defocus: float = 0.0) -> Sample:
    """One sample from a random ``crop x crop`` window of ``photo`` (float ``[H, W, 3]`` in ``[0, 1]``).

    ``kind`` is drawn as local / sharp / global with ``p_local`` / ``p_sharp`` / the rest unless given.
    Object content is cut from a random crop of a random photo of ``object_photos`` (default: ``photo``).
    With probability ``p_defocus`` a local or sharp sample's static background gets a defocused region
    (:func:`_defocus`); at the default 0 no random number is drawn for it, so samples stay as they were.
    """
    nd = _ndimage()
    bg = _random_crop(_as_rgb(photo), crop, rng)
    if kind is None:
        r = rng.random()
        kind = "local" if r < p_local else "sharp" if r < p_local + p_sharp else "global"
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if p_defocus > 0 and kind != "global" and rng.random() < p_defocus:
        bg = _defocus(bg, rng, nd)
    if kind == "sharp":
        empty = np.zeros((0, points, 2), np.float32)
        return Sample(bg, bg.copy(), np.zeros((crop, crop), bool), np.zeros((points, 2), np.float32),
                      kind, empty, np.full((crop, crop), -1, np.int8))
    bg_lin = bg ** np.float32(GAMMA)
    if kind == "global":
        u, v = _trajectory_coeffs(rng, points)
        blurry = _to_display(_render_global(bg_lin, u, v))
        traj = _trajectory(u, v, points).astype(np.float32)
        return Sample(blurry, bg.copy(), np.ones((crop, crop), bool), traj, kind, traj[None],
                      np.zeros((crop, crop), np.int8))
    sources = [_as_rgb(p) for p in object_photos] if object_photos else [_as_rgb(photo)]
    layers, coeffs = [], []
    for _ in range(int(rng.integers(1, max_regions + 1))):
        src = _textured_crop(sources[int(rng.integers(len(sources)))], crop, rng) ** np.float32(GAMMA)
        layers.append(_object_layer(rng, src, nd))
        coeffs.append(_trajectory_coeffs(rng, points))
    blurry_lin, sharp_lin, regions = _render_local(bg_lin, layers, coeffs)
    mask = regions >= 0
    blurry, sharp = _to_display(blurry_lin), _to_display(sharp_lin)
    blurry[~mask] = bg[~mask]       # no moving content there: the static background, bit for bit
    sharp[~mask] = bg[~mask]
    trajs = np.stack([_trajectory(u, v, points) for u, v in coeffs]).astype(np.float32)
    return Sample(blurry, sharp, mask, trajs[0], kind, trajs, regions)


class SampleTensors(NamedTuple):
    blurry: torch.Tensor       # [3, H, W]
    sharp: torch.Tensor        # [3, H, W]
    mask: torch.Tensor         # [1, H, W] float 0/1
    trajectory: torch.Tensor   # [K, 2]


def to_tensors(sample: Sample) -> SampleTensors:
    chw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))  # noqa: E731
    return SampleTensors(chw(sample.blurry), chw(sample.sharp),
                         torch.from_numpy(sample.mask[None].astype(np.float32)),
                         torch.from_numpy(np.ascontiguousarray(sample.trajectory)))


class SyntheticBlurDataset(Dataset):
    """``size`` samples on ``photos``; sample ``i`` comes from ``np.random.default_rng([seed, i])``, so it
    does not depend on worker order. Held-out photos are refused unless ``allow_heldout=True``.
    Extra keyword arguments go to ``make_sample``."""

    def __init__(self, photos: Sequence[str] = TRAIN_PHOTOS, size: int = 10_000, seed: int = 0,
                 crop: int = 128, *, allow_heldout: bool = False, **sample_kwargs):
        photos = list(photos)
        leaked = [p for p in photos if p in HELDOUT_PHOTOS]
        if leaked and not allow_heldout:
            raise ValueError(f"held-out photos {leaked} must not be used for training")
        if not photos or size < 1 or seed < 0 or crop < 8:
            raise ValueError("need at least one photo, size >= 1, seed >= 0 and crop >= 8")
        self.photos, self.size, self.seed, self.crop = photos, size, seed, crop
        self.sample_kwargs = sample_kwargs
        self.images = [_cached_photo(p) for p in photos]

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> Sample:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        rng = np.random.default_rng([self.seed, index])
        photo = self.images[int(rng.integers(len(self.images)))]
        return make_sample(photo, rng, self.crop, object_photos=self.images, **self.sample_kwargs)

    def __getitem__(self, index: int) -> SampleTensors:
        return to_tensors(self.sample(index))


def _fixed_set(photos: Sequence[str], n: int, seed: int, crop: int, **sample_kwargs) -> list[Sample]:
    images = [_cached_photo(p) for p in photos]
    out = []
    for i in range(n):
        kind = {8: "sharp", 9: "global"}.get(i % 10, "local")
        rng = np.random.default_rng([seed, i])
        out.append(make_sample(images[i % len(images)], rng, crop, object_photos=images, kind=kind,
                               **sample_kwargs))
    return out


def heldout_set(n: int, seed: int = 1234, crop: int = 256, **sample_kwargs) -> list[Sample]:
    """``n`` fixed evaluation samples on ``HELDOUT_PHOTOS`` only (objects cut from them too).

    Sample ``i`` uses photo ``i mod 3`` and ``default_rng([seed, i])``; of every 10, 8 are local,
    1 sharp (``i % 10 == 8``) and 1 global (``i % 10 == 9``).
    """
    return _fixed_set(HELDOUT_PHOTOS, n, seed, crop, **sample_kwargs)


# Seed of the validation set; the training pool draws its samples from default_rng([train_seed, i]) with
# small train seeds (0 by default), so these are new crops, objects and trajectories.
VALIDATION_SEED = 4242


def training_photos(exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """``TRAIN_PHOTOS`` without ``exclude``: the photos a run trains on when some training photos are kept
    aside as *dev* photos (see :func:`validation_set`). Unknown or held-out names, or excluding every
    training photo, are a ``ValueError``."""
    check_training_photos(exclude, "excluded")
    excluded = set(exclude)
    kept = tuple(p for p in TRAIN_PHOTOS if p not in excluded)
    if not kept:
        raise ValueError("cannot exclude every training photo")
    return kept


def photo_names(text: str) -> list[str]:
    """A comma-separated option value (``"coffee, camera"``) -> ``["coffee", "camera"]``."""
    return [n.strip() for n in text.split(",") if n.strip()]


def check_training_photos(names: Sequence[str], what: str) -> None:
    """``ValueError`` naming any of ``names`` that is unknown or held out (``what`` says what they are for)."""
    unknown = [n for n in names if n not in PHOTOS]
    if unknown:
        raise ValueError(f"unknown photo(s) {', '.join(unknown)}; training photos: {', '.join(TRAIN_PHOTOS)}")
    heldout = [n for n in names if n in HELDOUT_PHOTOS]
    if heldout:
        raise ValueError(f"{', '.join(heldout)} {'is' if len(heldout) == 1 else 'are'} held out, not training "
                         f"photo(s): only training photos can be {what}")


def validation_set(n: int, seed: int = VALIDATION_SEED, crop: int = 256, photos: Sequence[str] | None = None,
                   **sample_kwargs) -> list[Sample]:
    """``n`` fixed samples on the *training* photos, made like :func:`heldout_set` (photo ``i mod len(photos)``):
    for choosing settings such as the mask threshold without ever looking at the held-out photos.

    ``photos``: a subset of the training photos (default all). Samples on photos a run did not train on
    (``m2ae-train --exclude-photos``) measure how a setting generalizes to *unseen* photos, which samples on
    its own training photos cannot: the mask head scored IoU 0.56 on those and 0.37 on the held-out photos."""
    if seed < 1000:
        raise ValueError(f"validation seeds start at 1000 (training runs use small seeds), got {seed}")
    photos = TRAIN_PHOTOS if photos is None else tuple(photos)
    check_training_photos(photos, "validation photos")
    if not photos:
        raise ValueError("validation_set needs at least one photo")
    return _fixed_set(photos, n, seed, crop, **sample_kwargs)
