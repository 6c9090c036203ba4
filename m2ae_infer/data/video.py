"""Real local motion from a static-camera video, for evaluation (docs/model_card.md): ``m2ae-eval --set video``.

A static camera films a static scene with things moving through it (people, cars). Averaging ``2 r + 1``
consecutive frames in linear light is what a ``2 r + 1`` times longer exposure would have recorded: the moving
things are smeared along their real paths, the rest stays as it was. The centre frame is the sharp reference.

* ``blurry = (mean_t (frames[t] / 255) ** 2.2) ** (1 / 2.2)`` over ``t = centre - r .. centre + r``;
  ``sharp = frames[centre] / 255``; float32 in ``[0, 1]``.
* **Mask rule** (constants below; chosen by looking at masks on the dev clip ``vtest.avi`` only):
  every frame is smoothed with a Gaussian of ``SMOOTH_SIGMA`` px (per channel) so sensor and compression noise
  average out; a pixel *moves* when, for any frame of the window, ``max_channel |smooth(frame) -
  smooth(centre)| > DIFF_THRESHOLD`` (in 0-1 units). The moving pixels are then cleaned: connected components
  (8-connected) smaller than ``MIN_AREA`` px are dropped (flicker, noise), holes are filled (the inside of a
  uniformly coloured mover changes little between frames), and the result is grown by ``GROW`` px (a
  ``(2 GROW + 1)`` square; the smoothing and the threshold eat the faint ends of the smear).
* **Outside the mask ``blurry = sharp``** (set explicitly). For a static scene and camera the averaged frame
  equals the centre frame there up to noise, which averaging would otherwise *remove* (the average is less
  noisy than the centre frame): leaving it would make every untouched pixel differ from the reference and hide
  whether a deblurrer changed pixels it should have left alone. With it, "changed outside the true mask" is
  measured against an exact reference.
* ``kind`` is ``"local"``, or ``"sharp"`` when nothing moves in the window. The motion itself is not known:
  ``trajectories`` is empty and ``regions`` is -1 everywhere (so no PSF, no classical oracle).

Decoding uses PyAV (``pip install "m2ae-infer[train]"``), imported on first use.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .synth import TRAJ_POINTS, Sample

__all__ = ["read_frames", "frame_count", "motion_clip", "clip_set", "moving_mask", "window_crop", "parse_frames",
           "GAMMA", "SMOOTH_SIGMA", "DIFF_THRESHOLD", "MIN_AREA", "GROW", "TRAIN_FRAMES"]

GAMMA = 2.2
SMOOTH_SIGMA = 1.5        # px: Gaussian smoothing before differencing (noise / compression blocks)
DIFF_THRESHOLD = 0.06     # max-channel difference (0-1) of smoothed frames that counts as motion (~15/255)
MIN_AREA = 64             # px: moving components smaller than this are dropped
GROW = 3                  # px: the cleaned mask is grown by this much (square structuring element)
# A dev video also trains the detector (m2ae-train --video): its windows centred before this frame are training
# data, those at or after it (with no frame of a training window) the dev clip that m2ae-eval --set video --frames
# 400: and benchmarks.mask_table score.
TRAIN_FRAMES = 400
_INSTALL_HINT = 'reading videos needs PyAV: pip install "m2ae-infer[train]"'


def require_av():
    """PyAV, or ImportError with the install line (it decodes the videos)."""
    try:
        import av
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return av


def _ndimage():
    try:
        from scipy import ndimage
    except ImportError as exc:
        raise ImportError('video masks need scipy: pip install "m2ae-infer[train]"') from exc
    return ndimage


def _decode(path: str | os.PathLike[str]):
    """Yield every frame of the first video stream as uint8 ``[H, W, 3]`` RGB. Missing file:
    ``FileNotFoundError``; a file that is not a decodable video: ``ValueError`` (one line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} not found")
    if path.suffix.lower() == ".gif":
        yield from _decode_gif(path)
        return
    av = require_av()
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable video ({exc})") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as exc:
            raise ValueError(f"{path}: decoding failed ({exc})") from None


