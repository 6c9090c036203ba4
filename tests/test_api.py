"""Deblurrer: every input kind comes back as the same kind, exact outside the mask, equal to the network."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from m2ae_infer import Deblurrer, reparameterize_model
from m2ae_infer.api import RunInfo
from helpers import make_mask, random_net


@pytest.fixture(scope="module")
def net():
    return random_net("tiny", seed=21)


@pytest.fixture(scope="module")
def deblurrer(net):
    return Deblurrer(net, device="cpu")


def reference(net, rgb: torch.Tensor, mask=None) -> torch.Tensor:
    """The training-form network (independent of the executor) on a float [B, 3, H, W] image."""
    with torch.no_grad():
        return net(rgb, mask).clamp(0, 1)


@pytest.mark.parametrize("size", [(1, 1), (7, 5), (24, 31)], ids=str)
def test_numpy_float_matches_training_network(net, deblurrer, size):
    img = np.random.default_rng(0).random((*size, 3), dtype=np.float32)
    out, info = deblurrer.run(img, return_info=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == img.shape
    expected = reference(net, torch.from_numpy(img).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(out - expected).max() <= 1e-5
    assert info.mask.shape == size and info.mask.dtype == bool
    assert np.array_equal(out[~info.mask], img[~info.mask])


@pytest.mark.parametrize("execution", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("mask_kind", ["empty", "one_pixel", "blobs", "full"])
def test_user_mask_and_passthrough_uint8(net, execution, mask_kind):
    d = Deblurrer(net, device="cpu", execution=execution)
    img = np.random.default_rng(1).integers(0, 256, (18, 27, 3), dtype=np.uint8)
    mask = make_mask(mask_kind, 18, 27)[0, 0].numpy()
    out, info = d.run(img, mask=mask, return_info=True)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.array_equal(out[~info.mask], img[~info.mask])
    assert not np.any(mask & ~info.mask), "every user-masked pixel may be changed"
    rgb = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    expected = (reference(net, rgb, torch.from_numpy(mask)[None, None]) * 255).round()
    assert np.abs(out.astype(int) - expected[0].permute(1, 2, 0).numpy().astype(int)).max() <= 1
    if mask_kind == "empty":
        assert np.array_equal(out, img) and info.active_fraction == 0.0
        assert info.execution == ("dense" if execution == "dense" else "sparse")


def test_full_mask_forces_dense_restoration(deblurrer):
    img = np.random.default_rng(2).random((10, 12, 3), dtype=np.float32)
    _, info = deblurrer.run(img, mask="full", return_info=True)
    assert info.mask.all() and info.active_fraction == 1.0 and info.execution == "dense"
    assert info.flops_executed == info.flops_dense


def test_info_flops_follow_the_mask(deblurrer):
    img = np.random.default_rng(3).random((32, 32, 3), dtype=np.float32)
    _, small = deblurrer.run(img, mask=make_mask("one_pixel", 32, 32)[0, 0].numpy(), return_info=True)
    _, large = deblurrer.run(img, mask=make_mask("random0.05", 32, 32)[0, 0].numpy(), return_info=True)
    assert isinstance(small, RunInfo)
    assert small.flops_dense == large.flops_dense
    assert small.flops_executed < large.flops_executed < large.flops_dense
    assert 0 < small.flops_saved < 1 and small.seconds > 0


@pytest.mark.parametrize("kind", ["gray_u8", "gray_u16", "rgba_u8", "hwc1_f32", "chw_f32", "bchw_u8", "chw_f16"])
def test_kinds_round_trip_with_empty_mask(deblurrer, kind):
    """With nothing masked, every kind comes back bit-identical, same dtype and shape."""
    rng = np.random.default_rng(4)
    img = {
        "gray_u8": rng.integers(0, 256, (9, 11), dtype=np.uint8),
        "gray_u16": rng.integers(0, 65536, (9, 11), dtype=np.uint16),
        "rgba_u8": rng.integers(0, 256, (9, 11, 4), dtype=np.uint8),
        "hwc1_f32": rng.random((9, 11, 1), dtype=np.float32),
        "chw_f32": torch.rand(3, 9, 11),
        "bchw_u8": torch.randint(0, 256, (2, 3, 9, 11), dtype=torch.uint8),
        "chw_f16": torch.rand(3, 9, 11).half(),
    }[kind]
    out = deblurrer.run(img, mask=np.zeros((9, 11), bool))
    assert type(out) is type(img) and out.dtype == img.dtype and out.shape == img.shape
    same = torch.equal(out, img) if isinstance(img, torch.Tensor) else np.array_equal(out, img)
    assert same


def test_rgba_alpha_untouched_and_tensor_mask_shape(deblurrer):
    img = torch.rand(2, 4, 12, 14)
    out, info = deblurrer.run(img, mask="full", return_info=True)
    assert torch.equal(out[:, 3], img[:, 3])
    assert info.mask.shape == (2, 12, 14) and info.mask.dtype == torch.bool


def test_path_and_pil_inputs_return_pil(deblurrer, tmp_path):
    arr = np.random.default_rng(5).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    path = tmp_path / "in.png"
    Image.fromarray(arr).save(path)
    for source in (path, str(path), Image.open(path)):
        out = deblurrer.run(source, mask=np.zeros((13, 17), bool))
        assert isinstance(out, Image.Image) and out.size == (17, 13) and out.mode == "RGB"
        assert np.array_equal(np.asarray(out), arr)


@pytest.mark.parametrize("kwargs,match", [
    (dict(backend="triton", device="cpu"), "needs a CUDA GPU"), (dict(backend="cuda"), "backend"),
    (dict(execution="fast"), "execution"), (dict(threshold=1.5), "threshold"),
    (dict(dilation=-1), "dilation"), (dict(device="tpu"), "device"),
])
def test_bad_options_raise_one_line(net, kwargs, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # tests/test_triton.py sets it for its kernels
    with pytest.raises(ValueError, match=match) as err:
        Deblurrer(net, **kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("mask", ["half", np.zeros((3, 3), bool), [[1, 2]], np.zeros((9, 11), complex),
                                  np.full((9, 11), np.nan)])
def test_bad_masks_raise(deblurrer, mask):
    with pytest.raises(ValueError) as err:
        deblurrer.run(np.zeros((9, 11, 3), np.uint8), mask=mask)
    assert "\n" not in str(err.value)


def test_deblurrer_accepts_deploy_network_and_does_not_modify_callers_net(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    Deblurrer(net)
    Deblurrer(reparameterize_model(net))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ------------------------------------------------------------------------------ PIL metadata, edges
def _oriented_photo(tmp_path, ext):
    """An RGB file with EXIF Orientation=6 (stored pixels must turn 90 degrees clockwise to display)."""
    stored = np.random.default_rng(6).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"rot{ext}"
    Image.fromarray(stored).save(path, exif=exif)
    return path


@pytest.mark.parametrize("out_ext", [".png", ".tif", ".webp", ".bmp", ".tga"])
def test_pil_input_with_exif_orientation_displays_like_the_input(deblurrer, tmp_path, out_ext):
    from m2ae_infer import save_image
    src = Image.open(_oriented_photo(tmp_path, ".png"))
    upright = np.array(ImageOps.exif_transpose(src))            # what a viewer shows for the input
    out = deblurrer.run(src, mask=np.zeros((6, 10), bool))
    np.testing.assert_array_equal(np.array(ImageOps.exif_transpose(out)), upright)
    save_image(out, tmp_path / f"out{out_ext}")
    with Image.open(tmp_path / f"out{out_ext}") as saved:
        np.testing.assert_array_equal(np.array(ImageOps.exif_transpose(saved).convert("RGB")), upright)
    # Pillow's own save keeps it too, when given the EXIF the result carries.
    out.save(tmp_path / "pil.png", exif=out.getexif())
    with Image.open(tmp_path / "pil.png") as saved:
        np.testing.assert_array_equal(np.array(ImageOps.exif_transpose(saved)), upright)


def test_read_only_array_runs_without_warnings(deblurrer, tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(path)
    arr = np.asarray(Image.open(path))
    assert not arr.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = deblurrer.run(arr, mask=np.zeros((9, 11), bool))
    assert np.array_equal(out, arr)


def test_multi_frame_pil_image_warns_like_a_path(deblurrer, tmp_path):
    from m2ae_infer import ImageWarning
    frames = [Image.new("RGB", (5, 4), (v, 0, 0)) for v in (10, 200)]
    frames[0].save(tmp_path / "two.png", save_all=True, append_images=frames[1:])
    for source in (tmp_path / "two.png", Image.open(tmp_path / "two.png")):
        with pytest.warns(ImageWarning, match="2 frames"):
            deblurrer.run(source, mask=np.zeros((4, 5), bool))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_gray_alpha_array_is_accepted_like_a_pil_LA_image(net, dtype):
    d = Deblurrer(net, device="cpu")
    rng = np.random.default_rng(8)
    la = (rng.random((10, 13, 2)) * (1 if dtype == np.float32 else np.iinfo(dtype).max)).astype(dtype)
    mask = make_mask("blobs", 10, 13)[0, 0].numpy()
    out, info = d.run(la, mask=mask, return_info=True)
    assert out.dtype == la.dtype and out.shape == la.shape
    assert np.array_equal(out[..., 1], la[..., 1])                       # alpha untouched
    assert np.array_equal(out[~info.mask], la[~info.mask])
    gray, _ = d.run(np.ascontiguousarray(la[..., 0]), mask=mask, return_info=True)
    assert np.array_equal(out[..., 0], gray)                              # gray channel = gray image


def test_tiled_info_reports_the_untiled_dense_cost(net):
    img = np.random.default_rng(9).random((40, 52, 3), dtype=np.float32)
    _, whole = Deblurrer(net, tile=None).run(img, mask="full", return_info=True)
    _, tiled = Deblurrer(net, tile=16).run(img, mask="full", return_info=True)
    assert tiled.tiles > 1 and whole.tiles == 1
    assert tiled.flops_untiled == whole.flops_dense == whole.flops_untiled
    assert tiled.flops_executed > tiled.flops_untiled and tiled.flops_saved_untiled < 0


def test_package_exports_what_the_readme_uses():
    import m2ae_infer
    from m2ae_infer import ImageWarning, save_image
    from m2ae_infer.imgio import ImageWarning as Iw
    from m2ae_infer.imgsave import save_image as si
    assert ImageWarning is Iw and save_image is si
    assert {"save_image", "ImageWarning"} <= set(m2ae_infer.__all__)


@pytest.mark.parametrize("device", ["meta", "mps", "tpu"])
def test_unsupported_devices_are_refused_up_front(net, device):
    with pytest.raises(ValueError, match="cuda:N") as err:
        Deblurrer(net, device=device)
    assert "\n" not in str(err.value)


def test_threshold_defaults_to_the_checkpoints_recommendation(tmp_path):
    """threshold=None takes the checkpoint meta's dev-chosen "threshold"; an explicit value wins; none stored: 0.5."""
    from m2ae_infer import save_checkpoint
    net = random_net("tiny", seed=3)
    save_checkpoint(net, tmp_path / "t.safetensors", meta={"threshold": 0.8})
    save_checkpoint(net, tmp_path / "plain.pth")
    assert Deblurrer(tmp_path / "t.safetensors").threshold == 0.8
    assert Deblurrer(tmp_path / "t.safetensors", threshold=0.3).threshold == 0.3
    assert Deblurrer(tmp_path / "plain.pth").threshold == 0.5 and Deblurrer(net).threshold == 0.5
    image = np.random.default_rng(0).random((20, 24, 3)).astype(np.float32)
    _, high = Deblurrer(tmp_path / "t.safetensors").run(image, return_info=True)
    _, low = Deblurrer(tmp_path / "t.safetensors", threshold=0.2).run(image, return_info=True)
    assert high.active_fraction <= low.active_fraction


