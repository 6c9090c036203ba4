"""The tile kernel (kernels/tiles.py): its plan splits the mask exactly, a tiled stage equals the dense stage
(``F.conv2d`` with zero padding, then the network's own per-pixel maps) at the active pixels and leaves every other
pixel bit for bit, and the executor's FLOP count equals ``FlopCounterMode`` on the real call for every kernel."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from m2ae_infer import reparameterize_model
from m2ae_infer.executor import SPARSE_KERNELS, TorchExecutor
from m2ae_infer.kernels.reference import neighbour_offsets, padded_rows
from m2ae_infer.kernels import tiles
from m2ae_infer.kernels.tiles import TILE, plan_tiles, spatial_weights, to_tile_buffer
from m2ae_infer.model.mask import working_mask
from m2ae_infer.packing import pack_stages
from helpers import make_mask, random_net

SHAPES = [(1, 1), (7, 9), (8, 8), (17, 30), (33, 16)]        # working grids: below, at and across tile sizes
KINDS = ["empty", "full", "one_pixel", "borders", "random0.1", "random0.5", "blobs"]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("min_fill", [0.0, 0.5, 2.0])
def test_plan_splits_the_active_pixels_exactly(shape, kind, min_fill):
    mask = make_mask(kind, *shape, seed=5, batch=2)
    plan = plan_tiles(mask, min_fill)
    covered = torch.zeros_like(mask[:, 0])
    for (b, ty, tx), tm in zip(plan.index.tolist(), plan.tile_mask):
        window = covered[b, ty * TILE:(ty + 1) * TILE, tx * TILE:(tx + 1) * TILE]
        window |= tm[:window.shape[0], :window.shape[1], 0]
        assert int(tm.sum()) >= min(min_fill, 1.0) * TILE * TILE and int(tm.sum()) > 0
        assert not tm[window.shape[0]:].any() and not tm[:, window.shape[1]:].any()   # nothing past the grid
    b, y, x = plan.pixels
    assert not covered[b, y, x].any()                                # the two shares are disjoint ...
    covered[b, y, x] = True
    assert torch.equal(covered, mask[:, 0])                          # ... and together are the mask
    assert plan.tile_pixels == int(plan.tile_mask.sum())
    assert torch.equal(plan.inactive, (~plan.tile_mask).reshape(-1).nonzero()[:, 0])
    assert all(ty < shape[0] // TILE and tx < shape[1] // TILE for _, ty, tx in plan.index.tolist())
    if min_fill > 1:
        assert plan.tiles == 0
    if min_fill == 0:   # every active pixel of a tile inside the grid is tiled; the edge strips run per pixel
        b, y, x = plan.pixels
        inner = (y < shape[0] // TILE * TILE) & (x < shape[1] // TILE * TILE)
        assert not inner.any()


def run_stages(view, buffer_shape, plan, stages):
    """The executor's stage loop (:func:`tiles.masked_stages_`) on a bare buffer."""
    tiles.masked_stages_(view, buffer_shape, plan, stages, spatial_weights(stages))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["full", "random0.3", "blobs", "borders"])
@pytest.mark.parametrize("min_fill", [0.0, 0.5])                      # tiles only (and edge strips); mixed
@pytest.mark.parametrize("rows", [tiles.POINTWISE_ROWS, 37, 130])    # pieces of one tile, two tiles
def test_tiled_stages_equal_the_dense_stages(shape, kind, min_fill, rows, monkeypatch):
    """All the stages of a net through both kernels (halos exchanged between stages) == the network's dense
    stages one after the other, each gated: a halo that missed a neighbour's update changes the result from the
    second stage on."""
    monkeypatch.setattr(tiles, "POINTWISE_ROWS", rows)
    net = reparameterize_model(random_net("tiny", seed=3))
    x = torch.randn(2, net.config.channels, *shape, generator=torch.Generator().manual_seed(8))
    mask = make_mask(kind, *shape, seed=2, batch=2)
    with torch.no_grad():   # the reference: the network's own dense stages, gated
        expected = x
        for module in net.stages():
            expected = torch.where(mask, expected + module(expected), expected)
    plan = plan_tiles(mask, min_fill)
    buffer = to_tile_buffer(x)
    with torch.no_grad():
        run_stages(buffer.view(-1, buffer.shape[-1]), buffer.shape, plan, pack_stages(net))
    got = buffer[:, 1:shape[0] + 1, 1:shape[1] + 1].permute(0, 3, 1, 2)
    assert (got - expected).abs().max().item() <= 1e-5
    outside = ~mask.expand_as(x)
    assert torch.equal(got[outside], x[outside])
    ring = buffer.clone()
    ring[:, 1:shape[0] + 1, 1:shape[1] + 1] = 0
    assert not ring.any()                                            # the zero ring and padding stay zero


