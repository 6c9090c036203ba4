"""The bad-input corpus: everything a demanding user feeds ``m2ae-deblur``, as one table, generated here.

Each case builds its files in a temp folder and runs the CLI (``main(argv)``, the console script's function).
Every case: no traceback; a non-zero exit code with one-line ``m2ae-deblur: ...`` errors naming the problem,
or (valid but unusual inputs) exit 0 with a correct output; and never anything half-written: no temp file
anywhere, no output for a failed input, an existing file untouched. A batch of the whole image corpus at once
writes the good files, skips and names the bad ones and exits 1. A few cases also run as a real subprocess.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from helpers import GIB, deflated_checkpoint, random_net, shipped_tiling
from PIL import Image

from m2ae_infer import M2AEConfig, save_checkpoint
from m2ae_infer.atomic import TEMP_PREFIX
from m2ae_infer.cli import main

ASSETS = Path(__file__).resolve().parents[1] / "m2ae_infer" / "assets"
# A crop of the example photo where the shipped checkpoint's mask covers ~40 %: outputs hold both kinds of pixel.
PHOTO = np.asarray(Image.open(ASSETS / "example_blurry.png").convert("RGB"))[200:248, 100:164].copy()
TINY = M2AEConfig.from_name("tiny")


# ------------------------------------------------------------------------------------------ builders
def _save(img: Image.Image, **kw) -> Callable[[Path], None]:
    return lambda path: img.save(path, **kw)


def _bytes(data: bytes | Callable[[], bytes]) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data() if callable(data) else data)


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring ``width x height`` RGB with (almost) no pixel data: a decompression bomb's header."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def _corrupt_png() -> bytes:
    data = bytearray(_encoded(Image.fromarray(PHOTO), "PNG"))
    data[len(data) // 2] ^= 0xFF          # one flipped byte inside the compressed pixels
    return bytes(data)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _palette(transparency: bool) -> Image.Image:
    img = Image.fromarray(PHOTO).quantize(colors=32)
    if transparency:
        img.info["transparency"] = 0     # palette entry 0 is transparent (a tRNS chunk)
    return img


def _frames(fmt: str) -> Callable[[Path], None]:
    """An animated PNG or multi-page TIFF of 3 frames, the photo first."""
    frames = [Image.fromarray(PHOTO), Image.fromarray(255 - PHOTO), Image.fromarray(PHOTO[::-1].copy())]
    return lambda path: frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])


def _u16_gray() -> np.ndarray:
    return (PHOTO.mean(axis=2) * 257).astype(np.uint16)


def _symlink_loop(path: Path) -> None:
    os.symlink(path.name, path)          # x.png -> x.png


def _broken_symlink(path: Path) -> None:
    os.symlink(path.parent / "gone.png", path)


def _folder(*files: tuple[str, Callable[[Path], None]]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.mkdir()
        for name, write in files:
            write(path / name)
    return make


class Payload:
    """Pickles to ``pathlib.Path.touch(marker)``: code that runs if a loader ever unpickles it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _state(value: float | None = None) -> dict:
    state = {k: v.clone() for k, v in random_net("tiny", seed=3).state_dict().items()}
    if value is not None:
        state["blocks.0.mix_in.weight"][0, 0, 0, 0] = value
    return state


def _ours(state: dict) -> dict:
    return {"format": "m2ae", "version": 1, "config": TINY.to_dict(), "deploy": False, "state_dict": state, "meta": {}}


def _ckpt_nonfinite_st(path: Path) -> None:
    from safetensors.torch import save_file
    save_file(_state(float("inf")), str(path), metadata={"format": "m2ae", "version": "1", "deploy": "false",
                                                         "config": __import__("json").dumps(TINY.to_dict()),
                                                         "meta": "{}"})


def _ckpt_stored_config_st(**sizes: int) -> Callable[[Path], None]:
    """Tiny weights in our safetensors format whose stored config says ``sizes`` (a hand edit or damage)."""
    def write(path: Path) -> None:
        from safetensors.torch import save_file
        save_file(_state(), str(path), metadata={"format": "m2ae", "version": "1", "deploy": "false", "meta": "{}",
                                                 "config": json.dumps({**TINY.to_dict(), **sizes})})
    return write


