"""Tests for m2ae_infer.imgio: every input kind round-trips, unchanged pixels and alpha come back
bit-identical, bad inputs give one-line ImageErrors, and saving is atomic.

Expected values are computed here with numpy/Pillow, independently of the code under test.
"""
from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image

from m2ae_infer import imgio
from m2ae_infer.imgio import ImageError, load_image, prepare_image
from m2ae_infer.imgsave import mask_to_image, save_image

RNG = np.random.default_rng(1234)


def _u8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def _u16(*shape: int) -> np.ndarray:
    return RNG.integers(0, 65536, shape, dtype=np.uint16)


def _f(dtype: Any, *shape: int) -> np.ndarray:
    return RNG.random(shape).astype(dtype)


def _to_numpy(obj: Any) -> np.ndarray:
    """Output of restore -> numpy array of the same values (bfloat16 widened, exactly, to float32)."""
    if isinstance(obj, Image.Image):
        return np.array(obj)
    if isinstance(obj, torch.Tensor):
        return (obj.float() if obj.dtype == torch.bfloat16 else obj).cpu().numpy()
    return obj


def _assert_one_line_error(fn: Callable[[], Any], *fragments: str) -> str:
    with pytest.raises(ImageError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and msg.strip(), repr(msg)
    for frag in fragments:
        assert frag.lower() in msg.lower(), (frag, msg)
    return msg


# ---------------------------------------------------------------------------------- input kinds
def _png(tmp: Path, img: Image.Image, name: str = "in.png", **kw: Any) -> Path:
    p = tmp / name
    img.save(p, **kw)
    return p


def _palette(transparent: bool) -> Image.Image:
    img = Image.fromarray(_u8(5, 7, 3)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    if transparent:
        img.info["transparency"] = 0
    return img


def _saved(tmp: Path, img: Image.Image, name: str = "in.png") -> tuple[Path, np.ndarray, str]:
    """Save ``img``; expect it back exactly as Pillow decodes the file, in the same mode."""
    path = _png(tmp, img, name)
    with Image.open(path) as ref:
        return path, np.array(ref), ref.mode


def _saved_converted(tmp: Path, img: Image.Image, name: str, mode: str) -> tuple[Path, np.ndarray, str]:
    """Save ``img``; expect it back as Pillow's own conversion of the decoded file to ``mode``."""
    path = _png(tmp, img, name)
    with Image.open(path) as ref:
        return path, np.array(ref.convert(mode)), mode


# name -> factory(tmp) returning (path, expected output values, expected output mode)
PATH_CASES: dict[str, Callable[[Path], tuple[Path, np.ndarray, str]]] = {
    "png-RGB": lambda t: _saved(t, Image.fromarray(_u8(5, 7, 3))),
    "png-RGBA": lambda t: _saved(t, Image.fromarray(_u8(5, 7, 4))),
    "png-L": lambda t: _saved(t, Image.fromarray(_u8(3, 2))),
    "png-LA": lambda t: _saved(t, Image.fromarray(_u8(1, 1, 2))),
    "png-I16": lambda t: _saved(t, Image.fromarray(_u16(5, 7))),
    "jpeg-RGB": lambda t: _saved(t, Image.fromarray(_u8(5, 7, 3)), "in.jpg"),
    "png-1": lambda t: _saved_converted(t, Image.fromarray(_u8(3, 2) > 127), "in.png", "L"),
    "png-P": lambda t: _saved_converted(t, _palette(False), "in.png", "RGB"),
    "png-P-transparent": lambda t: _saved_converted(t, _palette(True), "in.png", "RGBA"),
    "tiff-CMYK": lambda t: _saved_converted(t, Image.fromarray(_u8(3, 2, 4)).convert("CMYK"), "in.tif",
                                            "RGB"),
}

ARRAY_CASES: dict[str, Callable[[], Any]] = {
    "np-u8-HW": lambda: _u8(5, 7),
    "np-u8-HWC1": lambda: _u8(3, 2, 1),
    "np-u8-HWC3": lambda: _u8(5, 7, 3),
    "np-u8-HWC4": lambda: _u8(1, 1, 4),
    "np-u16-HW": lambda: _u16(3, 2),
    "np-u16-HWC3": lambda: _u16(5, 7, 3),
    "np-u16-HWC4-bigendian": lambda: _u16(3, 2, 4).astype(">u2"),
    "np-f32-HW": lambda: _f(np.float32, 5, 7),
    "np-f32-HWC1": lambda: _f(np.float32, 1, 1, 1),
    "np-f32-HWC3": lambda: _f(np.float32, 3, 2, 3),
    "np-f64-HWC4": lambda: _f(np.float64, 5, 7, 4),
    "np-f32-HWC3-noncontiguous": lambda: _f(np.float32, 7, 5, 3).transpose(1, 0, 2)[::-1],
    "pil-RGB": lambda: Image.fromarray(_u8(5, 7, 3)),
    "pil-LA": lambda: Image.fromarray(_u8(3, 2, 2)),
    "pil-I16": lambda: Image.fromarray(_u16(5, 7)),
    "pil-I16B": lambda: Image.fromarray(_u16(3, 2).astype(">u2")),
    "pil-I": lambda: Image.fromarray(RNG.integers(0, 65536, (3, 2), dtype=np.int32)),
    "pil-F": lambda: Image.fromarray(_f(np.float32, 3, 2)),
    "torch-u8-CHW3": lambda: torch.from_numpy(_u8(3, 5, 7)),
    "torch-u8-BCHW4": lambda: torch.from_numpy(_u8(2, 4, 3, 2)),
    "torch-u8-CHW1": lambda: torch.from_numpy(_u8(1, 1, 1)),
    "torch-f32-BCHW3": lambda: torch.from_numpy(_f(np.float32, 2, 3, 5, 7)),
    "torch-f32-CHW1": lambda: torch.from_numpy(_f(np.float32, 1, 3, 2)),
    "torch-f16-CHW4": lambda: torch.from_numpy(_f(np.float16, 4, 5, 7)),
    "torch-f16-BCHW1": lambda: torch.from_numpy(_f(np.float16, 2, 1, 3, 2)),
    "torch-bf16-CHW3": lambda: torch.from_numpy(_f(np.float32, 3, 3, 2)).bfloat16(),
    "torch-f64-BCHW3": lambda: torch.from_numpy(_f(np.float64, 1, 3, 5, 7)),
}


def _all_true(prep: imgio.PreparedImage) -> torch.Tensor:
    b, _, h, w = prep.rgb.shape
    return torch.ones(b, 1, h, w, dtype=torch.bool)


def _check_rgb(prep: imgio.PreparedImage) -> None:
    rgb = prep.rgb
    assert rgb.dtype == torch.float32 and rgb.device.type == "cpu"
    # dense in one of the two layouts: channels-last for HWC inputs (numpy, PIL), NCHW for NCHW tensors
    hwc = prep._original.stride(1) == 1
    assert rgb.is_contiguous(memory_format=torch.channels_last if hwc else torch.contiguous_format)
    assert rgb.ndim == 4 and rgb.shape[1] == 3
    assert 0.0 <= float(rgb.min()) and float(rgb.max()) <= 1.0


@pytest.mark.parametrize("case", PATH_CASES)
@pytest.mark.parametrize("as_str", [False, True], ids=["Path", "str"])
def test_round_trip_path(tmp_path: Path, case: str, as_str: bool) -> None:
    path, expected, mode = PATH_CASES[case](tmp_path)
    prep = prepare_image(str(path) if as_str else path)
    _check_rgb(prep)
    out = prep.restore(prep.rgb, _all_true(prep))
    assert isinstance(out, Image.Image) and out.mode == mode
    got = np.array(out)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("case", ARRAY_CASES)
def test_round_trip_in_memory(case: str) -> None:
    x = ARRAY_CASES[case]()
    prep = prepare_image(x)
    _check_rgb(prep)
    out = prep.restore(prep.rgb, _all_true(prep))
    assert isinstance(out, Image.Image) if isinstance(x, Image.Image) else type(out) is type(x)
    if isinstance(x, Image.Image):
        assert out.mode == x.mode and out.size == x.size
    else:
        assert out.shape == x.shape and out.dtype == x.dtype
    if isinstance(x, torch.Tensor):
        assert out.device == x.device
    got, want = _to_numpy(out), _to_numpy(x)
    if want.dtype.kind in "ui":
        np.testing.assert_array_equal(got, want)
    else:  # gray is averaged from 3 equal channels: an ulp of float32 may move
        tol = {2: 1e-3, 4: 1e-6, 8: 1e-6}[x.element_size() if isinstance(x, torch.Tensor) else want.itemsize]
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)


# ------------------------------------------------------------------------- passthrough contract
def _canonical(x: Any) -> np.ndarray:
    """Input -> numpy [B, H, W, C] in its own dtype (independent of imgio's layout handling)."""
    if isinstance(x, Image.Image):
        a = np.array(x)
        return (a[..., None] if a.ndim == 2 else a)[None]
    if isinstance(x, torch.Tensor):
        a = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
        return np.moveaxis(a if a.ndim == 4 else a[None], 1, -1)
    return (x[..., None] if x.ndim == 2 else x)[None]


@pytest.mark.parametrize("case", [
    "np-u8-HWC4", "np-u16-HW", "np-u16-HWC4-bigendian", "np-f32-HWC3", "np-f64-HWC4", "np-f32-HWC1",
    "pil-LA", "pil-I16", "pil-I", "pil-F", "torch-u8-BCHW4", "torch-f16-BCHW1", "torch-f64-BCHW3",
])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_unchanged_pixels_and_alpha_are_bit_identical(case: str, density: float) -> None:
    x = ARRAY_CASES[case]()
    orig = _canonical(x).copy()
    prep = prepare_image(x)
    b, _, h, w = prep.rgb.shape
    # Out-of-range values check the clamp; every changed pixel gets a visibly different value.
    modified = 1.2 - 1.4 * prep.rgb + 0.05 * torch.arange(3.0).view(1, 3, 1, 1)
    changed = torch.from_numpy(RNG.random((b, 1, h, w)) < density)
    out = prep.restore(modified, changed)

    colour = 1 if orig.shape[-1] in (1, 2) else 3
    m = np.clip(np.moveaxis(modified.numpy(), 1, -1), np.float32(0), np.float32(1))  # [B, H, W, 3]
    if colour == 1:
        m = (m[..., 0:1] + m[..., 1:2] + m[..., 2:3]) / np.float32(3)
    dt = orig.dtype
    if dt.kind in "ui":
        top = np.float32(255 if dt.itemsize == 1 else 65535)
        conv = np.round(m * top).astype(dt)
    else:
        conv = m.astype(dt)
    mask = np.moveaxis(changed.numpy(), 1, -1)
    want = orig.copy()
    want[..., :colour] = np.where(mask, conv, orig[..., :colour])

    got = _canonical(out)
    assert got.shape == want.shape and got.dtype == want.dtype
    # tobytes: exact bits (an equality test would let -0.0 == 0.0 or a NaN slip through)
    assert got[~mask[..., 0]].tobytes() == orig[~mask[..., 0]].tobytes()
    assert got[..., colour:].tobytes() == orig[..., colour:].tobytes()
    np.testing.assert_array_equal(got, want)


def test_restore_rejects_wrong_shapes() -> None:
    prep = prepare_image(_u8(3, 2, 3))
    with pytest.raises(ValueError):
        prep.restore(torch.zeros(1, 3, 2, 3), torch.ones(1, 1, 3, 2, dtype=torch.bool))
    with pytest.raises(ValueError):
        prep.restore(prep.rgb, torch.ones(1, 1, 3, 2))  # not bool


@pytest.mark.parametrize("case", ["torch-f32-BCHW3", "np-f32-HWC3", "torch-f64-BCHW3"])
def test_rgb_never_aliases_the_input(case: str) -> None:
    x = ARRAY_CASES[case]()
    before = _canonical(x).copy()
    prep = prepare_image(x)
    prep.rgb.mul_(0.5)  # a network working in place must not reach the caller's pixels
    np.testing.assert_array_equal(_canonical(x), before)
    out = prep.restore(prep.rgb, torch.zeros_like(prep.rgb[:, :1], dtype=torch.bool))
    assert _canonical(out).tobytes() == before.tobytes()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float16, torch.float32])
