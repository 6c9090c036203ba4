"""Real photographs for the benchmark's "real" masks: the mask predictor decides what gets computed.

The bundled example photo (a held-out photo with synthetic local motion blur) is always there; with
scikit-image installed (``pip install 'm2ae-infer[train]'``) two more held-out photos get the same
treatment. Photos are centre-cropped to the target aspect ratio and resized (bicubic) to the target size.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..shipped import EXAMPLE_PHOTO


def _fit(img: Image.Image, height: int, width: int) -> torch.Tensor:
    """Centre-crop ``img`` to ``width:height`` and resize it; ``[1, 3, H, W]`` float32 in 0..1."""
    w, h = img.size
    scale = min(w / width, h / height)
    cw, ch = round(width * scale), round(height * scale)
    left, top = (w - cw) // 2, (h - ch) // 2
    img = img.convert("RGB").crop((left, top, left + cw, top + ch)).resize((width, height), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def blurred_photos(seed: int = 0, limit: int | None = None) -> list[tuple[str, Image.Image]]:
    """Up to ``limit`` ``(name, photo)`` pairs of real photos with local motion blur (see the module docstring)."""
    photos = [("example", Image.open(EXAMPLE_PHOTO))]
    if limit is not None and limit <= 1:
        return photos[:limit]
    try:
        from ..data import synth
        synth.skimage_data_dir()
    except (ImportError, OSError, ValueError):
        return photos          # no scikit-image: the bundled photo only
    for name in ("chelsea", "coins")[:None if limit is None else limit - 1]:
        photo = synth.load_photo(name)
        sample = synth.make_sample(photo, np.random.default_rng([seed, len(photos)]), min(photo.shape[:2]),
                                   object_photos=[photo], kind="local")
        photos.append((name, Image.fromarray((sample.blurry * 255 + 0.5).astype(np.uint8))))
    return photos


def real_photos(height: int, width: int, seed: int = 0, limit: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """The photos of :func:`blurred_photos` at ``height x width``: ``(name, [1, 3, H, W])`` pairs."""
    return [(name, _fit(img, height, width)) for name, img in blurred_photos(seed, limit)]