# ----------------------------------------------------------------------------------- issue 18
@pytest.mark.parametrize("dtype", [">u2", ">f4", ">i4", "<u2"])
def test_big_endian_mask_equals_the_native_mask(net, deblurrer, dtype):
    """Issue 18: a big-endian mask was refused as 'got ndarray' although big-endian images work. The reference is
    the training-form network given the same mask as a native bool array."""
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    native = make_mask("blobs", 12, 17, seed=2)[0, 0].numpy()
    out = deblurrer.run(image, mask=native.astype(dtype))
    rgb = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    expected = deblurrer.run(image, mask=native)
    np.testing.assert_array_equal(out, expected)
    ref = (reference(net, rgb, torch.from_numpy(native)[None, None]) * 255).round().to(torch.uint8)
    assert np.abs(out.astype(int) - ref[0].permute(1, 2, 0).numpy().astype(int)).max() <= 1
    assert not np.array_equal(out, image), "the mask made the network run"


def _odd_tensors(channels: int) -> dict:
    dense = torch.rand(1, channels, 6, 8, generator=torch.Generator().manual_seed(0))
    return {"meta": (torch.empty(1, channels, 6, 8, device="meta"), "meta device"),
            "sparse_coo": (dense.to_sparse(), "sparse_coo layout"),
            "mkldnn": (dense.to_mkldnn(), "mkldnn layout")}


@pytest.mark.parametrize("kind", ["meta", "sparse_coo", "mkldnn"])
@pytest.mark.parametrize("role", ["image", "mask"])
def test_tensors_without_readable_pixels_are_refused_in_one_line(deblurrer, kind, role):
    """Issue 18: meta-device and sparse tensors raised raw RuntimeError / NotImplementedError."""
    from m2ae_infer import ImageError
    tensor, needle = _odd_tensors(3 if role == "image" else 1)[kind]
    with pytest.raises(ImageError) as err:
        if role == "image":
            deblurrer.run(tensor)
        else:
            deblurrer.run(torch.rand(1, 3, 6, 8), mask=tensor)
    message = str(err.value)
    assert needle in message and "\n" not in message and ("mask" in message) == (role == "mask"), message
