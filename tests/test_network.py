"""The network's fast formulations against their plain definitions: the stem as one 6x6 stride-2 convolution
against ``stem(pixel_unshuffle(x))``, the working mask as a 2x2 block OR against a max-pool."""
import pytest
import torch
import torch.nn.functional as F

from m2ae_infer.model.mask import full_resolution, pad_to_even, working_mask
from helpers import random_net


@pytest.mark.parametrize("config", ["tiny", "tiny_v2", "v2"])
@pytest.mark.parametrize("size", [(2, 2), (8, 14), (30, 46)], ids=str)
def test_stem_features_equal_unshuffle_then_conv(config, size):
    net = random_net(config, seed=2)
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = net.stem(F.pixel_unshuffle(x, 2))
        assert (net.stem_features(x) - expected).abs().max().item() <= 1e-5
        channels_last = net.stem_features(x.contiguous(memory_format=torch.channels_last))
        assert (channels_last - expected).abs().max().item() <= 1e-5


def test_stem_features_train_the_stem_weight():
    net = random_net("tiny", seed=2)
    net.stem_features(torch.rand(1, 3, 8, 8)).square().sum().backward()
    assert net.stem.weight.grad is not None and net.stem.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (7, 9), (64, 96)], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5, 1.0])
def test_working_mask_is_the_2x2_max_pool(size, density):
    mask = torch.rand(3, 1, *size, generator=torch.Generator().manual_seed(6)) < density
    expected = F.max_pool2d(pad_to_even(mask.to(torch.uint8)).float(), 2) > 0
    assert torch.equal(working_mask(mask), expected)


@pytest.mark.parametrize("shape, size", [((1, 1, 3, 5), (6, 10)), ((2, 1, 4, 7), (7, 13)), ((1, 1, 1, 1), (1, 2)),
                                         ((3, 1, 6, 6), (11, 12))])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_full_resolution_doubles_every_pixel_like_repeat_interleave(shape, size, dtype):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(4)) > 0.5
    mask = mask.to(dtype)
    expected = mask.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)[..., :size[0], :size[1]]
    ours = full_resolution(mask, size)
    assert ours.dtype == dtype and torch.equal(ours, expected)
    strided = mask.transpose(-1, -2).contiguous().transpose(-1, -2)      # the same values, other strides
    assert torch.equal(full_resolution(strided, size), expected)
