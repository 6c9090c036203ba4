"""Deblurrer: every input kind comes back as the same kind, exact outside the mask, equal to the network."""
import numpy as np
import pytest
import torch
from PIL import Image

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
