"""Image output: atomic writers that never clip, drop alpha or change pixels silently (:func:`save_image`,
:func:`save_images`) in the formats of :data:`m2ae_infer.formats.FORMATS`, and the mask picture.

Reading and preparing images is :mod:`m2ae_infer.imgio`; this module writes what it gives back.
"""
from __future__ import annotations

import contextlib
import os
import struct
import warnings
import zlib
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from .atomic import OutputExistsError, atomic_write
from .formats import DEEP_GRAY, FORMATS, FileFormat, writable_suffixes
from .imgio import ImageError, ImageWarning
from .messages import one_line, shown

__all__ = ["FileFormat", "FORMATS", "encode_image", "save_image", "save_images", "mask_to_image", "writable_suffixes"]


# JPEG: quality 95 (Pillow's 75 visibly softens). WebP: lossless, so pixels the network did not change stay
# bit-identical in the file too (a lossless WebP input must not come back re-compressed); JPEG has no such mode.
# exact: libwebp otherwise rewrites the colour of fully transparent pixels, even in lossless mode.
_SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True, "exact": True}}


def save_image(obj: Image.Image | np.ndarray, path: str | os.PathLike[str], *,
               overwrite: bool = False) -> None:
    """Write ``obj`` to ``path`` atomically: a temp file in the same folder, then ``os.replace``.

    ``obj`` is a PIL image or a numpy ``[H, W]`` / ``[H, W, C]`` array (C in 1..4: L, LA, RGB, RGBA)
    of dtype uint8 or uint16. The format comes from the extension (:data:`FORMATS`). Decisions:

    - An existing ``path`` is refused unless ``overwrite=True``; the target is never half-written.
    - Nothing is dropped or clipped silently: alpha to a format without alpha (JPEG, BMP), and 16-bit, 32-bit
      int or float samples to an 8-bit-only format (JPEG, BMP, WebP, TGA), raise ImageError naming a format
      that holds them (.png, .tif). GIF and ICO outputs are refused (they would change pixels).
    - uint16 gray is saved as Pillow mode I;16 (PNG, TIFF). uint16 with 2-4 channels has no Pillow
      mode, so it is written as 16-bit PNG by this module and requires a ``.png`` path.
    - JPEG is written with quality 95; WebP losslessly (unchanged pixels stay bit-identical).
    - A PIL image's EXIF (``info["exif"]``, orientation included) is written where the format stores EXIF;
      elsewhere, or when it is longer than the format holds (JPEG: 65533 bytes; an ImageWarning says so), its
      orientation is applied to the pixels and the EXIF left out, so the file displays like the image.
    """
    save_images([(obj, path)], overwrite=overwrite)


def save_images(items: list[tuple[Image.Image | np.ndarray, str | os.PathLike[str]]], *,
                overwrite: bool = False) -> None:
    """Write several ``(obj, path)`` as :func:`save_image` does, all or nothing: every path is checked and
    every file encoded to its temp file before the first one is published, so a bad path or a failing encoder
    leaves every existing file as it was (e.g. an output image and its mask)."""
    checked = [(path, *_check_target(obj, path, overwrite)) for obj, path in items]
    try:
        with contextlib.ExitStack() as stack:   # on exit the temp files are published, or all removed
            for path, target, write in checked:
                write(stack.enter_context(atomic_write(target, overwrite=overwrite)))
            path = "output"   # publishing, on leaving the block: os errors name the file themselves
    except FileExistsError as e:   # OutputExistsError: the file appeared meanwhile (kept as the cause)
        raise ImageError(f"{one_line(e)}") from e
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"{shown(path)}: cannot write ({one_line(e)}); "
                         "check the folder is writable and the format suits the image") from e


def _check_target(obj: Image.Image | np.ndarray, path: str | os.PathLike[str],
                  overwrite: bool) -> tuple[str, Callable[[Any], None]]:
    """Validate ``path`` and ``obj`` for it; returns (absolute target, writer to a binary file object)."""
    target = os.path.abspath(os.fspath(path))
    name = shown(path)
    folder, ext = os.path.dirname(target), os.path.splitext(target)[1].lower()
    fmt = FORMATS.get(ext)
    if fmt is None:
        raise ImageError(f"{name}: cannot write images with extension {ext or '(none)'!r}; "
                         f"use {', '.join(writable_suffixes())}")
    if fmt.refused:
        raise ImageError(f"{name}: {ext} output is not supported: {fmt.refused}; write .png instead")
    if not os.path.isdir(folder):
        raise ImageError(f"{name}: folder {shown(folder)} does not exist; create it first")
    if os.path.isdir(target):
        raise ImageError(f"{name}: is a directory; pass a file name")
    if os.path.lexists(target) and not overwrite:
        # the cause carries the path, so that a CLI can word the fix as --force
        raise ImageError(f"{name}: exists; pass overwrite=True to replace it") from OutputExistsError(path)
    return target, _writer(obj, fmt, name)


