"""Image input/output: files, PIL images, numpy arrays and torch tensors to the network's
``float32 [B, 3, H, W]`` in 0..1, and back to what the user gave, bit-exact where nothing changed.

The one contract that shapes this module: a pixel the network did not change is returned
**bit-identical** to the user's input. ``restore`` therefore takes those pixels from the original
data (kept in its own dtype), never from a float round trip; alpha is never touched at all.
"""
from __future__ import annotations

import math
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import M2AEError
from .formats import DEEP_GRAY
from .messages import one_line, shown

__all__ = ["ImageError", "ImageWarning", "DEEP_GRAY", "PreparedImage", "load_image", "prepare_image",
           "check_tensor"]


class ImageError(M2AEError, ValueError):
    """A bad image or path; the message is one line naming the problem and the fix."""


class ImageWarning(UserWarning):
    """An image that runs, but not entirely as given (e.g. only the first frame of an animation)."""


# --------------------------------------------------------------------------------------------- load
# Containers a user may hand the image reader by mistake: named in its error, with what to do instead.
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp"})


def load_image(path: str | os.PathLike[str], name: str | None = None) -> Image.Image:
    """Open ``path`` with Pillow, decode it fully and apply its EXIF orientation.

    Raises ImageError (never a bare Pillow error) for a missing file, a directory, an empty,
    unrecognised, truncated or corrupt file, a decompression bomb and a 0-sized image. Messages name the file
    ``name`` (default: the path, control characters escaped), e.g. "request body" for bytes a service saved.
    """
    try:
        p = os.fspath(path)
    except TypeError:
        raise ImageError(f"expected a file path, got {type(path).__name__}") from None
    return _load(p, shown(p) if name is None else name)


def _load(p: str, name: str) -> Image.Image:
    """:func:`load_image` of the path ``p``, shown in messages as ``name`` (control characters escaped)."""
    if not os.path.exists(p):
        raise ImageError(f"{name}: no such file; check the path")
    if os.path.isdir(p):
        raise ImageError(f"{name}: is a directory, not an image; pass an image file (PNG, JPEG, TIFF, ...)")
    if os.path.getsize(p) == 0:
        raise ImageError(f"{name}: empty file (0 bytes); re-export or re-download it")
    try:
        # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; a bomb must stop here.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as opened:
                opened.load()
                frames = getattr(opened, "n_frames", 1)
                depth = _deep_colour_read_as_8_bit(p, opened)
                img = ImageOps.exif_transpose(opened)  # a decoded copy: the file can close
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: refused, too many pixels ({one_line(e)}); if you trust the file, "
                         "raise PIL.Image.MAX_IMAGE_PIXELS") from e
    except UnidentifiedImageError as e:
        size = _png_declared_size(p)
        if size is not None and 0 in size:   # Pillow's PNG reader refuses these without saying why
            raise ImageError(f"{name}: image has size {size[0]}x{size[1]} (HxW); it must be at least 1x1") from e
        variant = _tiff_variant(p)
        if variant:   # a TIFF that tifffile and others write but Pillow cannot decode
            raise ImageError(f"{name}: a TIFF variant Pillow cannot read ({variant}); convert it to 8- or 16-bit "
                             "gray, RGB or RGBA (TIFF or PNG)") from e
        if Path(p).suffix.lower() in VIDEO_SUFFIXES:
            raise ImageError(f"{name}: a video; this reads images: pass its frames (e.g. ffmpeg -i {Path(p).name} "
                             "frames/%05d.png, then the folder), or score a static-camera clip with m2ae-eval --set "
                             "video --video FILE") from e
        raise ImageError(f"{name}: not an image or an unrecognised format; "
                         "use PNG, JPEG, TIFF, BMP or WebP") from e
    except PermissionError as e:
        raise ImageError(f"{name}: permission denied; check the file's permissions") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageError(f"{name}: cannot decode, truncated or corrupt ({one_line(e)}); "
                         "re-export or re-download it") from e
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{name}: image has size {img.height}x{img.width} (HxW); it must be at least 1x1")
    _warn_frames(name, frames)
    if depth:
        warnings.warn(f"{name}: {depth}-bit colour is decoded at 8 bits per channel (a Pillow limit), so the output "
                      "is 8-bit", ImageWarning, stacklevel=2)
    return img