def test_tensor_comes_back_on_its_device(device: str, dtype: torch.dtype) -> None:
    x = torch.from_numpy(_u8(2, 4, 3, 2)).to(device)
    x = x if dtype == torch.uint8 else (x / 255).to(dtype)
    prep = prepare_image(x)
    assert prep.rgb.device.type == "cpu"
    changed = torch.zeros_like(prep.rgb[:, :1], dtype=torch.bool)
    changed[:, :, 0] = True
    out = prep.restore(1.0 - prep.rgb, changed)
    assert out.device == x.device and out.dtype == x.dtype and out.shape == x.shape
    assert torch.equal(out[:, :, 1:], x[:, :, 1:]) and torch.equal(out[:, 3], x[:, 3])


# ------------------------------------------------------------------------------------------ EXIF
@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_exif_orientation_is_applied(tmp_path: Path, ext: str) -> None:
    # Orientation 6: the stored pixels must be turned 90° clockwise to display upright.
    stored = np.zeros((2, 3, 3), np.uint8)  # H=2, W=3; one bright corner marks the orientation
    stored[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"rot{ext}"
    Image.fromarray(stored).save(path, exif=exif, **({"quality": 100} if ext == ".jpg" else {}))
    img = load_image(path)
    assert img.size == (2, 3)  # (W, H) swapped
    upright = np.rot90(stored, k=-1)
    got = np.array(img)
    if ext == ".png":
        np.testing.assert_array_equal(got, upright)
    else:  # JPEG is lossy: the bright corner must still be top-right
        assert got[0, -1].mean() > 150 and got[-1, 0].mean() < 100


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "TIFF", "WEBP"])
def test_several_frames_warn_and_load_the_first(tmp_path: Path, fmt: str) -> None:
    frames = [Image.new("RGB", (5, 4), (value, 255 - value, 0)) for value in (0, 128, 255)]
    path = tmp_path / f"frames.{fmt.lower()}"
    lossless = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], **lossless)
    with pytest.warns(imgio.ImageWarning, match="3 frames .* only the first frame"):
        img = load_image(path)
    np.testing.assert_array_equal(np.asarray(img.convert("RGB")), np.asarray(frames[0]))