def encode_image(obj: Image.Image | np.ndarray, suffix: str = ".png", name: object = "image") -> bytes:
    """The bytes :func:`save_image` would write for ``obj`` as a ``suffix`` file (same encoder options, EXIF,
    16-bit handling); ``name`` is what error messages call it."""
    import io
    buffer = io.BytesIO()
    _writer(obj, FORMATS[suffix], name)(buffer)
    return buffer.getvalue()


def _writer(obj: Image.Image | np.ndarray, fmt: FileFormat, path: object) -> Callable[[Any], None]:
    """Validate ``obj`` for ``fmt`` and return a function writing it to a binary file object."""
    if isinstance(obj, np.ndarray):
        if obj.dtype not in (np.uint8, np.uint16) or obj.ndim not in (2, 3) or (
                obj.ndim == 3 and not 1 <= obj.shape[2] <= 4) or 0 in obj.shape:
            raise ImageError(f"{path}: cannot save a {obj.dtype} array of shape {obj.shape}; expected "
                             "uint8/uint16 HxW or HxWxC (C 1..4), at least 1x1")
        arr = obj if obj.ndim == 2 else obj[:, :, 0] if obj.shape[2] == 1 else obj
        if arr.dtype == np.uint16 and arr.ndim == 3:
            if fmt.pil != "PNG":
                raise ImageError(f"{path}: 16-bit colour can only be saved as .png here; "
                                 "use .png or convert to uint8")
            return lambda f: _write_png16(arr, f)
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
        img = Image.fromarray(arr)  # L, LA, RGB, RGBA or I;16 from dtype and shape
    elif isinstance(obj, Image.Image):
        img = obj
    else:
        raise ImageError(f"{path}: cannot save a {type(obj).__name__}; pass a PIL image or a numpy array")
    if img.mode in (*DEEP_GRAY, "F") and img.mode not in fmt.deep:
        # Pillow's 8-bit encoders (WebP, TGA, ...) clip such samples without a word: refuse instead.
        keeps = ".tif" if img.mode == "F" else ".png or .tif"
        depth = "float" if img.mode == "F" else "16-bit"
        raise ImageError(f"{path}: {fmt.pil} cannot store this {depth} image (mode {img.mode}) without "
                         f"losing precision; save as {keeps}, or convert it to 8-bit yourself")
    if img.mode == "I" and fmt.pil == "PNG":   # Pillow writes no 32-bit PNG; 0..65535 (as read here) fits 16 bits
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageError(f"{path}: PNG cannot store this 32-bit image (values {values.min()}..{values.max()}, "
                             "outside 0..65535); save as .tif")
        img = Image.fromarray(values.astype(np.uint16))
    if not fmt.alpha and ("A" in img.mode or "transparency" in img.info):
        raise ImageError(f"{path}: {fmt.pil} cannot store the alpha channel of this {img.mode} image; "
                         "save as .png (or drop alpha yourself)")
    options = dict(_SAVE_OPTIONS.get(fmt.pil, {}))
    exif = img.info.get("exif")
    exif = exif.tobytes() if isinstance(exif, Image.Exif) else exif
    too_long = bool(exif) and fmt.max_exif is not None and len(exif) > fmt.max_exif
    if exif and fmt.exif and not too_long:
        options["exif"] = exif   # Pillow writes EXIF only when asked; the orientation must survive
    elif exif:   # no EXIF in this format: turn the pixels so that the file still displays the same way
        img = ImageOps.exif_transpose(img)
        if too_long:
            warnings.warn(f"{path}: its EXIF ({len(exif)} bytes) is longer than {fmt.pil} can hold ({fmt.max_exif}); "
                          "written without EXIF, the orientation applied to the pixels", ImageWarning, stacklevel=4)
    return lambda f: img.save(f, format=fmt.pil, **options)


def _write_png16(arr: np.ndarray, f: Any) -> None:
    """Write uint16 ``[H, W, C]`` (C = 2 gray+alpha, 3 RGB, 4 RGBA) as a 16-bit PNG: Pillow has no
    such mode. Filter 0 on every row keeps this short; zlib still compresses smooth images well."""
    h, w, c = arr.shape
    rows = np.zeros((h, 1 + w * c * 2), np.uint8)  # each row: filter byte 0 ("none"), then big-endian samples
    rows[:, 1:] = arr.astype(">u2").reshape(h, w * c).view(np.uint8)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    colour_type = {2: 4, 3: 2, 4: 6}[c]
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------- mask
def mask_to_image(mask: torch.Tensor) -> Image.Image:
    """Bool mask ``[H, W]``, ``[1, H, W]`` or ``[1, 1, H, W]`` -> 8-bit L image, 255 where True."""
    if mask.dtype != torch.bool or mask.ndim < 2 or any(s != 1 for s in mask.shape[:-2]):
        raise ImageError(f"expected a bool mask HxW or 1x1xHxW, got {mask.dtype} {tuple(mask.shape)}")
    m = mask.detach().reshape(mask.shape[-2:]).to("cpu", torch.uint8) * 255
    return Image.fromarray(m.numpy())
