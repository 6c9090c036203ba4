"""File formats: what is read and written, and that nothing is clipped, dropped or changed silently.

Every expectation is what Pillow itself decodes from the file (or numpy on the input), never a value
computed by m2ae_infer.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2ae_infer import imgsave
from m2ae_infer.imgio import ImageError, prepare_image
from m2ae_infer.imgsave import save_image, save_images

RNG = np.random.default_rng(99)
# Every suffix the module claims to write, and the ones it refuses; the lists are spelled out here so that
# a change to imgsave.FORMATS shows up as a failing test.
WRITABLE = [".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".webp", ".tga"]
LOSSLESS = [s for s in WRITABLE if s not in (".jpg", ".jpeg")]
READ_ONLY = [".gif", ".ico"]


def test_the_table_is_what_the_tests_expect() -> None:
    assert imgsave.writable_suffixes() == WRITABLE
    assert sorted(imgsave.FORMATS) == sorted(WRITABLE + READ_ONLY)


def _deep(mode: str) -> Image.Image:
    """A 16-bit, 32-bit int or float image whose values do not fit 8 bits."""
    if mode == "F":
        return Image.fromarray(RNG.random((6, 9)).astype(np.float32))
    values = RNG.integers(256, 65536, (6, 9))
    return Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.int32))


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
@pytest.mark.parametrize("ext", WRITABLE)
def test_deep_images_are_written_exactly_or_refused(tmp_path: Path, ext: str, mode: str) -> None:
    """16-bit / int / float to an 8-bit-only format must fail loudly, never come back clipped."""
    img = _deep(mode)
    path = tmp_path / f"out{ext}"
    try:
        save_image(img, path)
    except ImageError as e:
        assert "\n" not in str(e) and (".png" in str(e) or ".tif" in str(e))
        assert os.listdir(tmp_path) == []
        return
    with Image.open(path) as back:
        np.testing.assert_array_equal(np.array(back).astype(np.float64), np.array(img).astype(np.float64))


@pytest.mark.parametrize("ext", LOSSLESS)
@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_8bit_lossless_formats_round_trip_or_refuse(tmp_path: Path, ext: str, mode: str) -> None:
    """Lossless formats give the pixels back; a format without alpha refuses alpha instead of dropping it."""
    channels = {"L": (), "LA": (2,), "RGB": (3,), "RGBA": (4,)}[mode]
    arr = RNG.integers(0, 256, (5, 7, *channels), dtype=np.uint8)
    path = tmp_path / f"out{ext}"
    try:
        save_image(arr, path)
    except ImageError as e:
        assert "A" in mode and "alpha" in str(e) and ".png" in str(e)
        return
    with Image.open(path) as back:
        got = np.array(back.convert(mode))   # WebP decodes L as RGB: same values
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("ext", READ_ONLY + [".ppm", ".xyz"])
def test_formats_that_would_change_pixels_are_refused(tmp_path: Path, ext: str) -> None:
    with pytest.raises(ImageError, match=r"\.png") as err:
        save_image(RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8), tmp_path / f"out{ext}")
    assert "\n" not in str(err.value) and os.listdir(tmp_path) == []


def test_save_images_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second file failing to encode leaves the first file's old content in place."""
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(b"USER")

    def broken(arr, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(imgsave, "_write_png16", broken)   # the 16-bit colour writer of the second file
    with pytest.raises(ImageError, match="No space left"):
        save_images([(RNG.integers(0, 256, (4, 4), dtype=np.uint8), first),
                     (RNG.integers(0, 65536, (4, 4, 3), dtype=np.uint16), second)], overwrite=True)
    assert first.read_bytes() == b"USER" and sorted(os.listdir(tmp_path)) == ["a.png"]


# ------------------------------------------------------------------------- single-colour transparency
@pytest.mark.parametrize("mode,transparent", [("L", 5), ("RGB", (1, 2, 3))], ids=["L", "RGB"])
def test_png_single_transparent_colour_becomes_alpha(tmp_path: Path, mode: str, transparent) -> None:
    shape = (6, 8) if mode == "L" else (6, 8, 3)
    arr = RNG.integers(0, 256, shape, dtype=np.uint8)
    arr[0, 0], arr[3, 5] = transparent, transparent
    path = tmp_path / "trns.png"
    Image.fromarray(arr).save(path, transparency=transparent)
    with Image.open(path) as src:
        expected = np.array(src.convert(mode + "A"))      # Pillow's own reading of the tRNS chunk
        assert (expected[..., -1] == 0).sum() >= 2
        out = prepare_image(src)
        back = out.restore(out.rgb, torch.zeros((1, 1, 6, 8), dtype=torch.bool))
    assert back.mode == mode + "A"
    np.testing.assert_array_equal(np.array(back), expected)
    save_image(back, tmp_path / "out.png")
    with Image.open(tmp_path / "out.png") as saved:
        np.testing.assert_array_equal(np.array(saved.convert(mode + "A")), expected)


def test_webp_keeps_the_colour_of_transparent_pixels(tmp_path: Path) -> None:
    """libwebp rewrites invisible pixels' RGB unless told to keep them exact; outside the mask they must not move."""
    rgba = RNG.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    rgba[::2, ::3, 3] = 0
    save_image(rgba, tmp_path / "t.webp")
    with Image.open(tmp_path / "t.webp") as back:
        assert np.array_equal(np.asarray(back.convert("RGBA")), rgba)


def test_32bit_int_gray_to_png_is_written_as_16_bit_or_refused(tmp_path: Path) -> None:
    values = RNG.integers(0, 65536, (6, 7)).astype(np.int32)
    save_image(Image.fromarray(values, mode="I"), tmp_path / "i.png")
    with Image.open(tmp_path / "i.png") as back:
        assert np.array_equal(np.asarray(back).astype(np.int64), values)
    values[0, 0] = 70000
    with pytest.raises(ImageError, match=r"outside 0\.\.65535.*\.tif"):
        save_image(Image.fromarray(values, mode="I"), tmp_path / "big.png")
    assert not (tmp_path / "big.png").exists()


@pytest.mark.parametrize("name", ["m" * 251 + ".png", "é" * 125 + "m.png"])   # 255 bytes each
def test_longest_file_names_can_be_written(tmp_path: Path, name: str) -> None:
    assert len(name.encode()) == 255
    save_image(RNG.integers(0, 256, (3, 4, 3), dtype=np.uint8), tmp_path / name)
    assert os.listdir(tmp_path) == [name]


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_16_bit_colour_read_at_8_bits_says_so(tmp_path: Path, channels: int) -> None:
    """Pillow decodes 16-bit colour PNGs at 8 bits: the loss is a documented limit, never silent."""
    from m2ae_infer.imgio import ImageWarning, load_image
    path = tmp_path / "deep.png"
    save_image(RNG.integers(0, 65536, (5, 6, channels), dtype=np.uint16), path)   # a true 16-bit PNG
    with Image.open(path) as raw:
        assert raw.mode in ("RGB", "RGBA", "LA")            # what Pillow itself makes of it
    with pytest.warns(ImageWarning, match="16-bit colour is decoded at 8 bits"):
        load_image(path)
    save_image(RNG.integers(0, 65536, (5, 6), dtype=np.uint16), tmp_path / "gray.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # 16-bit gray keeps its depth: no warning
        assert load_image(tmp_path / "gray.png").mode.startswith("I")
