"""The sparse stem (kernels/cells.py) against independent references: the dense stem convolution (F.conv2d over the
whole image), a 3x3 max-pool dilation of the computed pixels, and the network's dense masked forward."""
import math

import pytest
import torch
import torch.nn.functional as F

from m2ae_infer import M2AEConfig, M2AENet, reparameterize_model
from m2ae_infer.executor import TorchExecutor
from m2ae_infer.kernels import cells as cells_mod
from m2ae_infer.kernels.cells import read_cells, stem_tile_buffer
from m2ae_infer.kernels.tiles import TILE, plan_tiles, tile_grid, to_tile_buffer
from m2ae_infer.model.mask import full_resolution

from helpers import random_net

SHAPES = [(1, 16, 16), (2, 15, 23), (1, 9, 40), (1, 33, 17)]     # working grids: whole tiles, ragged edges
FILLS = [0.0, 0.5, 2.0]                                            # min_fill: all tiles, some, none


def _mask(b, h, w, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "blobs":
        coarse = torch.rand(b, 1, max(h // 6, 2), max(w // 6, 2), generator=g)
        return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False) > 0.6
    if kind == "scattered":
        return torch.rand(b, 1, h, w, generator=g) < 0.08
    if kind == "edges":                       # active pixels on cell borders and the grid's edges
        m = torch.zeros(b, 1, h, w, dtype=torch.bool)
        m[..., 0, :] = m[..., -1, :] = True
        m[..., TILE - 1::TILE, 3] = True
        return m
    return torch.zeros(b, 1, h, w, dtype=torch.bool)


def _net(seed=0):
    return reparameterize_model(random_net("tiny_v2", seed))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["blobs", "scattered", "edges", "empty"])
@pytest.mark.parametrize("min_fill", FILLS)
def test_read_cells_are_the_cells_of_the_computed_pixels_and_their_neighbours(shape, kind, min_fill):
    b, h, w = shape
    mask = _mask(b, h, w, kind, seed=h * 7 + w)
    plan = plan_tiles(mask, min_fill)
    computed = torch.zeros(b, h, w, dtype=torch.bool)               # what the two kernels compute
    computed[plan.pixels] = True
    for bi, ty, tx in plan.index.tolist():
        computed[bi, ty * TILE:(ty + 1) * TILE, tx * TILE:(tx + 1) * TILE] = True
    read = F.max_pool2d(computed[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0    # + their 3x3 neighbours
    nty, ntx = tile_grid(h, w)
    padded = F.pad(read, [0, ntx * TILE - w, 0, nty * TILE - h])
    expected = padded.view(b, nty, TILE, ntx, TILE).any(4).any(2).nonzero()
    assert torch.equal(read_cells(plan, b, h, w), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["blobs", "scattered", "edges"])
def test_stem_buffer_holds_the_dense_stem_at_its_cells_and_zero_ring(shape, kind):
    b, h, w = shape
    net = _net()
    image = torch.rand(b, 3, 2 * h, 2 * w).contiguous(memory_format=torch.channels_last)
    plan = plan_tiles(_mask(b, h, w, kind, seed=3), 0.5)
    cells = read_cells(plan, b, h, w)
    buffer = stem_tile_buffer(image, *net.stem_kernel(), cells, (h, w), fill=math.nan)
    # reference: the unshuffled image through the stem's own 3x3 conv, as M2AENet's training form computes it
    reference = to_tile_buffer(net.stem(F.pixel_unshuffle(image, 2)))
    assert buffer.shape == reference.shape
    inner = lambda t: t[:, 1:-1, 1:-1].unflatten(1, (-1, TILE)).unflatten(3, (-1, TILE)).permute(0, 1, 3, 2, 4, 5)  # noqa: E731
    got, want = inner(buffer), inner(reference)
    idx = tuple(cells.t())
    torch.testing.assert_close(got[idx], want[idx], rtol=0, atol=1e-6)
    read = torch.zeros(got.shape[:3], dtype=torch.bool)
    read[idx] = True
    read_pixels = read.repeat_interleave(TILE, 1).repeat_interleave(TILE, 2)[:, :h, :w]
    assert torch.isnan(buffer[:, 1:h + 1, 1:w + 1][~read_pixels]).all()     # no other grid pixel was written
    ring = torch.ones(buffer.shape[1:3], dtype=torch.bool)
    ring[1:h + 1, 1:w + 1] = False                                 # the zero ring and the padding past the grid
    assert (buffer[:, ring] == 0).all()


@pytest.mark.parametrize("size", [(30, 46), (64, 64), (37, 75)])
@pytest.mark.parametrize("kind", ["blobs", "scattered", "edges"])
@pytest.mark.parametrize("kernel", ["auto", "tiles", "pixels"])
def test_sparse_call_with_the_sparse_stem_equals_the_dense_masked_forward(monkeypatch, size, kind, kernel):
    """Every cell the stem skips holds NaN: a stage or the tail that read one would put NaN in the output."""
    import m2ae_infer.executor as executor_mod
    monkeypatch.setattr(executor_mod, "stem_tile_buffer",
                        lambda *a, **k: cells_mod.stem_tile_buffer(*a, **k, fill=math.nan))
    monkeypatch.setattr(executor_mod, "STEM_CELLS_BELOW", 10.0)    # the sparse stem at any coverage
    net = _net(1)
    height, width = size
    image = torch.rand(2, 3, height, width)
    half = _mask(2, (height + 1) // 2, (width + 1) // 2, kind, seed=5)
    mask = full_resolution(half, (height, width))
    ex = TorchExecutor(net, sparse_kernel=kernel)
    with torch.inference_mode():
        result = ex.run(image, mask, execution="sparse")
        reference = net(image, mask)
    assert result.stem_cells is not None and result.stem_cells > 0
    assert not torch.isnan(result.output).any()
    torch.testing.assert_close(result.output, reference, rtol=0, atol=1e-5)
    outside = ~mask.expand_as(image)
    assert torch.equal(result.output[outside], image[outside])      # unmasked pixels: the input, bit for bit


def test_sparse_stem_runs_only_where_it_pays():
    """Above STEM_CELLS_BELOW of the cells, the dense stem runs (and the result says so); with a mask the stem
    features predict (a v1 head), always."""
    from m2ae_infer.executor import STEM_CELLS_BELOW
    net = _net(2)
    ex = TorchExecutor(net)
    image = torch.rand(1, 3, 64, 64)
    few = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    few[..., :4, :4] = True
    everywhere = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0)) < 0.2
    with torch.inference_mode():
        assert ex.run(image, few, execution="sparse").stem_cells == 1
        assert ex.run(image, everywhere, execution="sparse").stem_cells is None
        assert ex.run(image, few, execution="dense").stem_cells is None
    assert 0.0 < STEM_CELLS_BELOW < 1.0
    torch.manual_seed(0)
    v1 = reparameterize_model(M2AENet(M2AEConfig.from_name("tiny")).eval())
    with torch.inference_mode():
        assert TorchExecutor(v1).run(image, execution="sparse").stem_cells is None


@pytest.mark.parametrize("size", [(16, 16), (30, 46), (34, 18), (66, 50)])
def test_cell_windows_are_the_zero_padded_image_around_each_cell(size):
    """Against slices of the whole image zero-padded once (every cell of the grid: corners, edges, ragged ends)."""
    from m2ae_infer.kernels.cells import STEM_RADIUS, cell_windows
    height, width = size
    image = torch.rand(2, 3, height, width).contiguous(memory_format=torch.channels_last)
    nty, ntx = tile_grid(height // 2, width // 2)
    cells = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(nty), torch.arange(ntx), indexing="ij"),
                        -1).reshape(-1, 3)[torch.randperm(2 * nty * ntx, generator=torch.Generator().manual_seed(1))]
    step, span, r = 2 * TILE, 2 * TILE + 2 * STEM_RADIUS, STEM_RADIUS
    whole = F.pad(image, [r, step * ntx + r - width, r, step * nty + r - height])
    expected = torch.stack([whole[b, :, step * ty:step * ty + span, step * tx:step * tx + span]
                            for b, ty, tx in cells.tolist()])
    assert torch.equal(cell_windows(image, cells), expected)


@pytest.mark.parametrize("predicted", [False, True])
def test_sparse_stem_flops_are_its_cells_convolutions(monkeypatch, predicted):
    """FlopCounterMode on the real call equals the executor's count, and the stem's share is what a 6x6 stride-2
    conv from 3 to C channels costs on the cells' T x T outputs (2 * C * 3 * 36 per output pixel)."""
    from torch.utils.flop_counter import FlopCounterMode
    import m2ae_infer.executor as executor_mod
    monkeypatch.setattr(executor_mod, "STEM_CELLS_BELOW", 10.0)
    net = _net(3)
    ex = TorchExecutor(net)
    image = torch.rand(1, 3, 40, 64)
    mask = None if predicted else full_resolution(_mask(1, 20, 32, "blobs", seed=7), (40, 64))
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            result = ex.run(image, mask, execution="sparse", threshold=0.0 if predicted else 0.5)
    assert result.stem_cells
    count = ex.count_flops(1, 40, 64, result.active_pixels, "sparse", predicted, result.sparse_tiles,
                           result.tile_pixels, result.stem_cells)
    assert count == counter.get_total_flops()
    dense_stem = ex.count_flops(1, 40, 64, result.active_pixels, "sparse", predicted, result.sparse_tiles,
                                result.tile_pixels)
    per_pixel = 2 * net.stem.out_channels * 3 * 36
    assert dense_stem - count == per_pixel * (20 * 32 - result.stem_cells * TILE * TILE)
