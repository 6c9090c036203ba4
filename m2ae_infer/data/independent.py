"""An independent local-motion-blur generator, for *evaluation only* (docs/independent_generator.md). Never train on it.

The training generators (:mod:`m2ae_infer.data.synth`, :mod:`m2ae_infer.data.scenes`) average bilinearly
shifted sub-frames of soft-alpha layers (ellipses, blobs, segments) moving along quadratic trajectories. A
detector trained on them can learn their shortcuts; this module renders local motion blur another way, so a
head can be judged on blur it has never seen made:

* **PSF convolution** (``scipy.signal.fftconvolve``), not sub-frame shifting. Kernels are either camera-shake
  style random walks with inertia and impulsive shakes (Boracchi & Foi 2012, "Modeling the performance of
  image restoration from motion blur"), splatted sub-pixel into a support of at most 41 px, or straight lines
  of 5-35 px at any angle, rasterized with 8x8 super-sampling. Every kernel is non-negative and sums to 1; its
  centre pixel is the mid-exposure position, so the sharp image is the mid-exposure frame (as in synth).
* **Objects** are anti-aliased random polygons, stars or unions of rotated rectangles. Their content is mostly
  the photo's *own* content (the region itself moves over the static photo: only the blur tells it apart),
  sometimes a region of another photo.
* **Compositing** in linear light (gamma 2.2), the physical model of a moving object over a static background
  seen by a static camera: ``blurry = k*(alpha F) + (1 - k*alpha) B``, ``sharp = alpha F + (1 - alpha) B``
  (``*`` is convolution, ``B`` the photo, ``F`` the foreground, ``F = B`` for own-content objects). Several
  objects are layered in order, each with its own kernel.
* **Mask rule**: ``footprint = support(alpha) (+) support(k)`` (Minkowski sum: where the moving object can
  be during the exposure), ``visible = max_c |q(blurry) - q(sharp)| > 0.5/255`` with ``q`` the 8-bit
  quantization (i.e. the 8-bit images differ), ``mask = footprint & dilate(visible, 3x3)``. Outside the mask
  blurry == sharp bit for bit (sharp is set to blurry there after the degradations). A local draw whose
  mask holds fewer than 0.3 % of the crop differing by more than 2.5/255 is redrawn (at most 4 draws).
* Kinds ``"sharp"`` (no motion; half of them get a defocused region, disk/bokeh kernel, identical in blurry
  and sharp and unmasked) and ``"global"`` (whole crop convolved with a random-walk shake kernel, mask all
  true). Borders: the crop is cut with a 20 px margin of real photo around it, so kernels see real content.
* Degradations (each with probability 1/2, seeded): Gaussian noise, sigma 0-0.01, the same noise on blurry
  and sharp; JPEG quality 70-95 (Pillow) encoded on each separately. Both are quantized to 8 bits at the end.

Everything is drawn from the ``np.random.Generator`` passed in: a seed fixes a sample byte for byte.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from .synth import KINDS, TRAJ_POINTS, Sample, _as_rgb

GAMMA = 2.2
MAX_SUPPORT = 41                   # kernel side in pixels, at most
MARGIN = MAX_SUPPORT // 2          # real photo content kept around the crop
LINEAR_LENGTH = (5.0, 35.0)        # px
WALK_LENGTH = (8.0, 80.0)          # px of path drawn before the exposure fraction is applied
ANXIETY = (0.001, 0.05)            # B&F's perturbation strength (their demo: 0.005), log-uniform
VISIBLE = 0.5 / 255.0              # 8-bit images differ
P_FOREIGN = 0.3                    # object content from another photo (when other_photos are given)
STRONG = 2.5 / 255.0               # a local sample with fewer pixels than MIN_MASK_FRACTION of the crop
MIN_MASK_FRACTION = 0.003          # ... differing by more than this is redrawn (up to 4 tries)
_INSTALL_HINT = ('the independent blur generator needs scipy (which scikit-image brings): '
                 'pip install "m2ae-infer[train]"')


def _scipy():
    try:
        from scipy import ndimage, signal
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return ndimage, signal


# ----------------------------------------------------------------------------------------------- kernels
def _splat(points: np.ndarray, size: int) -> np.ndarray:
    """Bilinear splat of equally weighted ``(dx, dy)`` points (offsets from the centre) into ``size x size``."""
    c = size // 2
    x, y = points[:, 0] + c, points[:, 1] + c
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = x - x0, y - y0
    k = np.zeros((size, size), np.float64)
    for oy, ox, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        np.add.at(k, (y0 + oy, x0 + ox), w)
    return k / k.sum()


def _fit(path: np.ndarray) -> tuple[np.ndarray, int]:
    """``path`` relative to its mid-exposure point, shrunk if needed to fit MAX_SUPPORT; the kernel side."""
    path = path - path[len(path) // 2]
    reach = float(np.abs(path).max())
    limit = MARGIN - 1.0
    if reach > limit:
        path = path * (limit / reach)
        reach = limit
    return path, 2 * (int(np.ceil(reach)) + 1) + 1


def _resample(path: np.ndarray, points: int = TRAJ_POINTS) -> np.ndarray:
    """``points`` time-uniform samples of a dense path, mid-exposure at 0 (synth's trajectory convention)."""
    idx = np.linspace(0.0, len(path) - 1.0, points)
    t = np.arange(len(path))
    out = np.stack([np.interp(idx, t, path[:, 0]), np.interp(idx, t, path[:, 1])], axis=1)
    return (out - out[points // 2]).astype(np.float32)


def random_walk_kernel(rng: np.random.Generator, steps: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Boracchi & Foi (2012) camera-shake trajectory: a constant-speed random walk whose velocity gets a
    Gaussian push, a centripetal pull back to the start, and now and then an abrupt reversal; a random fraction
    of it is the exposure. Returns ``(kernel [s, s] float32, trajectory [TRAJ_POINTS, 2])``."""
    total = float(np.exp(rng.uniform(*np.log(WALK_LENGTH))))
    anxiety = float(np.exp(rng.uniform(*np.log(ANXIETY))))
    centripetal, gaussian, big_shakes = 0.7 * rng.random(), 10.0 * rng.random(), 0.2 * rng.random()
    angle = rng.uniform(0.0, 2.0 * np.pi)
    shake_u, shake_a = rng.random(steps), rng.random(steps)
    noise = rng.standard_normal((steps, 2))
    exposure = rng.uniform(0.4, 1.0)
    step = total / (steps - 1)
    v = np.exp(1j * angle) * step * anxiety
    x = np.zeros(steps, np.complex128)
    for t in range(steps - 1):
        push = 2.0 * v * np.exp(1j * (np.pi + shake_a[t] - 0.5)) if shake_u[t] < big_shakes * anxiety else 0.0
        v = v + push + anxiety * (gaussian * (noise[t, 0] + 1j * noise[t, 1]) - centripetal * x[t]) * step
        v = v / (abs(v) + 1e-300) * step
        x[t + 1] = x[t] + v
    x = x[:max(2, int(round(exposure * steps)))]
    path, size = _fit(np.stack([x.real, x.imag], axis=1))
    return _splat(path, size).astype(np.float32), _resample(path)


def linear_kernel(length: float, angle: float, supersample: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A straight ``length`` px motion at ``angle`` (radians, x right, y down): a 1 px wide rectangle along the
    path, anti-aliased by ``supersample``-fold box filtering. Returns ``(kernel, trajectory [TRAJ_POINTS, 2])``."""
    d = np.array([np.cos(angle), np.sin(angle)])
    ends = np.stack([-0.5 * length * d, 0.5 * length * d])
    path, size = _fit(np.linspace(ends[0], ends[1], 257))
    a, b = path[0], path[-1]
    s = supersample
    sub = (np.arange(size * s) + 0.5) / s - 0.5 - size // 2          # sub-pixel centres, offsets from centre
    yy, xx = np.meshgrid(sub, sub, indexing="ij")
    ab = b - a
    t = ((xx - a[0]) * ab[0] + (yy - a[1]) * ab[1]) / max(float(ab @ ab), 1e-12)
    dist = np.hypot(xx - a[0] - t * ab[0], yy - a[1] - t * ab[1])
    inside = (dist <= 0.5) & (t >= 0.0) & (t <= 1.0)              # a 1 x length rectangle, no round caps
    k = inside.astype(np.float64).reshape(size, s, size, s).mean(axis=(1, 3))
    return (k / k.sum()).astype(np.float32), _resample(path)


def disk_kernel(radius: float, supersample: int = 8) -> np.ndarray:
    """Defocus (bokeh) PSF: an anti-aliased uniform disk of ``radius`` px, summing to 1."""
    r = int(np.ceil(radius)) + 1
    sub = (np.arange((2 * r + 1) * supersample) + 0.5) / supersample - 0.5 - r
    yy, xx = np.meshgrid(sub, sub, indexing="ij")
    k = (xx * xx + yy * yy <= radius * radius).astype(np.float64)
    k = k.reshape(2 * r + 1, supersample, 2 * r + 1, supersample).mean(axis=(1, 3))
    return (k / k.sum()).astype(np.float32)


def motion_kernel(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Half random-walk (Boracchi & Foi), half linear (5-35 px, any angle)."""
    if rng.random() < 0.5:
        return random_walk_kernel(rng)
    return linear_kernel(rng.uniform(*LINEAR_LENGTH), rng.uniform(0.0, 2.0 * np.pi))


# ------------------------------------------------------------------------------------------------ shapes
def _fill_polygons(polygons: Sequence[np.ndarray], n: int, supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage ``[n, n]`` of the union of polygons (vertex arrays ``[V, 2]`` of ``(x, y)``),
    even-odd rule per polygon, ``supersample``-fold box filtering."""
    s = supersample
    hit = np.zeros((n * s, n * s), bool)
    for poly in polygons:
        x0, y0 = np.clip(np.floor(poly.min(axis=0)).astype(int), 0, n)
        x1, y1 = np.clip(np.ceil(poly.max(axis=0)).astype(int) + 1, 0, n)
        if x1 <= x0 or y1 <= y0:
            continue
        py, px = np.meshgrid((np.arange(y0 * s, y1 * s) + 0.5) / s, (np.arange(x0 * s, x1 * s) + 0.5) / s,
                             indexing="ij")
        inside = np.zeros(py.shape, bool)
        for (xa, ya), (xb, yb) in zip(poly, np.roll(poly, -1, axis=0)):
            if ya == yb:
                continue
            cross = (ya > py) != (yb > py)
            inside ^= cross & (px < xa + (py - ya) * (xb - xa) / (yb - ya))
        hit[y0 * s:y1 * s, x0 * s:x1 * s] |= inside
    return hit.reshape(n, s, n, s).mean(axis=(1, 3)).astype(np.float32)


def _shape(rng: np.random.Generator, crop: int) -> list[np.ndarray]:
    """Random polygon, star, or union of 2-4 rotated rectangles, in crop coordinates (x, y)."""
    cx, cy = rng.uniform(0.15, 0.85, 2) * crop
    radius = rng.uniform(0.08, 0.3) * crop
    kind = int(rng.integers(3))
    if kind == 0:       # random star-shaped polygon: sorted angles, random radii
        v = int(rng.integers(5, 13))
        ang = np.sort(rng.uniform(0.0, 2.0 * np.pi, v))
        rad = radius * rng.uniform(0.45, 1.0, v)
        return [np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)]
    if kind == 1:       # star: alternating outer and inner radii
        m = int(rng.integers(4, 9))
        ang = rng.uniform(0.0, 2.0 * np.pi) + np.arange(2 * m) * np.pi / m
        rad = np.where(np.arange(2 * m) % 2 == 0, radius, radius * rng.uniform(0.3, 0.7))
        return [np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], axis=1)]
    rects = []
    for _ in range(int(rng.integers(2, 5))):
        w, h = radius * rng.uniform(0.3, 1.0, 2)
        th = rng.uniform(0.0, np.pi)
        ox, oy = (rng.uniform(-0.6, 0.6, 2) * radius) if rects else (0.0, 0.0)
        corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]])
        rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        rects.append(corners @ rot.T + [cx + ox, cy + oy])
    return rects