def _decode_gif(path: Path):
    """An animated GIF's frames by Pillow: FFmpeg's GIF demuxer returns one frame for a GIF whose frames have no
    delay (measured: a 5-frame GIF saved by Pillow without ``duration``), Pillow every one."""
    from PIL import Image, ImageSequence, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            for frame in ImageSequence.Iterator(im):
                yield np.asarray(frame.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable GIF ({exc})") from None


def frame_count(path: str | os.PathLike[str]) -> int:
    """Number of decodable frames (counted by decoding: container headers can be wrong)."""
    return sum(1 for _ in _decode(path))


def read_frames(path: str | os.PathLike[str], start: int = 0, count: int | None = None,
                step: int = 1) -> np.ndarray:
    """Frames ``start, start + step, ...`` (at most ``count``; all to the end for ``None``) as uint8
    ``[T, H, W, 3]`` RGB. Fewer than ``count`` come back when the video ends first."""
    if start < 0 or step < 1 or (count is not None and count < 0):
        raise ValueError(f"need start >= 0, step >= 1, count >= 0; got {start}, {step}, {count}")
    frames = []
    for i, frame in enumerate(_decode(path)):
        if count is not None and len(frames) >= count:
            break
        if i >= start and (i - start) % step == 0:
            frames.append(frame)
    if not frames:
        raise ValueError(f"{path}: no frames from index {start} (step {step})")
    return np.stack(frames)


def moving_mask(frames: np.ndarray, centre: int) -> np.ndarray:
    """bool ``[H, W]``: the module's mask rule over all of ``frames`` (uint8 ``[T, H, W, 3]``) against
    ``frames[centre]``."""
    nd = _ndimage()
    smooth = lambda f: nd.gaussian_filter(f.astype(np.float32) / 255.0, (SMOOTH_SIGMA, SMOOTH_SIGMA, 0))  # noqa: E731
    ref = smooth(frames[centre])
    moving = np.zeros(frames.shape[1:3], bool)
    for t, frame in enumerate(frames):
        if t != centre:
            moving |= np.abs(smooth(frame) - ref).max(axis=2) > DIFF_THRESHOLD
    labels, n = nd.label(moving, structure=np.ones((3, 3), bool))
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= MIN_AREA
        keep[0] = False
        moving = keep[labels]
    moving = nd.binary_fill_holes(moving)
    if GROW and moving.any():
        moving = nd.binary_dilation(moving, structure=np.ones((2 * GROW + 1, 2 * GROW + 1), bool))
    return moving


def motion_clip(frames: np.ndarray, centre: int, radius: int) -> Sample:
    """One sample from the window ``frames[centre - radius : centre + radius + 1]`` (uint8 ``[T, H, W, 3]``):
    see the module docstring for blurry, sharp and the mask."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if radius < 1 or not radius <= centre < len(frames) - radius:
        raise ValueError(f"window {centre} +- {radius} does not fit in {len(frames)} frames (radius >= 1)")
    window = frames[centre - radius:centre + radius + 1]
    lin = (window.astype(np.float64) / 255.0) ** GAMMA
    blurry = (lin.mean(axis=0) ** (1.0 / GAMMA)).astype(np.float32)
    sharp = (frames[centre].astype(np.float32) / np.float32(255.0))
    mask = moving_mask(window, radius)
    blurry = np.where(mask[..., None], blurry, sharp).astype(np.float32)
    h, w = mask.shape
    return Sample(blurry=blurry, sharp=sharp, mask=mask, trajectory=np.zeros((TRAJ_POINTS, 2), np.float32),
                  kind="local" if mask.any() else "sharp",
                  trajectories=np.zeros((0, TRAJ_POINTS, 2), np.float32), regions=np.full((h, w), -1, np.int8))


def clip_centres(total: int, n: int, radius: int, seed: int) -> list[int]:
    """``n`` window centres spread over ``total`` frames: the valid range ``radius .. total - 1 - radius`` is
    cut into ``n`` equal strata and one centre is drawn uniformly in each, from ``np.random.default_rng(seed)``
    (sorted, distinct when the range allows)."""
    lo, hi = radius, total - 1 - radius
    if n < 1 or hi < lo:
        raise ValueError(f"{total} frames hold no window of radius {radius}" if hi < lo else "n must be >= 1")
    rng = np.random.default_rng(seed)
    edges = np.linspace(lo, hi + 1, n + 1)
    return [int(min(hi, np.floor(rng.uniform(a, b)))) for a, b in zip(edges[:-1], edges[1:])]


def parse_frames(text: str | None) -> tuple[int, int | None]:
    """``"A:B"`` / ``"A:"`` / ``":B"`` -> ``(A, B)`` frame range (B exclusive, None: to the end); None: all."""
    if not text:
        return 0, None
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            raise ValueError
        lo, hi = int(start or 0), (int(stop) if stop else None)
    except ValueError:
        raise ValueError(f"frames must be START:STOP (either may be left out), got {text!r}") from None
    if lo < 0 or (hi is not None and hi <= lo):
        raise ValueError(f"frames {text!r}: need 0 <= START < STOP")
    return lo, hi


def clip_set(path: str | os.PathLike[str], n: int, radius: int, seed: int,
             frames: tuple[int, int | None] = (0, None)) -> list[Sample]:
    """``n`` samples (:func:`motion_clip`) from the video at ``path``, centres from :func:`clip_centres` over
    the frames ``frames = (start, stop)`` (stop exclusive, None: the end; every frame of a window lies inside).
    Decodes the video twice (count, then the windows) holding only the frames the windows need."""
    start, stop = frames
    total = frame_count(path) if stop is None else min(stop, frame_count(path))
    if total - start < 2 * radius + 1:
        raise ValueError(f"{path}: frames {start}:{total} hold no window of {2 * radius + 1} frames; give a longer "
                         f"clip, a wider --frames range or a smaller --radius (at most {max((total - start - 1) // 2, 0)})")
    centres = [start + c for c in clip_centres(total - start, n, radius, seed)]
    needed = {t for c in centres for t in range(c - radius, c + radius + 1)}
    kept = {i: f for i, f in enumerate(_decode(path)) if i in needed}
    samples = []
    for c in centres:
        window = np.stack([kept[t] for t in range(c - radius, c + radius + 1)])
        samples.append(motion_clip(window, radius, radius))
    return samples


def window_crop(clip: Sample, crop: int, rng: np.random.Generator, toward_motion: float = 0.5) -> Sample:
    """A ``crop x crop`` training sample cut from a video window (:func:`motion_clip`): with probability
    ``toward_motion`` centred near a random moving pixel (movers cover a few percent of a frame), else anywhere.
    The static rest of the frame is real video (compression, noise, a real scene) labelled not blurred."""
    h, w = clip.mask.shape
    if h < crop or w < crop:
        raise ValueError(f"video frames {w}x{h} are smaller than the crop {crop}")
    ys, xs = np.nonzero(clip.mask)
    if len(ys) and rng.random() < toward_motion:
        i = int(rng.integers(len(ys)))
        top = int(np.clip(ys[i] - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, h - crop))
        left = int(np.clip(xs[i] - crop // 2 + rng.integers(-crop // 4, crop // 4 + 1), 0, w - crop))
    else:
        top, left = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    box = (slice(top, top + crop), slice(left, left + crop))
    mask = clip.mask[box]
    return Sample(blurry=np.ascontiguousarray(clip.blurry[box]), sharp=np.ascontiguousarray(clip.sharp[box]),
                  mask=np.ascontiguousarray(mask), trajectory=clip.trajectory,
                  kind="local" if mask.any() else "sharp", trajectories=clip.trajectories,
                  regions=np.ascontiguousarray(clip.regions[box]))