def _deep_colour_read_as_8_bit(path: str, opened: Image.Image) -> int:
    """The file's bits per sample when Pillow decoded a colour (or gray+alpha) image of more than 8 bits into an
    8-bit mode (16-bit RGB/RGBA/LA PNGs and TIFFs), else 0. 16-bit gray keeps its depth and gives 0."""
    if opened.mode not in ("RGB", "RGBA", "LA", "P", "PA"):
        return 0
    if opened.format == "PNG":
        try:
            with open(path, "rb") as f:
                head = f.read(26)
        except OSError:
            return 0
        if head[12:16] == b"IHDR" and head[24] > 8:   # IHDR: width, height, bit depth, colour type
            return head[24]
        return 0
    if opened.format == "TIFF":
        bits = getattr(opened, "tag_v2", {}).get(258, ())   # BitsPerSample
        bits = bits if isinstance(bits, tuple) else (bits,)
        return max(bits) if bits and max(bits) > 8 else 0
    return 0


def _warn_frames(source: str, frames: int) -> None:
    if frames > 1:   # animated GIF/PNG/WebP, multi-page TIFF: the output is the first frame alone
        warnings.warn(f"{source}: {frames} frames (animated or multi-page); only the first frame is "
                      "deblurred", ImageWarning, stacklevel=3)