def test_halo_exchange_reaches_every_neighbour_kind():
    """The mixed case the exchange exists for: tiles next to tiles, to per-pixel pixels and to inactive pixels."""
    mask = torch.zeros(1, 1, 24, 24, dtype=torch.bool)
    mask[0, 0, :16, :16] = True             # four full tiles, side by side
    mask[0, 0, 16, 3] = True                # a lone pixel under them (per pixel with min_fill 0.5)
    mask[0, 0, 3, 16:20] = True             # a sparse tile on the right (per pixel)
    plan = plan_tiles(mask, 0.5)
    assert plan.tiles == 4 and plan.pixels[0].numel() == 5
    buffer_shape = to_tile_buffer(torch.zeros(1, 2, 24, 24)).shape
    halo = tiles.tile_halo(plan, buffer_shape, padded_rows(*plan.pixels, 24, 24), neighbour_offsets(24))
    assert halo.ring_to.numel() == 4 * (2 * TILE + 1)     # each tile's two inner sides and the diagonal corner
    assert halo.pixel_ring_to.numel() == 2                 # (16, 3) below tile (1, 0); (3, 16) right of tile (0, 1)
    assert halo.export_to.numel() == 3 + 3                 # the three tile pixels each of those two reads


def test_tiled_stage_passes_non_finite_neighbours_through():
    """An inactive pixel holding inf inside an active tile comes back as inf (copied back, not x + m * F(x))."""
    net = reparameterize_model(random_net("tiny", seed=3))
    x = torch.rand(1, net.config.channels, 8, 8)
    x[0, :, 0, 0] = float("inf")
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[0, 0, 5, 5] = True
    plan = plan_tiles(mask, 0.0)
    buffer = to_tile_buffer(x)
    run_stages(buffer.view(-1, buffer.shape[-1]), buffer.shape, plan, pack_stages(net)[:1])
    assert torch.isinf(buffer[0, 1, 1]).all() and torch.isfinite(buffer[0, 6, 6]).all()


def test_spatial_weights_invert_the_packing():
    net = reparameterize_model(random_net("tiny_v2", seed=4))
    for module, weight in zip(net.stages(), spatial_weights(pack_stages(net))):
        assert torch.equal(weight, module.spatial.weight)
        assert weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("kernel", SPARSE_KERNELS)
@pytest.mark.parametrize("config", ["tiny", "tiny_v2"])
@pytest.mark.parametrize("predicted", [False, True])
def test_count_flops_equals_the_real_call(kernel, config, predicted):
    executor = TorchExecutor(reparameterize_model(random_net(config, seed=6)), sparse_kernel=kernel)
    image = torch.rand(2, 3, 70, 90, generator=torch.Generator().manual_seed(1))
    mask = None if predicted else make_mask("blobs", 70, 90, seed=7, batch=2) | make_mask("random0.05", 70, 90,
                                                                                            seed=8, batch=2)
    counter = FlopCounterMode(display=False)
    with counter:
        result = executor.run(image, mask, execution="sparse", threshold=0.3)
    assert result.execution == "sparse"
    if kernel != "pixels" and not predicted:
        assert result.sparse_tiles > 0
    assert executor.count_flops(2, 70, 90, result.active_pixels, "sparse", predicted, result.sparse_tiles,
                                result.tile_pixels, result.stem_cells) == counter.get_total_flops()
    if mask is not None:
        assert result.active_pixels == int(working_mask(mask).sum())


@pytest.mark.parametrize("shape", [(1, 4, 16, 16), (2, 3, 13, 21), (1, 5, 1, 9), (1, 8, 24, 8)])
def test_tile_buffer_is_the_features_in_a_zero_ring_and_zero_padding(shape):
    """Only the ring and the padding are zeroed (the rest is written over): memory that held NaN just before must
    not leak into them."""
    b, c, h, w = shape
    features = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    nty, ntx = -(-h // TILE), -(-w // TILE)
    expected = torch.zeros(b, nty * TILE + 2, ntx * TILE + 2, c)
    expected[:, 1:h + 1, 1:w + 1] = features.permute(0, 2, 3, 1)
    for _ in range(3):
        poison = torch.full_like(expected, float("nan"))   # freed right away: the allocator may hand it out again
        del poison
        assert torch.equal(to_tile_buffer(features), expected)