def _plain_pickle(obj: Callable[[Path], object]) -> Callable[[Path], None]:
    """``pickle.dump`` with Python's default protocol (4 or 5), as a user might save weights."""
    def write(path: Path) -> None:
        import pickle
        with open(path, "wb") as f:
            pickle.dump(obj(path), f)
    return write


def _ours_st(state: dict, **metadata: str) -> Callable[[Path], None]:
    """``state`` in our safetensors format with the tiny config (``metadata`` overrides entries)."""
    def write(path: Path) -> None:
        from safetensors.torch import save_file
        save_file(state, str(path), metadata={"format": "m2ae", "version": "1", "deploy": "false", "meta": "{}",
                                              "config": json.dumps(TINY.to_dict()), **metadata})
    return write


def _zip_bomb(path: Path) -> None:
    """Issue 18: 1 MB of zip that declares a 1 GiB tensor "x" (torch.load used to inflate it before the check)."""
    path.write_bytes(deflated_checkpoint("x", lambda: {"state_dict": {"x": torch.empty(GIB // 4)}}))


def _zip_bomb_beside_the_weights(path: Path) -> None:
    """Our tiny checkpoint with 256 MiB of compressed zeros beside its state dict (the key check cannot see them)."""
    path.write_bytes(deflated_checkpoint("beside", lambda: {**_ours(_state()), "junk": torch.empty(GIB // 16)}))


def _safetensors_declaring(nbytes: int) -> Callable[[Path], None]:
    """A small header declaring a tensor "x" of ``nbytes``, its data a hole of a sparse file (no disk used)."""
    def write(path: Path) -> None:
        header = json.dumps({"x": {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]}}).encode()
        header += b" " * (-len(header) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(8 + len(header) + nbytes)
    return write


def _tiff(array_factory: Callable[[], np.ndarray], **kw) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        tifffile = pytest.importorskip("tifffile")
        tifffile.imwrite(path, array_factory(), **kw)
    return write


def _big_exif(path: Path) -> None:
    """A PNG (named .jpg) whose EXIF is 70 000 bytes: more than a JPEG APP1 segment holds."""
    exif = _exif(1)
    exif[0x010E] = "x" * 70000            # ImageDescription
    Image.fromarray(PHOTO).save(path, format="PNG", exif=exif)


def _dangling_output(case_dir: Path) -> None:
    (case_dir / "out").mkdir()
    os.symlink(case_dir / "nowhere.png", case_dir / "out" / "photo.png")


def _dangling_output_untouched(case_dir: Path) -> None:
    link = case_dir / "out" / "photo.png"
    assert link.is_symlink() and not (case_dir / "nowhere.png").exists(), "written through or over the link"


def _good_ckpt_bytes(suffix: str) -> Callable[[Path], bytes]:
    def read(tmp: Path) -> bytes:
        path = tmp / f"good{suffix}"
        save_checkpoint(random_net("tiny", seed=3), path, overwrite=True)
        data = path.read_bytes()
        path.unlink()
        return data
    return read


# --------------------------------------------------------------------------------------------- checks
def _outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else []


def _expect_image(size_wh: tuple[int, int], mode: str, reference: np.ndarray | None = None,
                  alpha: np.ndarray | None = None) -> Callable[[Path, str], None]:
    """The output is ``size_wh`` in ``mode``; outside its saved mask it equals ``reference`` bit for bit."""
    def check(out: Path, name: str) -> None:
        got = Image.open(out / name)
        assert got.size == size_wh and got.mode == mode, (got.size, got.mode)
        assert got.getexif().get(0x0112, 1) == 1, "the orientation is applied, not left in the EXIF"
        mask = np.asarray(Image.open(out / (Path(name).stem + "_mask.png"))) > 0
        assert mask.shape == size_wh[::-1]
        arr = np.asarray(got)
        if reference is not None:   # lossless formats: unchanged pixels come back bit for bit
            colour = {"RGBA": arr[..., :3], "LA": arr[..., 0]}.get(mode, arr)
            ref = reference[..., :3] if reference.ndim == 3 and reference.shape[2] == 4 else reference
            assert np.array_equal(colour[~mask], ref[~mask])
        if alpha is not None:
            assert np.array_equal(arr[..., -1], alpha), "alpha passes through untouched"
    return check


# ----------------------------------------------------------------------------------------------- table
@dataclass(frozen=True)
class Case:
    """One corpus entry.

    make: writes the input at the given path (file or folder); ckpt: writes the checkpoint to use (None: the
    shipped one); output: ``-o`` relative to the case folder; code: expected exit status; needle: text the
    error must contain (error cases); check: ok cases, called with (output folder, output name).
    """

    make: Callable[[Path], None]
    name: str = "photo.png"
    code: int = 1
    needle: str = ""
    check: Callable[[Path, str], None] | None = None
    ckpt: tuple[str, Callable[[Path], None]] | None = None
    extra: tuple[str, ...] = ()
    output: str = "out"
    after: Callable[[Path], None] | None = None       # extra assertions, given the case folder
    setup: Callable[[Path], None] | None = None       # prepares the case folder before the run
    warning: str = ""                                 # ok cases: text of the one-line warning they must print

    @property
    def ok(self) -> bool:
        return self.code == 0


GOOD = _save(Image.fromarray(PHOTO))
PNG_BYTES = lambda: _encoded(Image.fromarray(PHOTO), "PNG")  # noqa: E731
JPG_BYTES = lambda: _encoded(Image.fromarray(PHOTO), "JPEG", quality=90)  # noqa: E731
H, W = PHOTO.shape[:2]


def _marker_not_created(case_dir: Path) -> None:
    assert not (case_dir / "MARKER").exists(), "pickled code ran"


def _input_untouched(case_dir: Path) -> None:
    assert (case_dir / "in" / "photo.png").read_bytes() == PNG_BYTES()


def _old_output_untouched(case_dir: Path) -> None:
    assert (case_dir / "out" / "photo.png").read_bytes() == b"old"


def _unwritable(case_dir: Path) -> None:
    folder = case_dir / "readonly"
    folder.mkdir()
    folder.chmod(0o555)


CASES: dict[str, Case] = {
    # ---- broken or fake image files: the file fails, reported, exit 1
    "empty-file": Case(_bytes(b""), needle="empty"),
    "truncated-png": Case(_bytes(lambda: PNG_BYTES()[:300]), needle="truncated"),
    "truncated-jpeg": Case(_bytes(lambda: JPG_BYTES()[: len(JPG_BYTES()) // 2]), "photo.jpg", needle="truncated"),
    "corrupt-png-data": Case(_bytes(_corrupt_png), needle="corrupt"),
    "random-bytes-jpg": Case(_bytes(bytes(range(256)) * 8), "photo.jpg", needle="not an image"),
    "text-file-as-png": Case(_bytes(b"this is not a picture\n"), needle="not an image"),
    "html-as-webp": Case(_bytes(b"<!doctype html><title>404</title>"), "photo.webp", needle="not an image"),
    "pdf-as-tiff": Case(_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"), "photo.tif", needle="not an image"),
    "png-0x0": Case(_bytes(_png_header_only(0, 0)), needle="size 0x0"),
    "png-0-wide": Case(_bytes(_png_header_only(0, 7)), needle="size 7x0"),
    "decompression-bomb": Case(_bytes(_png_header_only(60000, 60000)), needle="too many pixels"),
    "bomb-warning-zone": Case(_bytes(_png_header_only(10000, 10000)), needle="MAX_IMAGE_PIXELS"),
    "missing-file": Case(lambda p: None, needle="no such file"),
    "broken-symlink": Case(_broken_symlink, needle="broken symlink"),
    "symlink-loop": Case(_symlink_loop, needle="symlink loop"),
    "empty-folder": Case(_folder(), "photos", needle="holds no images"),
    "folder-without-images": Case(_folder(("notes.txt", _bytes(b"x")), ("raw.cr2", _bytes(b"x"))), "photos",
                                  needle="holds no images"),
    "folder-named-like-an-image": Case(_folder(), "photo.png", needle="holds no images"),
    "folder-with-symlink-loop": Case(_folder(("a.png", _symlink_loop)), "photos", needle="symlink loop"),
    # ---- outputs that must not be written
    "output-is-the-input": Case(GOOD, output="in/photo.png", extra=("--force",), needle="input itself",
                                after=_input_untouched),
    "output-folder-is-input-folder": Case(GOOD, output="in", extra=("--force",), needle="input itself",
                                          after=_input_untouched),
    "output-exists-without-force": Case(GOOD, output="out/photo.png", needle="exists",
                                        after=_old_output_untouched),
    "output-folder-unwritable": Case(GOOD, output="readonly/out", code=2, needle="cannot write to output folder"),
    "output-under-a-file": Case(GOOD, output="in/photo.png/out", code=2, needle="cannot write to output folder"),
    "alpha-to-jpeg": Case(_save(Image.fromarray(PHOTO).convert("RGBA")), output="out/photo.jpg", needle="alpha"),
    "output-is-a-dangling-symlink": Case(GOOD, output="out/photo.png", needle="exists; pass --force to overwrite it",
                                         setup=_dangling_output, after=_dangling_output_untouched),
    "name-with-a-newline": Case(_bytes(b""), "ph\noto.png", needle="ph\\noto.png: empty file"),
    "cmyk-alpha-tiff": Case(_tiff(lambda: np.dstack([PHOTO, PHOTO[..., :2]]), photometric="separated",
                                  extrasamples=[2]), "photo.tif", needle="CMYK + alpha, 5 samples of 8-bit"),
    "float32-rgb-tiff": Case(_tiff(lambda: PHOTO.astype(np.float32) / 255, photometric="rgb"), "photo.tif",
                             needle="RGB, 3 samples of 32-bit float"),
    "mask-name-collides": Case(_folder(("a.png", GOOD), ("a_mask.png", GOOD)), "photos", code=2,
                               needle="both write"),
    # ---- checkpoints: the model cannot load, exit 2, nothing run
    "ckpt-truncated-pth": Case(GOOD, code=2, needle="truncated or corrupt",
                               ckpt=("net.pth", lambda p: p.write_bytes(_good_ckpt_bytes(".pth")(p.parent)[:5000]))),
    "ckpt-truncated-safetensors": Case(GOOD, code=2, needle="net.safetensors", ckpt=(
        "net.safetensors", lambda p: p.write_bytes(_good_ckpt_bytes(".safetensors")(p.parent)[:3000]))),
    "ckpt-corrupt-safetensors-header": Case(GOOD, code=2, needle="net.safetensors", ckpt=(
        "net.safetensors",
        lambda p: p.write_bytes(_good_ckpt_bytes(".safetensors")(p.parent)[:9] + b"\xff" * 40
                                + _good_ckpt_bytes(".safetensors")(p.parent)[49:]))),
    "ckpt-random-bytes": Case(GOOD, code=2, needle="unrecognized content",
                              ckpt=("net.pth", _bytes(bytes(range(256)) * 16))),
    "ckpt-empty": Case(GOOD, code=2, needle="empty", ckpt=("net.pth", _bytes(b""))),
    "ckpt-is-a-png": Case(GOOD, code=2, needle="unrecognized content", ckpt=("net.pth", _bytes(PNG_BYTES))),
    "ckpt-torch-named-safetensors": Case(GOOD, code=2, needle="extension says", ckpt=(
        "net.safetensors", lambda p: p.write_bytes(_good_ckpt_bytes(".pth")(p.parent)))),
    "ckpt-wrong-architecture": Case(GOOD, code=2, needle="does not fit M2AENet",
                                    ckpt=("net.pth", lambda p: torch.save(_state(), p))),   # tiny, no config
    "ckpt-foreign-network": Case(GOOD, code=2, needle="missing keys", ckpt=(
        "resnet.pth", lambda p: torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.bias": torch.zeros(10)}, p))),
    "ckpt-pickled-code": Case(GOOD, code=2, needle="refusing to unpickle code", after=_marker_not_created, ckpt=(
        "evil.pth", lambda p: torch.save({"state_dict": _state(), "x": Payload(p.parent / "MARKER")}, p))),
    "ckpt-pickled-code-legacy": Case(GOOD, code=2, needle="refusing to unpickle code", after=_marker_not_created,
                                     ckpt=("evil.pt", lambda p: torch.save(
                                         {"x": Payload(p.parent / "MARKER")}, p, _use_new_zipfile_serialization=False))),
    "ckpt-plain-pickle-code": Case(GOOD, code=2, needle="refusing to unpickle code", after=_marker_not_created,
                                   ckpt=("evil.pth", _plain_pickle(lambda p: {"x": Payload(p.parent / "MARKER")}))),
    "ckpt-plain-pickle-no-code": Case(GOOD, code=2, needle="not a weights-only checkpoint",
                                      ckpt=("plain.pth", _plain_pickle(lambda p: {"weights": [1.0, 2.0]}))),
    "ckpt-absurd-num-blocks": Case(GOOD, code=2, needle="num_blocks must be at most",
                                   ckpt=("huge.safetensors", _ckpt_stored_config_st(num_blocks=10**9))),
    "ckpt-absurd-channels": Case(GOOD, code=2, needle="channels must be at most", ckpt=(
        "huge.pth", lambda p: torch.save({**_ours(_state()), "config": {**TINY.to_dict(), "channels": 10**6}}, p))),
    "ckpt-stored-config-does-not-fit": Case(GOOD, code=2, needle="does not fit M2AENet",
                                            ckpt=("wide.safetensors", _ckpt_stored_config_st(channels=1024))),
    "ckpt-nan-weights": Case(GOOD, code=2, needle="NaN", ckpt=("nan.pth", lambda p: torch.save(_ours(_state(float("nan"))), p))),
    "ckpt-inf-weights-safetensors": Case(GOOD, code=2, needle="non-finite",
                                         ckpt=("inf.safetensors", _ckpt_nonfinite_st)),
    "ckpt-zip-bomb": Case(GOOD, code=2, needle="unexpected keys (1) [x]", ckpt=("bomb.pth", _zip_bomb)),
    "ckpt-zip-bomb-beside-the-weights": Case(GOOD, code=2, needle="refusing to inflate it",
                                             ckpt=("bomb.pth", _zip_bomb_beside_the_weights)),
    "ckpt-safetensors-declaring-1gib": Case(GOOD, code=2, needle="unexpected keys (1) [x]",
                                            ckpt=("huge.safetensors", _safetensors_declaring(GIB))),
    "ckpt-safetensors-header-over-16mib": Case(GOOD, code=2, needle="header length field says", ckpt=(
        "meta.safetensors", _ours_st(_state(), meta=json.dumps({"note": "x" * (17 * 2**20)})))),
    "ckpt-safetensors-header-length-2**40": Case(GOOD, code=2, needle="header length field says 1099511627904", ckpt=(
        "net.safetensors", _bytes(struct.pack("<Q", 0x80 + 2**40) + b'{"x": 1}' + bytes(64)))),
    "ckpt-colliding-prefixes": Case(GOOD, code=2, needle="maps several keys onto one name", ckpt=(
        "ddp.safetensors", lambda p: _ours_st({**_state(), **{f"module.{k}": torch.zeros_like(v)
                                                            for k, v in _state().items()}})(p))),
    "ckpt-nested-json-metadata": Case(GOOD, code=2, needle="nested.safetensors: damaged m2ae metadata", ckpt=(
        "nested.safetensors", _ours_st(_state(), config="[" * 100000 + "]" * 100000))),
    "ckpt-empty-key-after-stripping": Case(GOOD, code=2, needle="unexpected keys (1) ['']", ckpt=(
        "net.safetensors", lambda p: _ours_st({**_state(), "module.": torch.zeros(1)})(p))),
    "ckpt-sparse-tensor": Case(GOOD, code=2, needle="sparse tensors", ckpt=(
        "sparse.pth", lambda p: torch.save(_ours({k: v.to_sparse() if k == "stem.bias" else v
                                                  for k, v in _state().items()}), p))),
    "ckpt-missing": Case(GOOD, code=2, needle="no such file", ckpt=("nope.pth", lambda p: None)),
    "ckpt-is-a-folder": Case(GOOD, code=2, needle="is a directory", ckpt=("dir.pth", lambda p: p.mkdir())),
    "ckpt-onnx-extension": Case(GOOD, code=2, needle="unsupported extension", ckpt=("net.onnx", _bytes(b"\x08\x07"))),
    # ---- options
    "tile-overlap-too-small": Case(GOOD, code=2, needle=f"at least {shipped_tiling()[0]}", extra=("--tile", "64", "--tile-overlap", "8")),
    "negative-tile": Case(GOOD, code=2, needle="tile size must be >= 0", extra=("--tile", "-3")),
    "threshold-out-of-range": Case(GOOD, code=2, needle="threshold", extra=("--threshold", "1.5")),
    # ---- valid but unusual inputs: exit 0 and the right output
    "1x1": Case(_save(Image.fromarray(PHOTO[:1, :1])), code=0, check=_expect_image((1, 1), "RGB", PHOTO[:1, :1])),
    "one-row": Case(_save(Image.fromarray(PHOTO[:1])), code=0, check=_expect_image((W, 1), "RGB", PHOTO[:1])),
    "one-column": Case(_save(Image.fromarray(PHOTO[:, :1])), code=0, check=_expect_image((1, H), "RGB", PHOTO[:, :1])),
    "aspect-3x1500-tiled": Case(_save(Image.fromarray(np.tile(PHOTO[:3], (1, 24, 1))[:, :1500])), code=0,
                                extra=("--tile", str(shipped_tiling()[1])),
                                check=_expect_image((1500, 3), "RGB", np.tile(PHOTO[:3], (1, 24, 1))[:, :1500])),
    "16-bit-gray-png": Case(_save(Image.fromarray(_u16_gray())), code=0,
                            check=_expect_image((W, H), "I;16", _u16_gray())),
    "16-bit-gray-tiff": Case(_save(Image.fromarray(_u16_gray())), "photo.tif", code=0,
                             check=_expect_image((W, H), "I;16", _u16_gray())),
    "palette": Case(_save(_palette(False)), code=0,
                    check=_expect_image((W, H), "RGB", np.asarray(_palette(False).convert("RGB")))),
    "palette-with-transparency": Case(_save(_palette(True), transparency=0), code=0, check=_expect_image(
        (W, H), "RGBA", np.asarray(_palette(True).convert("RGBA")),
        alpha=np.asarray(_palette(True).convert("RGBA"))[..., 3])),
    "gray-alpha": Case(_save(Image.fromarray(np.dstack([PHOTO[..., 0], PHOTO[..., 1]]), "LA")), code=0,
                       check=_expect_image((W, H), "LA", PHOTO[..., 0], alpha=PHOTO[..., 1])),
    "rgba": Case(_save(Image.fromarray(np.dstack([PHOTO, PHOTO[..., :1]]))), code=0,
                 check=_expect_image((W, H), "RGBA", PHOTO, alpha=PHOTO[..., 0])),
    "bilevel-mode-1": Case(_save(Image.fromarray(PHOTO[..., 0] > 128)), code=0,
                           check=_expect_image((W, H), "L", (PHOTO[..., 0] > 128).astype(np.uint8) * 255)),
    "cmyk-jpeg": Case(_save(Image.fromarray(PHOTO).convert("CMYK"), quality=95), "photo.jpg", code=0,
                      check=_expect_image((W, H), "RGB")),
    "exif-rotated-jpeg": Case(_save(Image.fromarray(PHOTO), exif=_exif(6), quality=95), "photo.jpg", code=0,
                              check=_expect_image((H, W), "RGB")),
    "exif-rotated-png": Case(_save(Image.fromarray(PHOTO), exif=_exif(8)), code=0,
                             check=_expect_image((H, W), "RGB", np.rot90(PHOTO, 1))),
    "png-named-jpg": Case(_bytes(PNG_BYTES), "photo.jpg", code=0, check=_expect_image((W, H), "RGB")),
    "bmp": Case(GOOD, "photo.bmp", code=0, check=_expect_image((W, H), "RGB", PHOTO)),
    "webp-lossless": Case(_save(Image.fromarray(PHOTO), lossless=True), "photo.webp", code=0,
                          check=_expect_image((W, H), "RGB", PHOTO)),
    # several frames: the first is deblurred and written, and a one-line warning says so
    "animated-png": Case(_frames("PNG"), code=0, check=_expect_image((W, H), "RGB", PHOTO),
                         warning="3 frames (animated or multi-page); only the first frame is deblurred"),
    "multi-page-tiff": Case(_frames("TIFF"), "photo.tif", code=0, check=_expect_image((W, H), "RGB", PHOTO),
                            warning="3 frames (animated or multi-page); only the first frame is deblurred"),
    # EXIF longer than a JPEG holds: dropped, with a warning (the orientation is applied to the pixels)
    "exif-over-64kb-to-jpeg": Case(_big_exif, "photo.jpg", code=0, check=_expect_image((W, H), "RGB"),
                                   warning="is longer than JPEG can hold (65533)",
                                   after=lambda d: _no_exif(d / "out" / "photo.jpg")),
    # Pillow decodes 16-bit colour PNGs at 8 bits: the output is a correct 8-bit image (README: limits)
    "16-bit-rgb-png": Case(lambda p: _write_png16_rgb(p), code=0, check=_expect_image((W, H), "RGB"),
                           warning="16-bit colour is decoded at 8 bits"),
}


def _no_exif(path: Path) -> None:
    assert "exif" not in Image.open(path).info


def _write_png16_rgb(path: Path) -> None:
    from m2ae_infer.imgsave import save_image
    save_image(PHOTO.astype(np.uint16) * 257, path)


ERRORS = [name for name, case in CASES.items() if not case.ok]
VALID = [name for name, case in CASES.items() if case.ok]


def test_corpus_size():
    # 70 cases (50 errors, 20 valid) before issue 18 added its 14 findings
    assert len(CASES) >= 84 and len(ERRORS) >= 63 and len(VALID) >= 21


def _run_case(case: Case, root: Path, capsys) -> tuple[int, str, str, Path]:
    (root / "in").mkdir()
    if case.output.startswith("readonly"):
        _unwritable(root)
        if os.access(root / "readonly", os.W_OK):     # root ignores permission bits: use a read-only filesystem
            sysfs = Path("/sys")
            if not sysfs.is_dir() or os.access(sysfs, os.W_OK) and _creatable(sysfs):
                pytest.skip("no unwritable folder available here")
            case = Case(case.make, case.name, case.code, case.needle, output=str(sysfs / "m2ae-corpus-out"))
    source = root / "in" / case.name
    case.make(source)
    if case.setup is not None:
        case.setup(root)
    if case.output == "out/photo.png" and case.needle == "exists":
        (root / "out").mkdir()
        (root / "out" / "photo.png").write_bytes(b"old")
    argv = [str(source), "-o", str(root / case.output), "--save-mask", "-q", *case.extra]
    if case.ckpt is not None:
        ckpt_name, write_ckpt = case.ckpt
        write_ckpt(root / ckpt_name)
        argv += ["--checkpoint", str(root / ckpt_name)]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err, root


def _creatable(folder: Path) -> bool:
    try:
        (folder / "m2ae-probe").mkdir()
    except OSError:
        return False
    (folder / "m2ae-probe").rmdir()
    return True


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_corpus(name, tmp_path, capsys):
    case = CASES[name]
    code, out, err, root = _run_case(case, tmp_path, capsys)
    assert "Traceback" not in out + err
    assert code == case.code, err
    assert not [p for p in root.rglob("*") if p.name.startswith(TEMP_PREFIX)], "temp file left behind"
    if case.ok:
        lines = err.strip().splitlines()
        assert len(lines) == bool(case.warning), err
        assert all(line.startswith("m2ae-deblur: warning: ") and case.warning in line for line in lines), err
        outputs = _outputs(root / "out")
        stem = Path(case.name).stem
        assert [p.name for p in outputs] == sorted([case.name, f"{stem}_mask.png"])
        case.check(root / "out", case.name)
    else:
        lines = err.strip().splitlines()
        assert lines and all(line.startswith("m2ae-deblur: ") for line in lines), err
        assert case.needle in err, err
        assert case.needle in lines[0] or code == 1, "the error comes first"
        # nothing written for a failed input (an "exists" case keeps its old file, checked by `after`)
        new = [p for p in _outputs(root / "out") if p.read_bytes() != b"old"]
        assert new == [], new
        if case.output == "in" or case.output.startswith("in/"):
            assert sorted(p.name for p in (root / "in").iterdir()) == [case.name]
    if case.after is not None:
        case.after(root)


@pytest.mark.slow
def test_batch_of_the_whole_image_corpus(tmp_path, capsys):
    """Every single-file case in one folder: the valid ones are written, every bad one is skipped and named at
    the end, exit 1, no temp file, no output for a bad file."""
    batch = tmp_path / "batch"
    batch.mkdir()
    single = {name: case for name, case in CASES.items()
              if case.ckpt is None and not case.extra and case.output == "out" and Path(case.name).suffix
              and name not in ("missing-file", "folder-named-like-an-image")}
    for name, case in single.items():
        case.make(batch / f"{name}{Path(case.name).suffix}")
    code = main([str(batch), "-o", str(tmp_path / "out"), "-q"])
    _, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    written = {p.name for p in (tmp_path / "out").iterdir()}
    good = {f"{n}{Path(c.name).suffix}" for n, c in single.items() if c.ok}
    bad = {f"{n}{Path(c.name).suffix}" for n, c in single.items() if not c.ok}
    assert written == good
    summary = err.strip().splitlines()[-1]
    assert summary.startswith(f"m2ae-deblur: {len(good)} written, {len(bad)} failed: ")
    for name in bad:
        assert name in summary or "more" in summary
        assert sum(name in line for line in err.splitlines()[:-1]) == 1, name   # reported once as it failed
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["decompression-bomb", "ckpt-pickled-code", "negative-tile", "truncated-jpeg",
                                  "ckpt-plain-pickle-code", "ckpt-absurd-num-blocks"])
def test_corpus_as_a_real_process(name, tmp_path):
    """The console script as users run it: exit code and one-line stderr from a separate process."""
    case = CASES[name]
    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / case.name
    case.make(source)
    argv = [str(source), "-o", str(tmp_path / "out"), *case.extra]
    if case.ckpt is not None:
        case.ckpt[1](tmp_path / case.ckpt[0])
        argv += ["--checkpoint", str(tmp_path / case.ckpt[0])]
    proc = subprocess.run([sys.executable, "-m", "m2ae_infer.cli", *argv], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == case.code and "Traceback" not in proc.stderr + proc.stdout
    assert case.needle in proc.stderr and all(l.startswith("m2ae-deblur: ") for l in proc.stderr.splitlines())
    assert _outputs(tmp_path / "out") == [] and not (tmp_path / "MARKER").exists()


def _three_photos(folder: Path) -> None:
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        GOOD(folder / name)


def test_batch_goes_on_after_a_runtime_failure(tmp_path, capsys, monkeypatch):
    """A torch error on one image (e.g. out of memory) fails that image only."""
    from m2ae_infer.api import Deblurrer
    _three_photos(tmp_path / "in")
    run = Deblurrer.run

    def flaky(self, img, *args, **kwargs):
        if Path(img).name == "b.png":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory:\nyou tried to allocate 99 GB")
        return run(self, img, *args, **kwargs)

    monkeypatch.setattr(Deblurrer, "run", flaky)
    code = main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "c.png"]
    assert "failed" in err and "can't allocate memory: you tried" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith("2 written, 1 failed: " + str(tmp_path / "in" / "b.png"))


def test_interrupt_mid_write_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the second output is being written: exit 130, one line, the first output complete, the
    second absent, no temp file."""
    _three_photos(tmp_path / "in")
    save = Image.Image.save
    calls = []

    def interrupted(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            fp.write(b"\x89PNG half")
            raise KeyboardInterrupt
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", interrupted)
    code = main([str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 130 and err.strip() == "m2ae-deblur: interrupted; 1 written, 0 failed, 2 not run"
    assert sorted(os.listdir(tmp_path / "out")) == ["a.png"]
    monkeypatch.undo()
    assert np.asarray(Image.open(tmp_path / "out" / "a.png")).shape == PHOTO.shape
