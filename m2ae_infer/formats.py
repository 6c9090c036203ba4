"""The table of image file formats (:data:`FORMATS`): which suffixes are read from folders and written, and what
each format holds. Plain data, no imaging library imported: the CLI reads it before torch or Pillow load.

Readers are :mod:`m2ae_infer.imgio`, writers :mod:`m2ae_infer.imgsave`.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEEP_GRAY", "FileFormat", "FORMATS", "writable_suffixes"]

DEEP_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")   # Pillow's 16-bit gray modes ("I": 0..65535 here)


@dataclass(frozen=True)
class FileFormat:
    """How one file suffix is read and written (see :data:`FORMATS`).

    Attributes:
        pil: Pillow's format name.
        deep: Pillow modes above 8 bits per sample the format stores exactly; any other such mode is refused
            (an 8-bit-only encoder would clip 16-bit and float samples silently).
        alpha: whether it stores an alpha channel (else alpha is refused, never dropped).
        exif: whether it stores EXIF (else an EXIF orientation is applied to the pixels before writing).
        max_exif: the most EXIF bytes it stores (JPEG: one APP1 segment); longer EXIF is dropped as for a format
            without EXIF, with an :class:`~m2ae_infer.ImageWarning`.
        lossless: unchanged pixels come back bit-identical from the file.
        refused: why outputs in this format are refused (read only), or None.
    """

    pil: str
    deep: tuple[str, ...] = ()
    alpha: bool = True
    exif: bool = False
    max_exif: int | None = None
    lossless: bool = True
    refused: str | None = None


# The one table of image file suffixes: folder inputs are the files with these suffixes; save_image and
# m2ae-deblur write those without ``refused``. A path with another suffix can still be read (any image Pillow
# opens) but not written.
_PNG = FileFormat("PNG", deep=DEEP_GRAY, exif=True)
_TIFF = FileFormat("TIFF", deep=(*DEEP_GRAY, "F"), exif=True)
# 65533: Pillow's MAX_BYTES_IN_MARKER, the payload of one JPEG APP1 segment
_JPEG = FileFormat("JPEG", alpha=False, exif=True, max_exif=65533, lossless=False)   # quality 95, see _SAVE_OPTIONS
FORMATS: dict[str, FileFormat] = {
    ".png": _PNG, ".tif": _TIFF, ".tiff": _TIFF, ".jpg": _JPEG, ".jpeg": _JPEG,
    ".bmp": FileFormat("BMP", alpha=False),
    ".webp": FileFormat("WEBP", exif=True),   # written losslessly
    ".tga": FileFormat("TGA"),
    ".gif": FileFormat("GIF", refused="GIF's 256-colour palette would change pixels outside the blur mask"),
    ".ico": FileFormat("ICO", refused="icons are scaled to icon sizes (at most 256x256)"),
}


def writable_suffixes() -> list[str]:
    """The suffixes :func:`m2ae_infer.imgsave.save_image` writes, in the table's order."""
    return [ext for ext, f in FORMATS.items() if f.refused is None]