def test_a_single_frame_does_not_warn(tmp_path: Path) -> None:
    Image.new("RGB", (5, 4)).save(tmp_path / "one.gif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(tmp_path / "one.gif")


# ------------------------------------------------------------------------------------ bad inputs
BAD_INPUTS: dict[str, tuple[Callable[[], Any], tuple[str, ...]]] = {
    "list": (lambda: [[0, 1], [1, 0]], ("list",)),
    "None": (lambda: None, ("NoneType",)),
    "np-ndim1": (lambda: _u8(5), ("shape",)),
    "np-ndim4": (lambda: _u8(1, 2, 3, 3), ("shape",)),
    "np-C5": (lambda: _u8(2, 3, 5), ("shape",)),
    "np-int32": (lambda: np.zeros((2, 3), np.int32), ("int32",)),
    "np-bool": (lambda: np.zeros((2, 3), bool), ("bool",)),
    "np-complex": (lambda: np.zeros((2, 3), np.complex64), ("complex64",)),
    "np-nan": (lambda: np.array([[0.5, np.nan]], np.float32), ("NaN",)),
    "np-inf": (lambda: np.array([[0.5, np.inf]], np.float64), ("Inf",)),
    "np-range": (lambda: np.array([[0.0, 255.0]], np.float32), ("255", "scale to 0..1")),
    "np-negative": (lambda: np.array([[-0.5, 1.0]], np.float32), ("-0.5", "scale to 0..1")),
    "np-zero-H": (lambda: np.zeros((0, 5), np.uint8), ("0x5",)),
    "np-zero-W": (lambda: np.zeros((4, 0, 3), np.float32), ("4x0",)),
    "torch-ndim2": (lambda: torch.zeros(2, 3), ("shape",)),
    "torch-ndim5": (lambda: torch.zeros(1, 1, 3, 2, 2), ("shape",)),
    "torch-C5": (lambda: torch.zeros(5, 4, 4), ("shape",)),
    "torch-int32": (lambda: torch.zeros(3, 2, 2, dtype=torch.int32), ("int32",)),
    "torch-bool": (lambda: torch.zeros(3, 2, 2, dtype=torch.bool), ("bool",)),
    "torch-complex": (lambda: torch.zeros(3, 2, 2, dtype=torch.complex64), ("complex64",)),
    "torch-nan": (lambda: torch.tensor([[[0.5, float("nan")]]]), ("NaN",)),
    "torch-f16-range": (lambda: torch.full((3, 2, 2), 2.0, dtype=torch.float16), ("2", "scale to 0..1")),
    "torch-zero-size": (lambda: torch.zeros(3, 0, 4), ("0x4",)),
    "torch-batch0": (lambda: torch.zeros(0, 3, 4, 4), ("batch size 0",)),
    "pil-zero-size": (lambda: Image.new("RGB", (0, 3)), ("3x0",)),
    "pil-F-range": (lambda: Image.fromarray(np.full((2, 2), 3.0, np.float32)), ("scale to 0..1",)),
    "pil-I-range": (lambda: Image.fromarray(np.full((2, 2), 70000, np.int32)), ("70000",)),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_raises_one_line_error(case: str) -> None:
    make, fragments = BAD_INPUTS[case]
    x = make()
    _assert_one_line_error(lambda: prepare_image(x), *fragments)


def _missing(t: Path) -> Path:
    return t / "nope.png"


def _written(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(t: Path) -> Path:
        (t / name).write_bytes(data)
        return t / name
    return make


def _truncated_png(t: Path) -> Path:
    full = t / "full.png"
    Image.fromarray(_u8(40, 40, 3)).save(full)
    return _written("cut.png", full.read_bytes()[:200])(t)


BAD_FILES: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "missing": (_missing, ("no such file",)),
    "directory": (lambda t: t, ("directory",)),
    "empty": (_written("e.png", b""), ("empty",)),
    "text-as-png": (_written("x.png", b"hello\nworld\n"), ("not an image",)),
    "truncated": (_truncated_png, ("truncated",)),
    # an MP4's first box: the reader names a video and says what to pass instead
    "video": (_written("clip.MP4", b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + bytes(64)),
              ("a video", "frames", "m2ae-eval --set video")),
}


@pytest.mark.parametrize("case", BAD_FILES)
@pytest.mark.parametrize("via", ["load_image", "prepare_image"])
def test_bad_file_raises_one_line_error(tmp_path: Path, case: str, via: str) -> None:
    make, fragments = BAD_FILES[case]
    path = make(tmp_path)
    fn = load_image if via == "load_image" else prepare_image
    msg = _assert_one_line_error(lambda: fn(path), *fragments)
    assert str(path) in msg


@pytest.mark.parametrize("pixels", [9 * 9, 5 * 5], ids=["bomb-error", "bomb-warning"])
def test_decompression_bomb_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pixels: int) -> None:
    side = int(pixels ** 0.5)
    path = _png(tmp_path, Image.fromarray(_u8(side, side)))
    # > 2x the limit: Pillow raises; between 1x and 2x: Pillow only warns, imgio must still refuse.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)
    _assert_one_line_error(lambda: load_image(path), "too many pixels", "MAX_IMAGE_PIXELS")


# ------------------------------------------------------------------------------------------- save
SAVE_CASES: dict[str, Callable[[], Any]] = {
    "u8-HW": lambda: _u8(5, 7),
    "u8-HWC1": lambda: _u8(3, 2, 1),
    "u8-HWC3": lambda: _u8(5, 7, 3),
    "u8-HWC4": lambda: _u8(1, 1, 4),
    "u16-HW": lambda: _u16(3, 2),
    "pil-LA": lambda: Image.fromarray(_u8(3, 2, 2)),
    "pil-I16": lambda: Image.fromarray(_u16(5, 7)),
}


@pytest.mark.parametrize("case", SAVE_CASES)
@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_save_round_trip_is_exact(tmp_path: Path, case: str, ext: str) -> None:
    obj = SAVE_CASES[case]()
    path = tmp_path / f"out{ext}"
    save_image(obj, path)
    want = np.array(obj) if isinstance(obj, Image.Image) else obj.reshape(obj.shape[:2]) if obj.ndim == 3 \
        and obj.shape[2] == 1 else obj
    with Image.open(path) as img:
        np.testing.assert_array_equal(np.array(img), want)
    assert os.listdir(tmp_path) == [path.name]  # no temp file left behind


def _decode_png16(data: bytes) -> tuple[int, np.ndarray]:
    """Tiny independent PNG reader for filter-0 16-bit files: (colour type, [H, W, C] uint16)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body)
        hdr = struct.unpack(">IIBBBBB", body) if tag == b"IHDR" else hdr
        idat += body if tag == b"IDAT" else b""
        pos += 12 + n
    w, h, depth, ctype = hdr[:4]
    c = {4: 2, 2: 3, 6: 4}[ctype]
    assert depth == 16
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * c * 2)
    assert (rows[:, 0] == 0).all()
    return ctype, rows[:, 1:].copy().view(">u2").reshape(h, w, c).astype(np.uint16)


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_save_16bit_colour_png(tmp_path: Path, channels: int) -> None:
    a = _u16(3, 5, channels)
    path = tmp_path / "deep.png"
    save_image(a, path)
    _, back = _decode_png16(path.read_bytes())
    np.testing.assert_array_equal(back, a)
    with Image.open(path) as img:  # Pillow accepts the file (it keeps the high bytes of colour)
        img.load()
    _assert_one_line_error(lambda: save_image(a, tmp_path / "deep.tif"), ".png")


def test_save_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    save_image(_u8(3, 2), path)
    before = path.read_bytes()
    _assert_one_line_error(lambda: save_image(_u8(3, 2, 3), path), "exists", "overwrite")
    assert path.read_bytes() == before
    new = _u8(3, 2, 3)
    save_image(new, path, overwrite=True)
    np.testing.assert_array_equal(np.array(Image.open(path)), new)
    assert sorted(os.listdir(tmp_path)) == ["x.png"]


SAVE_FAILURES: dict[str, tuple[Callable[[Path], tuple[Any, Path]], tuple[str, ...]]] = {
    "unknown-ext": (lambda t: (_u8(3, 2), t / "x.xyz"), (".xyz",)),
    "no-ext": (lambda t: (_u8(3, 2), t / "x"), ("extension",)),
    "missing-folder": (lambda t: (_u8(3, 2), t / "no" / "x.png"), ("does not exist",)),
    "jpeg-alpha": (lambda t: (_u8(3, 2, 4), t / "x.jpg"), ("alpha", ".png")),
    "jpeg-LA": (lambda t: (Image.fromarray(_u8(3, 2, 2)), t / "x.jpeg"), ("alpha",)),
    "jpeg-I16": (lambda t: (Image.fromarray(_u16(3, 2)), t / "x.jpg"), ("16-bit", ".png")),
    "webp-F": (lambda t: (Image.fromarray(_f(np.float32, 3, 2)), t / "x.webp"), ("float", ".tif")),
    "gif": (lambda t: (_u8(3, 2, 3), t / "x.gif"), ("palette", ".png")),
    "float-array": (lambda t: (_f(np.float32, 3, 2), t / "x.png"), ("float32",)),
    "tensor": (lambda t: (torch.zeros(3, 2, 2), t / "x.png"), ("Tensor",)),
}


@pytest.mark.parametrize("case", SAVE_FAILURES)
@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-existing"])
def test_save_failure_leaves_nothing_behind(tmp_path: Path, case: str, existing: bool) -> None:
    obj, path = SAVE_FAILURES[case][0](tmp_path)
    if existing and path.parent.is_dir():
        path.write_bytes(b"old")
    before = sorted(os.listdir(tmp_path))
    _assert_one_line_error(lambda: save_image(obj, path, overwrite=True), *SAVE_FAILURES[case][1])
    assert sorted(os.listdir(tmp_path)) == before  # no temp file, no new file
    if existing and path.exists():
        assert path.read_bytes() == b"old"  # never half-written


def test_save_failure_at_rename_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(imgio.os, "replace", broken_replace)
    path = tmp_path / "x.png"
    path.write_bytes(b"old")
    _assert_one_line_error(lambda: save_image(_u8(3, 2), path, overwrite=True), "No space left")
    assert os.listdir(tmp_path) == ["x.png"] and path.read_bytes() == b"old"


def test_saved_file_has_normal_permissions(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    save_image(_u8(2, 2), path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------------------------------------- mask
@pytest.mark.parametrize("shape", [(5, 7), (1, 5, 7), (1, 1, 5, 7), (1, 1)])
def test_mask_to_image(shape: tuple[int, ...]) -> None:
    mask = torch.from_numpy(RNG.random(shape) < 0.5)
    img = mask_to_image(mask)
    assert img.mode == "L" and img.size == (shape[-1], shape[-2])
    np.testing.assert_array_equal(np.array(img), mask.numpy().reshape(shape[-2:]).astype(np.uint8) * 255)


@pytest.mark.parametrize("mask", [torch.zeros(5, 7), torch.zeros(2, 1, 5, 7, dtype=torch.bool),
                                  torch.zeros(7, dtype=torch.bool)], ids=["float", "batch2", "1d"])
def test_mask_to_image_rejects_bad_masks(mask: torch.Tensor) -> None:
    _assert_one_line_error(lambda: mask_to_image(mask), "mask")


# ----------------------------------------------------------------------------------- issue 18
def _big_exif_image(description_bytes: int, orientation: int = 6) -> Image.Image:
    img = Image.fromarray(_u8(5, 9, 3))
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010E] = "x" * description_bytes      # ImageDescription
    img.info["exif"] = exif.tobytes()
    return img


def test_exif_longer_than_jpeg_holds_is_dropped_with_a_warning(tmp_path: Path) -> None:
    """Issue 18: > 64 KB of EXIF to JPEG failed with 'check the folder is writable'. Now the EXIF is dropped, the
    orientation applied to the pixels (so the file displays like the image), and an ImageWarning says so."""
    from PIL import ImageOps
    img = _big_exif_image(70000)
    with pytest.warns(imgio.ImageWarning, match=r"EXIF \(\d+ bytes\) is longer than JPEG can hold \(65533\)"):
        save_image(img, tmp_path / "big.jpg")
    with Image.open(tmp_path / "big.jpg") as back:
        assert "exif" not in back.info and back.size == ImageOps.exif_transpose(img).size == (5, 9)
    # the reference: EXIF that fits is kept, orientation and all, without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_image(_big_exif_image(60000), tmp_path / "fits.jpg")
    with Image.open(tmp_path / "fits.jpg") as back:
        assert back.getexif()[0x0112] == 6 and back.size == (9, 5)


@pytest.mark.parametrize("array, kw, variant", [
    (np.zeros((6, 7, 5), np.uint8), dict(photometric="separated", extrasamples=[2]),
     "CMYK + alpha, 5 samples of 8-bit unsigned"),
    (np.zeros((6, 7, 3), np.float32), dict(photometric="rgb"), "RGB, 3 samples of 32-bit float"),
    (np.zeros((6, 7, 4), np.float32), dict(photometric="rgb", extrasamples=[2]),
     "RGB + alpha, 4 samples of 32-bit float"),
    (np.zeros((6, 7), np.float64), {}, "gray, 1 sample of 64-bit float"),
], ids=["cmyk-alpha", "rgb-float32", "rgba-float32", "gray-float64"])
def test_tiff_variants_pillow_cannot_read_are_named(tmp_path: Path, array, kw, variant) -> None:
    """Issue 18: CMYK+alpha and float RGB TIFFs (as tifffile writes them) were 'not an image'."""
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, array, **kw)
    _assert_one_line_error(lambda: load_image(path), f"a TIFF variant Pillow cannot read ({variant})", "16-bit")


def test_existing_output_error_speaks_python(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    save_image(_u8(3, 2), path)
    msg = _assert_one_line_error(lambda: save_image(_u8(3, 2), path), "exists; pass overwrite=True to replace it")
    assert "--force" not in msg


def test_file_names_with_control_characters_are_escaped(tmp_path: Path) -> None:
    path = tmp_path / "a\nb\x1b.png"
    path.write_bytes(b"")
    msg = _assert_one_line_error(lambda: load_image(path), "a\\nb\\x1b.png: empty file")
    assert "\x1b" not in msg