def _png_declared_size(path: str) -> tuple[int, int] | None:
    """(H, W) from a PNG file's IHDR chunk, or None if the file does not start like a PNG."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or not head.startswith(b"\x89PNG\r\n\x1a\n") or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return height, width


_PHOTOMETRIC = {0: "gray", 1: "gray", 2: "RGB", 3: "palette", 4: "mask", 5: "CMYK", 6: "YCbCr", 8: "CIELab",
                9: "CIELab", 10: "CIELab", 32844: "LogL", 32845: "LogLuv"}
_SAMPLE_FORMAT = {1: "unsigned", 2: "signed", 3: "float", 4: "untyped", 5: "complex int", 6: "complex float"}


def _tiff_variant(path: str) -> str:
    """What a TIFF that Pillow could not open holds, from its first directory's tags (nothing decoded):
    e.g. ``"CMYK + alpha, 5 samples of 8-bit unsigned"``; empty when ``path`` is no readable TIFF."""
    from PIL import TiffImagePlugin
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if head[:4] not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
                return ""
            ifd = TiffImagePlugin.ImageFileDirectory_v2(head if head[2:4] in (b"+\0", b"\0+") else head[:8])
            f.seek(ifd.next)
            ifd.load(f)
        samples = int(ifd.get(277, 1))
        bits = ifd.get(258, (1,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        kind = ifd.get(339, (1,))
        kind = kind[0] if isinstance(kind, tuple) else kind
        extra = ifd.get(338, ())
        colour = _PHOTOMETRIC.get(int(ifd.get(262, -1)), f"photometric {ifd.get(262, '?')}")
    except Exception:  # noqa: BLE001 - explaining a failure must not fail: fall back to "not an image"
        return ""
    alpha = " + alpha" if extra and (extra if isinstance(extra, tuple) else (extra,))[0] in (1, 2) else \
        f" + {len(extra) if isinstance(extra, tuple) else 1} extra" if extra else ""
    depth = "/".join(str(b) for b in dict.fromkeys(bits))
    plural = "s" if samples != 1 else ""
    return f"{colour}{alpha}, {samples} sample{plural} of {depth}-bit {_SAMPLE_FORMAT.get(int(kind), 'unknown')}"


# ------------------------------------------------------------------------------------------ prepare
@dataclass
class PreparedImage:
    """An image as the network sees it, plus what is needed to give it back in the user's form.

    Attributes:
        rgb: float32 ``[B, 3, H, W]`` in 0..1, on the CPU, never sharing memory with the input; dense in
            the input's layout (channels-last for numpy and PIL pixels, which are HWC; NCHW for NCHW tensors).
            Gray inputs are replicated to 3 channels; alpha is split off. Built on first
            access (4 bytes per sample: tiled runs never build it, they read :meth:`region` by region).

    The input's pixels are referenced, not copied (numpy and torch inputs share memory): do not
    modify the input between ``prepare_image`` and ``restore``.
    """

    # Original pixels ``[B, C, H, W]`` in the input's dtype and device, C = colour (1 or 3) + alpha (0/1).
    _original: torch.Tensor = field(repr=False)
    _colour: int = field(repr=False)
    _scale: float | None = field(repr=False)  # 255 / 65535 for integers, None for floats
    _finish: Callable[[torch.Tensor], Any] = field(repr=False)  # [B, C, H, W] -> the user's kind
    _rgb: torch.Tensor | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, 3, H, W)``: the shape of :attr:`rgb`."""
        b, _, h, w = self._original.shape
        return b, 3, h, w

    @property
    def rgb(self) -> torch.Tensor:
        if self._rgb is None:
            _, _, h, w = self.shape
            self._rgb = self.region(0, h, 0, w)
        return self._rgb

    def region(self, top: int, bottom: int, left: int, right: int) -> torch.Tensor:
        """float32 ``[B, 3, bottom - top, right - left]`` in 0..1: the rows ``top:bottom`` and columns
        ``left:right`` of :attr:`rgb`, in a fresh CPU buffer (never aliasing the input)."""
        col = self._original[:, : self._colour, top:bottom, left:right]
        b, _, h, w = col.shape
        # Move first, widen in copy_: a narrow dtype crosses PCIe. Channels-last when the input is (numpy and PIL
        # pixels are HWC): a plain copy instead of a transpose, and the layout oneDNN's convolutions want.
        layout = torch.channels_last if self._original.stride(1) == 1 else torch.contiguous_format
        rgb = torch.empty((b, 3, h, w), dtype=torch.float32, memory_format=layout)
        rgb.copy_(col.to("cpu").expand(b, 3, h, w))
        if self._scale is not None:
            rgb /= self._scale
        return rgb

    def band(self, top: int, bottom: int) -> torch.Tensor:
        """:meth:`region` of the rows ``top:bottom``, every column."""
        return self.region(top, bottom, 0, self.shape[-1])

    def new_output(self) -> torch.Tensor:
        """A copy of the original pixels ``[B, C, H, W]`` (input dtype and device) for :meth:`paste` to fill."""
        return self._original.clone()

    def paste(self, out: torch.Tensor, restored: torch.Tensor, changed: torch.Tensor, top: int = 0,
              left: int = 0) -> None:
        """Write a restored region into ``out`` (from :meth:`new_output`) at ``(top, left)``, in place.

        ``restored`` float ``[B, 3, h, w]`` and ``changed`` bool ``[B, 1, h, w]`` as in :meth:`restore`; pixels
        where ``changed`` is False get the original's, bit for bit; alpha (what ``out`` holds) is never touched.
        """
        c, h, w = self._colour, restored.shape[-2], restored.shape[-1]
        target = out[:, :c, top:top + h, left:left + w]
        source = self._original[:, :c, top:top + h, left:left + w]   # == target where restore left it empty
        torch.where(changed.to(out.device), self._encode(restored, out), source, out=target)

    def _encode(self, restored: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The network output as the colour values of ``out``: clamped to 0..1, gray as ``(r + g + b) / 3``,
        integers ``round(x * scale)``, in ``out``'s dtype and device."""
        x = restored.detach().to(out.device, torch.float32).clamp(0.0, 1.0)
        if self._colour == 1:
            x = (x[:, 0:1] + x[:, 1:2] + x[:, 2:3]) / 3.0
        x = (x * self._scale).round() if self._scale is not None else x
        return x.to(out.dtype)

    def _encode_into(self, restored: torch.Tensor, colour: torch.Tensor) -> None:
        """:meth:`_encode` written into ``colour`` (``out``'s colour channels): where encoding is a clamp only
        (RGB float32), clamped straight into it, one pass instead of two."""
        if self._colour == 3 and self._scale is None and colour.dtype == restored.dtype == torch.float32:
            torch.clamp(restored.detach().to(colour.device), 0.0, 1.0, out=colour)
        else:
            colour.copy_(self._encode(restored, colour))

    def finish(self, out: torch.Tensor) -> Any:
        """``out`` ``[B, C, H, W]`` (from :meth:`new_output`) as the input's kind, dtype and shape."""
        return self._finish(out)

    @property
    def round_trips(self) -> bool:
        """Whether :attr:`rgb` converts back to the original pixels exactly (RGB or RGBA colour in float32,
        uint8 or uint16: ``round(k / 255 * 255) == k`` for every k): then a network output that equals
        :attr:`rgb` outside the pixels it changed needs no ``changed`` mask in :meth:`restore`."""
        return self._colour == 3 and self._original.dtype in (torch.float32, torch.uint8, torch.uint16)

    def restore(self, restored: torch.Tensor, changed: torch.Tensor | None) -> Any:
        """Convert the network output back to the input's kind, dtype and shape.

        Args:
            restored: float32 ``[B, 3, H, W]``; clamped to 0..1. Gray inputs get
                ``(r + g + b) / 3`` (in float32, in that order).
            changed: bool ``[B, 1, H, W]``, True where the network changed the pixel; or None where
                ``restored`` equals :attr:`rgb` bit for bit outside the pixels it changed (every backend's
                contract) and :attr:`round_trips`: then every pixel is converted, with the same result.

        Integers are ``round(x * 255)`` / ``round(x * 65535)`` (half to even); floats are cast.
        Pixels where ``changed`` is False, and all alpha, are copied from the original data.
        """
        b, _, h, w = self.shape
        if tuple(restored.shape) != (b, 3, h, w):
            raise ValueError(f"restored has shape {tuple(restored.shape)}, expected {(b, 3, h, w)}")
        if changed is None:
            if not self.round_trips:
                raise ValueError("changed=None needs an input whose pixels round-trip (RGB float32/uint8/uint16)")
            out = torch.empty_like(self._original) if self._original.shape[1] == 3 else self.new_output()
            self._encode_into(restored, out[:, :3])
            return self._finish(out)
        if tuple(changed.shape) != (b, 1, h, w) or changed.dtype != torch.bool:
            raise ValueError(f"changed must be bool {(b, 1, h, w)}, "
                             f"got {changed.dtype} {tuple(changed.shape)}")
        if self._original.shape[1] == self._colour:    # no alpha: every output pixel is written by paste's where
            out = torch.empty_like(self._original)      # (strides as the input's: finish needs no transpose)
        else:
            out = self.new_output()
        self.paste(out, restored, changed)
        return self._finish(out)


def prepare_image(img: Any) -> PreparedImage:
    """Turn a path, PIL image, numpy array or torch tensor into a :class:`PreparedImage`.

    - path / PIL image: mode kept when Pillow can write it back (L, LA, RGB, RGBA, I;16*, I, F);
      P/PA become RGB or RGBA (alpha kept when the palette has transparency), L/RGB with a single
      transparent colour (PNG tRNS) become LA/RGBA, "1" becomes L,
      CMYK/YCbCr/LAB/HSV/RGBX become RGB. I and I;16* are 16-bit gray (0..65535); F must lie in 0..1.
      ``restore`` returns a PIL image in that (converted) mode, with the input's ICC profile, dpi and EXIF
      (orientation included) in its ``info``: the pixels are the stored ones, so it displays like the input.
      A multi-frame image warns (ImageWarning): only its first frame is used.
    - numpy ``[H, W]`` or ``[H, W, C]``, C in {1, 2, 3, 4} (2 = gray+alpha, 4 = RGBA); uint8, uint16 or
      float in 0..1. A read-only array is used as is, not copied.
    - torch ``[C, H, W]`` or ``[B, C, H, W]``, C in {1, 2, 3, 4}; uint8 or float16/bfloat16/float32/float64
      in 0..1, any device. ``restore`` returns the same shape, dtype and device.
    """
    if isinstance(img, (str, os.PathLike)):
        return _prepare_pil(load_image(img), source=shown(img))
    if isinstance(img, Image.Image):
        return _prepare_pil(img, source="PIL image")
    if isinstance(img, np.ndarray):
        return _prepare_numpy(img)
    if isinstance(img, torch.Tensor):
        return _prepare_tensor(img)
    raise ImageError(f"unsupported image type {type(img).__name__}: pass a file path, a PIL image, "
                     "a numpy array (HxW or HxWxC) or a torch tensor (CxHxW or BxCxHxW)")


def _flat_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` ``[B, C, H, W]`` as one flat view when its memory is dense in NCHW or channels-last order."""
    if t.is_contiguous():
        return t.view(-1)
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return None


def _make(orig: torch.Tensor, colour: int, scale: float | None, finish: Callable[[torch.Tensor], Any],
          what: str) -> PreparedImage:
    """orig: ``[B, C, H, W]`` in its own dtype/device -> PreparedImage (validates sizes and ranges)."""
    b, _, h, w = orig.shape
    if b == 0:
        raise ImageError(f"{what} has batch size 0; pass at least one image")
    if h == 0 or w == 0:
        raise ImageError(f"{what} has size {h}x{w} (HxW); it must be at least 1x1")
    col = orig[:, :colour]
    if scale is None:  # floats: the network's 0..1 range is a promise the caller must keep
        # one pass: aminmax propagates NaN, and an Inf is the min or the max; over the flat memory when the
        # colour is all of it (a strided reduction over HWC pixels is 6x slower)
        flat = _flat_view(orig) if colour == orig.shape[1] else None
        lo, hi = (float(v) for v in torch.aminmax(col if flat is None else flat))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ImageError(f"{what} contains NaN or Inf; replace them (e.g. nan_to_num) first")
        if lo < 0.0 or hi > 1.0:
            raise ImageError(f"{what} values lie in [{lo:.6g}, {hi:.6g}], outside 0..1; "
                             "scale to 0..1 (e.g. divide 8-bit data by 255) or pass integer data")
    # rgb (built lazily by PreparedImage.region) is a fresh buffer: it must never alias the caller's data,
    # or an in-place op in the network would corrupt the pixels restore passes through.
    return PreparedImage(orig, colour, scale, finish)


# Pillow modes converted on input (kept modes are listed in _PIL_KEEP).
_PIL_CONVERT = {"1": "L", "PA": "RGBA", "La": "LA", "RGBa": "RGBA", "RGBX": "RGB", "CMYK": "RGB",
                "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}
_PIL_KEEP = {"L": 1, "LA": 1, "RGB": 3, "RGBA": 3, "I;16": 1, "I;16L": 1, "I;16B": 1, "I;16N": 1,
             "I": 1, "F": 1}  # mode -> colour channels


def _prepare_pil(img: Image.Image, source: str) -> PreparedImage:
    try:
        img.load()  # a lazily opened user image may still be undecoded
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{source}: cannot decode ({one_line(e)}); re-export or re-download it") from e
    if img.width == 0 or img.height == 0:
        raise ImageError(f"{source}: image has size {img.height}x{img.width} (HxW); it must be at least 1x1")
    _warn_frames(source, getattr(img, "n_frames", 1))   # as load_image does for a path
    mode = img.mode
    if mode == "P":
        mode = "RGBA" if "transparency" in img.info else "RGB"
    mode = _PIL_CONVERT.get(mode, mode)
    if "transparency" in img.info and mode in ("L", "RGB"):
        # A PNG's single transparent colour (tRNS) becomes an alpha channel, as for palette images: the
        # network may move pixels onto or off that colour, and the output must stay transparent where it was.
        mode += "A"
    elif "transparency" in img.info and mode in DEEP_GRAY:
        warnings.warn(f"{source}: its transparent gray value is dropped (16-bit gray with alpha has no "
                      "Pillow mode); pass a numpy HxWx2 uint16 array to keep alpha", ImageWarning, stacklevel=3)
    if mode not in _PIL_KEEP:
        raise ImageError(f"{source}: unsupported Pillow mode {img.mode!r}; convert it to RGB first")
    if mode != img.mode:
        img = img.convert(mode)
    arr = np.array(img)  # a writable copy (np.asarray is read-only and torch warns about that)
    np_dtype = arr.dtype
    arr = arr.astype(np_dtype.newbyteorder("="), copy=False)  # I;16B is big-endian; torch wants native
    if mode == "I":  # 32-bit int: Pillow's historical 16-bit gray; other ranges have no meaning here
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ImageError(f"{source}: mode 'I' values lie in [{lo}, {hi}]; only 0..65535 is "
                             "supported: convert it to 16-bit or to float 0..1")
    scale = None if mode == "F" else 255.0 if arr.dtype == np.uint8 else 65535.0
    hwc = arr[:, :, None] if arr.ndim == 2 else arr
    orig = torch.from_numpy(hwc).permute(2, 0, 1)[None]
    # Carry colour metadata and EXIF so a saved result looks the same as its input. The EXIF keeps its
    # orientation: the pixels come back as stored, so the tag must stay to display them the same way
    # (a path's image was already turned upright by load_image, which removed the tag).
    info = {k: img.info[k] for k in ("icc_profile", "dpi") if k in img.info}
    exif = img.info.get("exif") or (img.getexif().tobytes() if len(img.getexif()) else None)
    if exif:
        info["exif"] = exif

    size = img.size  # not img itself: the closure must not keep the decoded input alive

    def finish(out: torch.Tensor) -> Image.Image:
        data = np.ascontiguousarray(out[0].permute(1, 2, 0).numpy()).astype(np_dtype, copy=False)
        res = Image.frombuffer(mode, size, data, "raw", mode, 0, 1)
        res.info.update(info)
        return res

    return _make(orig, _PIL_KEEP[mode], scale, finish, what=f"{source} (mode {mode})")


def _prepare_numpy(arr: np.ndarray) -> PreparedImage:
    what = f"{arr.dtype} array of shape {arr.shape}"
    if not (arr.dtype.kind == "u" and arr.itemsize <= 2 or arr.dtype.kind == "f" and arr.itemsize <= 8):
        raise ImageError(f"unsupported array dtype {arr.dtype}; use uint8, uint16 or float32 in 0..1")
    scale = None if arr.dtype.kind == "f" else 255.0 if arr.itemsize == 1 else 65535.0
    if arr.ndim == 2:
        hwc = arr[:, :, None]
    elif arr.ndim == 3 and arr.shape[2] in (1, 2, 3, 4):
        hwc = arr
    else:
        raise ImageError(f"unsupported array shape {arr.shape}; expected HxW or HxWxC with C in 1, 2, 3, 4 "
                         "(gray, gray+alpha, RGB, RGBA)")
    shape, dtype = arr.shape, arr.dtype
    native = np.ascontiguousarray(hwc, dtype=dtype.newbyteorder("="))
    with warnings.catch_warnings():
        # A read-only array (np.asarray of a PIL image) is shared, not copied: nothing ever writes through
        # ``orig`` (new_output clones it), so torch's warning about non-writable arrays does not apply.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        orig = torch.from_numpy(native).permute(2, 0, 1)[None]

    def finish(out: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy().reshape(shape).astype(dtype, copy=False))

    return _make(orig, 1 if hwc.shape[2] <= 2 else 3, scale, finish, what)


_TENSOR_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t: torch.Tensor, what: str) -> None:
    """A tensor whose pixels can be read: strided (not sparse, MKL-DNN, ...) and on the CPU or a CUDA device
    (a meta tensor holds no data). ImageError, one line, otherwise."""
    if t.layout != torch.strided or t.is_mkldnn:
        layout = "mkldnn" if t.is_mkldnn else str(t.layout).replace("torch.", "")
        raise ImageError(f"{what} has the {layout} layout; pass a dense tensor (e.g. t.to_dense())")
    if t.device.type not in ("cpu", "cuda"):
        hint = "it holds no data" if t.device.type == "meta" else "it cannot be read here"
        raise ImageError(f"{what} is on the {t.device.type} device ({hint}); pass a CPU or CUDA tensor")


def _prepare_tensor(t: torch.Tensor) -> PreparedImage:
    what = f"{t.dtype} tensor of shape {tuple(t.shape)}"
    check_tensor(t, what)
    if t.dtype != torch.uint8 and t.dtype not in _TENSOR_FLOATS:
        raise ImageError(f"unsupported tensor dtype {t.dtype}; use uint8 or float16/bfloat16/float32 in 0..1")
    scale = 255.0 if t.dtype == torch.uint8 else None
    if t.ndim not in (3, 4) or t.shape[-3] not in (1, 2, 3, 4):
        raise ImageError(f"unsupported tensor shape {tuple(t.shape)}; "
                         "expected CxHxW or BxCxHxW with C in 1, 2, 3, 4 (gray, gray+alpha, RGB, RGBA)")
    batched = t.ndim == 4
    orig = t.detach() if batched else t.detach()[None]

    def finish(out: torch.Tensor) -> torch.Tensor:
        return out.contiguous() if batched else out[0].contiguous()

    return _make(orig, 1 if orig.shape[1] <= 2 else 3, scale, finish, what)
