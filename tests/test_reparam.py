"""Contract 1: the deploy network equals the training-time network (eval mode), for any size and mask."""
import pytest
import torch

from m2ae_infer import M2AEConfig, M2AENet, reparameterize_model
from m2ae_infer.reparam import expand_model
from helpers import MASK_KINDS, make_mask, random_net

CONFIGS = {
    "tiny": M2AEConfig.from_name("tiny"),
    "relu_wide_ffn": M2AEConfig(channels=16, num_blocks=2, ffn_expand=2, mask_channels=8, mask_layers=2,
                                motion_channels=12, act="relu"),
    "silu": M2AEConfig(channels=12, num_blocks=1, mask_channels=4, mask_layers=1, motion_channels=4, act="silu"),
    "tiny_v2": M2AEConfig.from_name("tiny_v2"),
}
# Fixed seeds per (config, size) so that a failure reproduces in any process (not hash(), which is salted).
SEEDS = {name: 100 + 10 * i for i, name in enumerate(CONFIGS)}
SIZES = [(1, 1), (2, 3), (17, 23), (32, 48)]


def assert_close_relative(actual, expected, rel=1e-5):
    span = (expected.max() - expected.min()).item() or 1.0
    err = (actual - expected).abs().max().item()
    assert err <= rel * span, f"max abs error {err:.3e} > {rel:g} x output range {span:.3e}"


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("mask_kind", ["predicted", "full", "random0.2", "blobs"])
def test_deploy_equals_training_form(config, size, mask_kind):
    net = random_net(CONFIGS[config], seed=SEEDS[config] + SIZES.index(size))
    deploy = reparameterize_model(net)
    image = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    mask = None if mask_kind == "predicted" else make_mask(mask_kind, *size, batch=2)
    with torch.no_grad():
        expected = net(image, mask, threshold=0.5)
        actual = deploy(image, mask, threshold=0.5)
    assert_close_relative(actual, expected)


def test_the_check_is_sensitive_to_batchnorm():
    """Randomized BN must matter: resetting one BN's statistics changes the output beyond tolerance."""
    net = random_net("tiny", seed=3)
    image, mask = torch.rand(1, 3, 16, 16), make_mask("full", 16, 16)
    with torch.no_grad():
        before = net(image, mask)
        net.blocks[0].rbr_identity.reset_running_stats()
        after = net(image, mask)
    span = (before.max() - before.min()).item()
    assert (before - after).abs().max().item() > 1e-3 * span


def test_reparameterize_model_copies_and_is_idempotent():
    net = random_net("tiny", seed=4)
    deploy = reparameterize_model(net)
    assert not net.inference_mode and deploy.inference_mode
    again = reparameterize_model(deploy)
    for (k1, v1), (k2, v2) in zip(deploy.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    keys = deploy.state_dict().keys()
    assert not any("rbr_" in k or "trajectory" in k for k in keys)


def test_deploy_form_builds_directly_with_same_keys():
    """A deploy checkpoint must load strictly into M2AENet(cfg, inference_mode=True)."""
    deploy = reparameterize_model(random_net("tiny"))
    direct = M2AENet(M2AEConfig.from_name("tiny"), inference_mode=True)
    direct.load_state_dict(deploy.state_dict(), strict=True)
    assert direct.inference_mode


@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_training_forward_matches_eval_forward_with_hard_mask(mask_kind):
    """forward_train (gating by multiplication, used by the trainer) equals the eval forward for 0/1 masks."""
    from m2ae_infer.model.mask import working_mask
    net = random_net("tiny", seed=5)
    image = torch.rand(1, 3, 12, 20)
    full = make_mask(mask_kind, 12, 20)
    with torch.no_grad():
        expected = net(image, full)
        actual = net.forward_train(image, working_mask(full).float()).restored
    assert_close_relative(actual, expected)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mask_kind", ["predicted", "full", "blobs"])
def test_expand_is_the_exact_inverse_of_reparameterize(config, mask_kind):
    """A deploy network grown back into training form (``expand_model``, for ``m2ae-train --train body``)
    computes what the deploy network computes (eval mode) and re-parameterizes to the same weights."""
    deploy = reparameterize_model(random_net(CONFIGS[config], seed=SEEDS[config] + 7))
    expanded = expand_model(deploy)
    assert deploy.inference_mode and not expanded.inference_mode and not expanded.training
    image = torch.rand(2, 3, 17, 23, generator=torch.Generator().manual_seed(2))
    mask = None if mask_kind == "predicted" else make_mask(mask_kind, 17, 23, batch=2)
    with torch.no_grad():
        assert_close_relative(expanded(image, mask, threshold=0.5), deploy(image, mask, threshold=0.5))
    again = reparameterize_model(expanded).state_dict()
    for key, value in deploy.state_dict().items():
        assert torch.allclose(again[key], value, rtol=1e-6, atol=1e-7), key


def test_expanded_branches_train_and_merge_back():
    """The grown 1x1 and identity branches are live: moving them changes the network, and the merge still
    matches the (changed) training form exactly."""
    expanded = expand_model(reparameterize_model(random_net("tiny", seed=9)))
    image, mask = torch.rand(1, 3, 16, 16), make_mask("full", 16, 16)
    with torch.no_grad():
        before = expanded(image, mask)
        expanded.blocks[0].rbr_1x1.conv.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        expanded.blocks[0].rbr_identity.weight.fill_(0.5)
        expanded.motion.trajectory.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
        expanded.motion.guide.weight[:, -4:].fill_(0.05)
        after = expanded(image, mask)
        assert (after - before).abs().max() > 1e-3
        assert_close_relative(reparameterize_model(expanded)(image, mask), after)
