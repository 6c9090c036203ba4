"""Training scenes v2: samples that teach motion blur apart from everything that is not (docs/model_card.md, Data).

The v1 generator (:mod:`m2ae_infer.data.synth`) pastes a *foreign* texture into the photo and smears it: a
detector trained on it partly learned "a pasted texture with smeared edges" and flagged low-texture areas,
bokeh and clouds on real photos. Here:

* **Positives carry the scene's own content** (``own`` movers): a region of the photo itself (a segment, a
  real object silhouette from a cut-out's alpha, or a polygon) moves along its trajectory over the same photo,
  so nothing but the blur tells it apart. Also real cut-out objects with exact alpha (tuxpaint stamps) and, less
  often, foreign crops; straight and curved trajectories; global camera shake.
* **Negatives** are what real photos hold and must not be flagged: fully sharp crops, low-texture crops (sky,
  walls), defocus with Gaussian *and* disk (bokeh) kernels over regions or the whole crop, and
  camera/encoding artefacts -- sensor noise, JPEG at low quality, down- then up-scaling (video frames) --
  applied to *every* kind, identically to blurry and sharp, so they never correlate with the label.
* **Frame-averaged movers** (``ghost_share`` of the local samples, off by default): the movers are averaged over
  3-11 positions instead of a smooth sub-frame sweep, 1.5-10 px apart, as a video's consecutive frames averaged
  show them (the real-motion sets of ``m2ae-eval`` are made so): separate copies where an object moves fast. The
  smooth generator never shows that, so a detector learned it from the one training video only.
* **The label is visible motion blur**: the generator's union of moving alpha, kept only where the sub-frame
  average differs visibly from the sharp frame (grown a little): a region moving over identical content
  leaves no blur to see and is not labelled.

Every draw comes from the ``np.random.Generator`` passed in; a seed fixes the sample byte for byte.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from .synth import (GAMMA, Sample, _as_rgb, _blob, _ellipse, _ndimage, _random_crop, _render_global,
                    _render_local, _segment, _to_display, _trajectory, _trajectory_coeffs, TRAJ_POINTS)

KIND_WEIGHTS = {"local": 0.5, "sharp": 0.38, "global": 0.12}
MOVERS = {"own": 0.45, "cutout": 0.35, "foreign": 0.2}
VISIBLE = 2.0 / 255.0      # |blurry - sharp| above this (any channel) is visible blur
VISIBLE_GROW = 3           # ... grown by this many pixels (the label covers the smear's faint tails)
MIN_LABEL = 24             # a local sample whose visible blur is smaller than this many pixels is redrawn
GHOST_FRAMES = (3, 5, 7, 9, 11)    # frame-averaged movers: positions averaged ...
GHOST_STEP = (1.5, 10.0)           # ... and the pixels between two of them (log-uniform)


def scene_sample(photos: Sequence[np.ndarray], rng: np.random.Generator, crop: int = 256, *,
                 cutouts: Sequence[np.ndarray] = (), kind: str | None = None,
                 points: int = TRAJ_POINTS, degrade: bool = True, ghost_share: float = 0.0) -> Sample:
    """One training sample from a random photo of ``photos`` (float ``[H, W, 3]`` in ``[0, 1]``).

    ``cutouts``: RGBA float ``[h, w, 4]`` objects with exact alpha (may be empty: other movers are used).
    ``kind``: ``local`` / ``sharp`` / ``global``, drawn with :data:`KIND_WEIGHTS` when None.
    ``ghost_share``: the share of local samples whose movers are frame-averaged (module docstring); at 0 the
    stream of draws is the one before the option existed.
    """
    nd = _ndimage()
    if kind is None:
        kind = str(rng.choice(list(KIND_WEIGHTS), p=list(KIND_WEIGHTS.values())))
    photo = _as_rgb(photos[int(rng.integers(len(photos)))])
    bg = _scaled_crop(photo, crop, rng)
    if kind != "global" and rng.random() < 0.3:
        bg = _defocus_v2(bg, rng, nd)
    empty = np.zeros((0, points, 2), np.float32)
    if kind == "sharp":
        if rng.random() < 0.25:      # low-texture crops: the v1 head flagged flat areas
            bg = _flat_crop(photo, crop, rng)
        sample = Sample(bg, bg.copy(), np.zeros((crop, crop), bool), np.zeros((points, 2), np.float32),
                        kind, empty, np.full((crop, crop), -1, np.int8))
    elif kind == "global":
        u, v = _trajectory_coeffs(rng, points)
        blurry = _to_display(_render_global(bg ** np.float32(GAMMA), u, v))
        traj = _trajectory(u, v, points).astype(np.float32)
        sample = Sample(blurry, bg.copy(), np.ones((crop, crop), bool), traj, kind, traj[None],
                        np.zeros((crop, crop), np.int8))
    else:
        frames = int(rng.choice(GHOST_FRAMES)) if ghost_share and rng.random() < ghost_share else None
        sample = _local(bg, photos, cutouts, rng, nd, points, frames)
    return _degrade(sample, rng) if degrade else sample


def _local(bg, photos, cutouts, rng, nd, points, frames: int | None = None) -> Sample:
    crop = bg.shape[0]
    bg_lin = bg ** np.float32(GAMMA)
    for _ in range(4):       # redraw when the motion left (almost) nothing visible
        layers, coeffs = [], []
        for _ in range(int(rng.integers(1, 3))):
            layers.append(_mover(bg_lin, photos, cutouts, rng, nd))
            length = None if frames is None else (frames - 1) * float(np.exp(rng.uniform(*np.log(GHOST_STEP))))
            coeffs.append(_trajectory_coeffs(rng, points, length))
        blurry_lin, sharp_lin, regions = _render_local(bg_lin, layers, coeffs, frames)
        blurry, sharp = _to_display(blurry_lin), _to_display(sharp_lin)
        moved = regions >= 0
        visible = np.abs(blurry - sharp).max(axis=2) > VISIBLE
        mask = moved & nd.binary_dilation(visible, iterations=VISIBLE_GROW)
        if mask.sum() >= MIN_LABEL:
            break
    blurry[~mask] = bg[~mask]        # no visible motion there: the static background, bit for bit
    sharp[~mask] = bg[~mask]
    regions = np.where(mask, regions, -1).astype(np.int8)
    trajs = np.stack([_trajectory(u, v, points) for u, v in coeffs]).astype(np.float32)
    return Sample(blurry, sharp, mask, trajs[0], "local", trajs, regions)


def _mover(bg_lin: np.ndarray, photos, cutouts, rng, nd) -> np.ndarray:
    """Premultiplied linear RGB + alpha ``[n, n, 4]`` of one moving object."""
    n = bg_lin.shape[0]
    kinds = [k for k in MOVERS if k != "cutout" or len(cutouts)]
    p = np.array([MOVERS[k] for k in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    if kind == "cutout":
        rgba = _place_cutout(cutouts[int(rng.integers(len(cutouts)))], n, rng)
        if rng.random() < 0.5:       # the object's silhouette, filled with the scene's own content
            return np.concatenate([bg_lin * rgba[..., 3:], rgba[..., 3:]], axis=2).astype(np.float32)
        lin = rgba[..., :3] ** np.float32(GAMMA)
        return np.concatenate([lin * rgba[..., 3:], rgba[..., 3:]], axis=2).astype(np.float32)
    src = bg_lin if kind == "own" else _scaled_crop(_as_rgb(photos[int(rng.integers(len(photos)))]), n,
                                                    rng) ** np.float32(GAMMA)
    shape = int(rng.choice(4, p=[0.35, 0.25, 0.25, 0.15]))
    hard = (_segment(rng, src ** np.float32(1 / GAMMA), nd) if shape == 0 else _polygon(rng, n) if shape == 1
            else _blob(rng, n, nd) if shape == 2 else _ellipse(rng, n))
    alpha = nd.gaussian_filter(hard.astype(np.float32), sigma=rng.uniform(0.4, 1.2))
    return np.concatenate([src * alpha[..., None], alpha[..., None]], axis=2).astype(np.float32)


def _place_cutout(rgba: np.ndarray, n: int, rng) -> np.ndarray:
    """A cut-out scaled to 20-70 % of the crop, at a random place (may hang over the border)."""
    from PIL import Image
    h, w = rgba.shape[:2]
    scale = rng.uniform(0.2, 0.7) * n / max(h, w)
    size = (max(4, int(w * scale)), max(4, int(h * scale)))
    im = Image.fromarray((np.clip(rgba, 0, 1) * 255).round().astype(np.uint8), "RGBA").resize(size, Image.LANCZOS)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    small = np.asarray(im, np.float32) / 255.0
    out = np.zeros((n, n, 4), np.float32)
    y, x = int(rng.integers(-size[1] // 4, n - 3 * size[1] // 4 + 1)), int(rng.integers(-size[0] // 4, n - 3 * size[0] // 4 + 1))
    ys, xs = slice(max(y, 0), min(y + size[1], n)), slice(max(x, 0), min(x + size[0], n))
    out[ys, xs] = small[ys.start - y:ys.stop - y, xs.start - x:xs.stop - x]
    return out


def _polygon(rng, n: int) -> np.ndarray:
    """A random star-shaped polygon (5-12 vertices) covering 3-30 % of the crop."""
    from PIL import Image, ImageDraw
    k = int(rng.integers(5, 13))
    cy, cx = rng.uniform(0.25, 0.75, 2) * n
    angles = np.sort(rng.uniform(0, 2 * np.pi, k))
    radii = rng.uniform(0.08, 0.3) * n * rng.uniform(0.5, 1.0, k)
    pts = [(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for a, r in zip(angles, radii)]
    im = Image.new("L", (n, n), 0)
    ImageDraw.Draw(im).polygon(pts, fill=255)
    return np.asarray(im) > 127


def _scaled_crop(photo: np.ndarray, crop: int, rng) -> np.ndarray:
    """A ``crop`` window, half the time from the photo downscaled by up to 2x (more scene per crop)."""
    if rng.random() < 0.5 and min(photo.shape[:2]) > crop * 1.2:
        from PIL import Image
        f = rng.uniform(1.0, min(2.0, min(photo.shape[:2]) / crop))
        window = _random_crop(photo, int(crop * f), rng)
        im = Image.fromarray((window * 255).round().astype(np.uint8)).resize((crop, crop), Image.LANCZOS)
        return np.asarray(im, np.float32) / np.float32(255.0)
    return _random_crop(photo, crop, rng)


def _flat_crop(photo: np.ndarray, crop: int, rng, tries: int = 4) -> np.ndarray:
    crops = [_scaled_crop(photo, crop, rng) for _ in range(tries)]
    energy = [np.abs(np.diff(c, axis=0)).mean() + np.abs(np.diff(c, axis=1)).mean() for c in crops]
    return crops[int(np.argmin(energy))]


def _defocus_v2(bg: np.ndarray, rng, nd) -> np.ndarray:
    """Static defocus (not motion, never labelled): Gaussian or disk (bokeh) kernel, over a soft region or the
    whole crop, in linear light (bright highlights bloom into discs as they do through a real lens)."""
    lin = bg ** np.float32(GAMMA)
    if rng.random() < 0.5:
        sigma = float(rng.uniform(0.8, 4.0))
        soft = np.stack([nd.gaussian_filter(lin[..., c], sigma, mode="reflect") for c in range(3)], axis=2)
    else:
        r = float(rng.uniform(1.5, 7.0))
        ri = int(np.ceil(r))
        yy, xx = np.mgrid[-ri:ri + 1, -ri:ri + 1]
        disk = np.clip(r + 0.5 - np.hypot(yy, xx), 0.0, 1.0)
        disk /= disk.sum()
        soft = np.stack([nd.convolve(lin[..., c], disk, mode="reflect") for c in range(3)], axis=2)
    soft = _to_display(soft.astype(np.float32))
    if rng.random() < 0.3:
        return soft.astype(np.float32)
    n = bg.shape[0]
    region = _blob(rng, n, nd) | _ellipse(rng, n) if rng.random() < 0.5 else _polygon(rng, n)
    if rng.random() < 0.5:
        region = ~region              # a sharp subject in front of a defocused background
    alpha = nd.gaussian_filter(region.astype(np.float32), sigma=rng.uniform(1.0, 4.0))[..., None]
    return (alpha * soft + (1.0 - alpha) * bg).astype(np.float32)


def _degrade(s: Sample, rng) -> Sample:
    """Camera and encoding artefacts, the same on blurry and sharp (so they tell nothing about the label):
    down/up-scaling, sensor noise (signal dependent), JPEG. Outside the mask blurry stays == sharp."""
    blurry, sharp = s.blurry, s.sharp
    if rng.random() < 0.2:
        f = rng.uniform(1.3, 3.0)
        blurry, sharp = (_down_up(a, f) for a in (blurry, sharp))
    if rng.random() < 0.4:
        sigma = rng.uniform(0.002, 0.03)
        gain = rng.uniform(0.0, 1.0)
        noise = rng.standard_normal(blurry.shape).astype(np.float32) * np.float32(sigma)
        blurry = blurry + noise * np.sqrt(gain * blurry + (1 - gain) * 0.25) * 2
        sharp = sharp + noise * np.sqrt(gain * sharp + (1 - gain) * 0.25) * 2
    blurry, sharp = np.clip(blurry, 0, 1), np.clip(sharp, 0, 1)
    if rng.random() < 0.4:
        q = int(rng.integers(30, 92))
        blurry, sharp = _jpeg(blurry, q), _jpeg(sharp, q)
    blurry, sharp = (np.round(a * 255) / np.float32(255.0) for a in (blurry, sharp))
    sharp = np.where(s.mask[..., None], sharp, blurry).astype(np.float32)
    return Sample(blurry.astype(np.float32), sharp, s.mask, s.trajectory, s.kind, s.trajectories, s.regions)


def _down_up(a: np.ndarray, f: float) -> np.ndarray:
    from PIL import Image
    h, w = a.shape[:2]
    im = Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))
    small = im.resize((max(8, int(w / f)), max(8, int(h / f))), Image.BILINEAR)
    return np.asarray(small.resize((w, h), Image.BICUBIC), np.float32) / np.float32(255.0)


def _jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), np.float32) / np.float32(255.0)


class SceneDataset:
    """``size`` samples of :func:`scene_sample`; sample ``i`` comes from ``np.random.default_rng([seed, i])``,
    so it does not depend on worker order. ``photos`` / ``cutouts``: float arrays (see :func:`scene_sample`)."""

    def __init__(self, photos: Sequence[np.ndarray], cutouts: Sequence[np.ndarray] = (), size: int = 10_000,
                 seed: int = 0, crop: int = 256, videos: Sequence[Sample] = (), video_share: float = 0.0,
                 ghost_share: float = 0.0):
        if not len(photos) or size < 1 or seed < 0 or crop < 16:
            raise ValueError("need at least one photo, size >= 1, seed >= 0 and crop >= 16")
        if not 0.0 <= ghost_share <= 1.0:
            raise ValueError(f"ghost_share must lie in [0, 1], got {ghost_share}")
        self.ghost_share = ghost_share
        if not 0.0 <= video_share <= 1.0 or (video_share > 0 and not len(videos)):
            raise ValueError("video_share must lie in [0, 1], and above 0 needs video windows")
        self.photos, self.cutouts, self.size, self.seed, self.crop = list(photos), list(cutouts), size, seed, crop
        # real video windows (video.motion_clip), ``video_share`` of the samples: real movers and real static
        # video (compression, noise) labelled not blurred, which the photo scenes cannot imitate
        self.videos, self.video_share = list(videos), video_share

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> Sample:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        if self.videos:   # its own stream: without videos the scene samples are those of earlier runs
            pick = np.random.default_rng([self.seed, index, 7])
            if pick.random() < self.video_share:
                from .video import window_crop
                clip = self.videos[int(pick.integers(len(self.videos)))]
                sample = window_crop(clip, self.crop, pick)
                return _degrade(sample, pick) if pick.random() < 0.3 else sample
        return scene_sample(self.photos, np.random.default_rng([self.seed, index]), self.crop, cutouts=self.cutouts,
                            ghost_share=self.ghost_share)

    def __getitem__(self, index: int):
        from .synth import to_tensors
        return to_tensors(self.sample(index))


def scene_set(photos: Sequence[np.ndarray], n: int, seed: int, crop: int = 256,
              cutouts: Sequence[np.ndarray] = ()) -> list[Sample]:
    """``n`` fixed samples (dev or held-out scoring): of every 10, 6 local, 3 sharp (``i % 10`` in 6..8) and 1
    global; sample ``i`` on photo ``i % len(photos)`` from ``default_rng([seed, i])``."""
    out = []
    for i in range(n):
        kind = "global" if i % 10 == 9 else "sharp" if i % 10 >= 6 else "local"
        rng = np.random.default_rng([seed, i])
        out.append(scene_sample([photos[i % len(photos)]], rng, crop, cutouts=cutouts, kind=kind))
    return out