# ---------------------------------------------------------------------------------------------- rendering
def _conv(img: np.ndarray, kernel: np.ndarray, signal) -> np.ndarray:
    """``img * kernel`` (true convolution, same size, zero outside); ``img`` [H, W] or [H, W, C]."""
    if img.ndim == 3:
        return np.stack([_conv(img[..., c], kernel, signal) for c in range(img.shape[2])], axis=2)
    return signal.fftconvolve(img.astype(np.float64), kernel.astype(np.float64), mode="same")


def composite(background: np.ndarray, foreground: np.ndarray, alpha: np.ndarray, kernel: np.ndarray):
    """One moving object over a static background, in linear light: ``(blurry, sharp)`` with
    ``blurry = k*(alpha F) + (1 - k*alpha) B`` and ``sharp = alpha F + (1 - alpha) B``."""
    _, signal = _scipy()
    a = alpha.astype(np.float64)[..., None]
    return _layer(background, foreground, alpha, kernel, signal), a * foreground + (1.0 - a) * background


def _window(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size x size`` window of ``photo`` (symmetric padding if too small), random flips, linear."""
    h, w = photo.shape[:2]
    if h < size or w < size:
        photo = np.pad(photo, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="symmetric")
        h, w = photo.shape[:2]
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    out = photo[y:y + size, x:x + size]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    if rng.random() < 0.5:
        out = out[::-1]
    return np.clip(out.astype(np.float64), 0.0, 1.0) ** GAMMA


def _display(lin: np.ndarray) -> np.ndarray:
    return np.clip(lin, 0.0, 1.0) ** (1.0 / GAMMA)


def _quantize(img: np.ndarray) -> np.ndarray:
    return (np.round(np.clip(img, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((np.clip(img, 0, 1) * 255.0).round().astype(np.uint8)).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), np.float64) / 255.0


def _degrade(blurry: np.ndarray, sharp: np.ndarray, rng: np.random.Generator):
    """Noise (the same on both) and JPEG (each encoded on its own); quantized to 8 bits."""
    if rng.random() < 0.5:
        noise = rng.standard_normal(blurry.shape) * rng.uniform(0.0, 0.01)
        blurry, sharp = blurry + noise, sharp + noise
    if rng.random() < 0.5:
        q = int(rng.integers(70, 96))
        blurry, sharp = _jpeg(blurry, q), _jpeg(sharp, q)
    return _quantize(blurry), _quantize(sharp)


def _local(big: np.ndarray, crop: int, rng, others, nd, signal):
    """Blurry / sharp (linear, margin included), footprints and trajectories of 1-2 moving objects."""
    n = big.shape[0]
    blurry, sharp = big, big
    footprints, trajs = [], []
    for _ in range(int(rng.integers(1, 3))):
        polys = [p + MARGIN for p in _shape(rng, crop)]
        alpha = _fill_polygons(polys, n)
        fg = big
        if others and rng.random() < P_FOREIGN:
            fg = _window(_as_rgb(others[int(rng.integers(len(others)))]), n, rng)
        kernel, traj = motion_kernel(rng)
        # composite() over the layers so far: this object moves in front of them
        blurry = _layer(blurry, fg, alpha, kernel, signal)
        sharp = alpha[..., None] * fg + (1.0 - alpha[..., None]) * sharp
        supp = _conv((alpha > 0).astype(np.float64), (kernel > 0).astype(np.float64), signal) > 0.5
        footprints.append(supp | (alpha > 0))
        trajs.append(traj)
    return blurry, sharp, footprints, trajs


def _layer(below: np.ndarray, fg: np.ndarray, alpha: np.ndarray, kernel: np.ndarray, signal) -> np.ndarray:
    a = alpha.astype(np.float64)
    ka = np.clip(_conv(a, kernel, signal), 0.0, 1.0)[..., None]
    return np.clip(_conv(a[..., None] * fg, kernel, signal), 0.0, None) + (1.0 - ka) * below


def independent_sample(photo: np.ndarray, rng: np.random.Generator, crop: int = 256, *,
                       kind: str | None = None, other_photos=None) -> Sample:
    """One evaluation sample from a random ``crop x crop`` window of ``photo`` (float ``[H, W, 3]`` in
    ``[0, 1]``); ``kind`` drawn local / sharp / global with 0.8 / 0.1 / 0.1 unless given. Foreign object
    content (probability 0.3 per object) comes from ``other_photos`` when given. ``regions``: index of the
    (top-most) object whose footprint covers a masked pixel (0 with one object or for global), -1 outside."""
    nd, signal = _scipy()
    if kind is None:
        r = rng.random()
        kind = "local" if r < 0.8 else "sharp" if r < 0.9 else "global"
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if crop < 8:
        raise ValueError(f"crop must be >= 8, got {crop}")
    n = crop + 2 * MARGIN
    inner = (slice(MARGIN, MARGIN + crop), slice(MARGIN, MARGIN + crop))
    big = _window(_as_rgb(photo), n, rng)
    others = [p for p in other_photos] if other_photos is not None and len(other_photos) else None

    if kind == "sharp":
        img = big
        if rng.random() < 0.5:        # a defocused region: not motion, unmasked, the same in blurry and sharp
            soft = _conv(big, disk_kernel(rng.uniform(1.5, 6.0)), signal)
            region = _fill_polygons([p + MARGIN for p in _shape(rng, crop)], n)
            region = nd.gaussian_filter(region, sigma=rng.uniform(1.0, 4.0))[..., None]
            img = region * soft + (1.0 - region) * big
        img = _quantize(_display(img[inner]))
        blurry, _ = _degrade(img, img, rng)
        empty = np.zeros((0, TRAJ_POINTS, 2), np.float32)
        return Sample(blurry, blurry.copy(), np.zeros((crop, crop), bool), np.zeros((TRAJ_POINTS, 2), np.float32),
                      kind, empty, np.full((crop, crop), -1, np.int8))

    if kind == "global":
        kernel, traj = random_walk_kernel(rng)
        blurry = _quantize(_display(_conv(big, kernel, signal)[inner]))
        sharp = _quantize(_display(big[inner]))
        blurry, sharp = _degrade(blurry, sharp, rng)
        return Sample(blurry, sharp, np.ones((crop, crop), bool), traj, kind, traj[None],
                      np.zeros((crop, crop), np.int8))

    for _ in range(4):                 # redraw when the motion leaves (almost) no visible blur
        blurry_lin, sharp_lin, footprints, trajs = _local(big, crop, rng, others, nd, signal)
        blurry, sharp = _quantize(_display(blurry_lin[inner])), _quantize(_display(sharp_lin[inner]))
        diff = np.abs(blurry - sharp).max(axis=2)
        footprint = np.any([f[inner] for f in footprints], axis=0)
        mask = footprint & nd.binary_dilation(diff > VISIBLE, structure=np.ones((3, 3), bool))
        if (mask & (diff > STRONG)).mean() >= MIN_MASK_FRACTION:
            break
    regions = np.full((crop, crop), -1, np.int8)
    for r, f in enumerate(footprints):
        regions[f[inner] & mask] = r
    blurry, sharp = _degrade(blurry, sharp, rng)
    sharp = np.where(mask[..., None], sharp, blurry).astype(np.float32)
    trajectories = np.stack(trajs).astype(np.float32)
    return Sample(blurry, sharp, mask, trajectories[0], kind, trajectories, regions)


def independent_set(photos: Sequence[np.ndarray], n: int, seed: int, crop: int = 256) -> list[Sample]:
    """``n`` fixed evaluation samples: sample ``i`` on photo ``i % len(photos)`` from
    ``np.random.default_rng([seed, i])``; of every 10, 8 local, 1 sharp (``i % 10 == 8``), 1 global
    (``i % 10 == 9``). Foreign object content comes from ``photos``."""
    if not len(photos):
        raise ValueError("independent_set needs at least one photo")
    out = []
    for i in range(n):
        kind = {8: "sharp", 9: "global"}.get(i % 10, "local")
        rng = np.random.default_rng([seed, i])
        out.append(independent_sample(photos[i % len(photos)], rng, crop, kind=kind, other_photos=photos))
    return out
