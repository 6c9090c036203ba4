"""Tiling: the receptive field formula against a perturbation probe, tiled == untiled (dense, sparse, auto,
predicted / user / full masks, odd sizes, batches, the shipped checkpoint), the overlap rule enforced, and
memory-bounded plumbing (the whole float image is never built)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_mask, random_net, shipped_tiling
from PIL import Image

from m2ae_infer import Deblurrer, M2AEConfig, M2AENet, reparameterize_model, tiling
from m2ae_infer.imgio import PreparedImage, prepare_image
from m2ae_infer.model.mask import pad_to_even
from m2ae_infer.executor import STEM_CELLS_BELOW
from m2ae_infer.kernels.cells import read_cells
from m2ae_infer.kernels.tiles import TILE, plan_tiles as split_tiles
from m2ae_infer.tiling import ALIGN, Tiling, plan_tiles, receptive_field, run_tiled

EXAMPLE = Path(__file__).resolve().parents[1] / "m2ae_infer" / "assets" / "example_blurry.png"


# ------------------------------------------------------------------------------------ receptive field
@pytest.mark.parametrize("name", ["tiny", "default", "large", "tiny_v2", "v2"])
def test_receptive_field_formula(name):
    cfg = M2AEConfig.from_name(name)
    field = receptive_field(M2AENet(cfg))
    stages = 1 + cfg.num_blocks                                  # motion analyzer + blocks, one 3x3 each
    # body: 2x2 blocks (1) + stem and every stage one working pixel (2 input pixels) each side
    assert field.body_reach == 1 + 2 * (1 + stages) and field.body == 2 * (1 + stages)
    if cfg.detector == "stem":
        dilations = sum(2 ** i for i in range(1, cfg.mask_layers))   # the mask head's dilated convs
        # mask: 4x4 blocks (3) + stem (2) + stride-2 conv (2 before) + dilated convs at 4 pixels a cell
        assert field.mask_reach == 3 + 2 + 2 + 4 * dilations and field.mask == 4 + 4 * dilations
        assert field.align == 4
    else:
        dilations = sum(2 ** i for i in range(cfg.mask_layers))      # trunk dilations 1, 2, 4, ...
        # mask: 8x8 cells (7) + 5x5 filters (2) + 3x3 at 1/4 (4) + stride-2 3x3 at 1/4 (4 before)
        # + dilated 3x3 at 8 pixels a cell
        assert field.mask == 2 + 4 + 4 + 8 * dilations and field.mask_reach == 7 + field.mask
        assert field.align == 8
    assert field.min_overlap % field.align == 0 and field.min_overlap >= max(field.body, field.mask)
    assert receptive_field(reparameterize_model(M2AENet(cfg))) == field   # both forms
    if name == "default":
        assert (field.body_reach, field.mask_reach, field.min_overlap) == (17, 31, 28)
    if name == "v2":     # a few hundred pixels of context for the v2 detector
        assert (field.mask_reach, field.min_overlap) == (265, 264)


def _influence(fn, image: torch.Tensor, cell: int) -> int:
    """Largest distance from an output pixel to a perturbed input pixel that changed it (perturbation probe).

    ``fn``: ``[1, 3, H, W]`` -> ``[1, C, H/cell, W/cell]``; each output cell covers ``cell x cell`` inputs.
    The probe pixel takes all ``cell`` phases so the worst alignment is seen.
    """
    reach = 0
    base = fn(image)
    for phase in range(cell):
        y = x = image.shape[-1] // 2 + phase
        probe = image.clone()
        probe[..., y, x] += 1.0
        changed = (fn(probe) != base).any(dim=1)[0].nonzero()
        assert len(changed), "the perturbation changed nothing"
        for cy, cx in changed.tolist():   # distance from (y, x) to the farthest input pixel of the cell
            reach = max(reach, abs(y - cy * cell), abs(y - cy * cell - cell + 1),
                        abs(x - cx * cell), abs(x - cx * cell - cell + 1))
    return reach


@pytest.mark.parametrize("name,size", [("tiny", 96), ("default", 96), ("tiny_v2", 128), ("v2", 576)])
def test_receptive_field_matches_perturbation_probe(name, size):
    net = reparameterize_model(random_net(name, seed=5)).double()
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    full = torch.ones(1, 1, 96, 96, dtype=torch.bool)
    field = receptive_field(net)

    def coarse(img):
        padded = pad_to_even(img)
        return net.mask_head.coarse_logits(padded, net.stem_features(padded))

    with torch.no_grad():
        body = _influence(lambda img: net(img, mask=full), image[..., :96, :96], 1)
        mask = _influence(coarse, image, net.mask_head.jump)
    assert (body, mask) == (field.body_reach, field.mask_reach)


# -------------------------------------------------------------------------------- tiled == untiled
def _gap_threshold(net, image: np.ndarray) -> float:
    """A threshold near the median blur probability that no pixel lies within float rounding of.

    Tiles compute the mask logits in other oneDNN blockings, equal to ~1e-8 but not bit for bit: a pixel
    sitting exactly on the threshold could flip. Real masks have few such pixels; random nets crowd
    every probability into a narrow band, so the tests pick the threshold in the widest gap there.
    """
    net = reparameterize_model(net)
    with torch.no_grad():
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        padded = pad_to_even(x)
        p = torch.sigmoid(net.mask_logits(padded, net.stem_features(padded))).flatten().sort().values
    lo, hi = int(0.35 * len(p)), int(0.65 * len(p))
    gaps = p[lo + 1:hi] - p[lo:hi - 1]
    i = int(gaps.argmax())
    assert gaps[i] > 1e-6
    return float((p[lo + i] + p[lo + i + 1]) / 2)


def _compare(net, image, mask, execution, tile, overlap=None, threshold=None, dilation=0):
    kwargs = dict(execution=execution, threshold=threshold or 0.5, dilation=dilation)
    ref, ref_info = Deblurrer(net, tile=None, **kwargs).run(image, mask=mask, return_info=True)
    out, info = Deblurrer(net, tile=tile, tile_overlap=overlap, **kwargs).run(image, mask=mask, return_info=True)
    assert info.tiles > 1 and ref_info.tiles == 1
    assert np.array_equal(info.mask, ref_info.mask)
    assert info.active_fraction == ref_info.active_fraction
    keep = ~info.mask
    assert np.array_equal(out[keep], image[keep]), "passthrough pixels must be bit-identical"
    return float(np.abs(out.astype(np.float64) - ref).max()), info, ref_info


SIZES = [(53, 71), (64, 96), (37, 101), (2, 90), (90, 3)]


MODES = [("predicted", "dense"), ("predicted", "sparse"), ("predicted", "auto"), ("blobs", "dense"),
         ("blobs", "sparse"), ("full", "sparse"), ("full", "dense")]


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("mask_kind,execution", MODES, ids="-".join)
def test_tiled_equals_untiled_random_net(size, execution, mask_kind):
    net = random_net("tiny", seed=11)
    image = np.random.default_rng(sum(size)).random((*size, 3)).astype(np.float32)
    mask = {"predicted": None, "full": "full"}.get(mask_kind)
    if mask_kind == "blobs":
        mask = make_mask("blobs", *size, seed=2)[0, 0].numpy()
    threshold = _gap_threshold(net, image) if mask is None else None
    diff, info, ref = _compare(net, image, mask, execution, tile=8, threshold=threshold)
    assert diff <= 1e-5, diff
    assert 0 < info.active_fraction < 1 or mask_kind == "full" or min(size) < 4
    assert info.flops_executed <= info.flops_dense
    # the tile kernel computes whole 8x8 tiles where the mask is dense (63 % active ran 90 % of the FLOPs here)
    if execution == "sparse" and info.active_fraction < 0.5:
        assert info.flops_executed < 0.9 * info.flops_dense


@pytest.mark.slow
@pytest.mark.parametrize("size", [(53, 71), (37, 101), (90, 3)], ids=str)
@pytest.mark.parametrize("mask_kind,execution", MODES[:3] + MODES[4:6], ids="-".join)
def test_tiled_equals_untiled_v2_detector(size, execution, mask_kind):
    """The v2 detector's 8x8 cells and wide context: tiles align to 8 and overlap its receptive field."""
    net = random_net("tiny_v2", seed=12)
    image = np.random.default_rng(sum(size) + 1).random((*size, 3)).astype(np.float32)
    mask = {"predicted": None, "full": "full"}.get(mask_kind)
    if mask_kind == "blobs":
        mask = make_mask("blobs", *size, seed=3)[0, 0].numpy()
    threshold = _gap_threshold(net, image) if mask is None else None
    diff, info, _ = _compare(net, image, mask, execution, tile=16, threshold=threshold)
    assert diff <= 1e-5, diff
    assert all(t.top % 8 == 0 and t.left % 8 == 0 for t in plan_tiles(*size, 16, receptive_field(net).min_overlap, 8))


@pytest.mark.slow
@pytest.mark.parametrize("execution", ["dense", "sparse"])
def test_tiled_equals_untiled_default_config_dilated_mask(execution):
    net = random_net("default", seed=4)
    image = np.random.default_rng(9).random((75, 133, 3)).astype(np.float32)
    threshold = _gap_threshold(net, image)
    diff, info, _ = _compare(net, image, None, execution, tile=32, threshold=threshold, dilation=2)
    assert diff <= 1e-5 and info.tiles == 15


@pytest.mark.slow
def test_tiled_equals_untiled_shipped_checkpoint():
    photo = np.asarray(Image.open(EXAMPLE).convert("RGB"))[:397, :389]     # odd sizes
    ref, ref_info = Deblurrer(tile=None).run(photo, return_info=True)
    tiled = Deblurrer(tile=96)
    plan = plan_tiles(397, 389, 96, tiled.tiling.overlap, tiled.tiling.align)
    out, info = tiled.run(photo, return_info=True)
    assert info.tiles == len(plan) > 1 and 0.0 < info.active_fraction < 0.9
    assert np.array_equal(info.mask, ref_info.mask)
    # uint8 out: the float results agree within 1e-5, so a rounded value moves by at most one level
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
    assert np.array_equal(out[~info.mask], photo[~info.mask])
    floats, finfo = Deblurrer(tile=96).run(photo.astype(np.float32) / 255, return_info=True)
    ref_floats = Deblurrer(tile=None).run(photo.astype(np.float32) / 255)
    assert np.abs(floats - ref_floats).max() <= 1e-5
    # FLOPs summed over tiles: the overlaps cost more than the untiled run, at most their share of pixels
    crops = sum((b - t) * (r - l) for t, b, l, r in (tile.crop for tile in plan))
    assert ref_info.flops_dense < finfo.flops_dense <= crops / (397 * 389) * ref_info.flops_dense


def test_batch_tensor_tiled_equals_untiled():
    net = random_net("tiny", seed=1)
    x = torch.rand(2, 3, 41, 58, generator=torch.Generator().manual_seed(3))
    mask = make_mask("blobs", 41, 58, seed=4, batch=2)
    ref, ref_info = Deblurrer(net, tile=None).run(x, mask=mask, return_info=True)
    out, info = Deblurrer(net, tile=12).run(x, mask=mask, return_info=True)
    assert out.shape == x.shape and info.mask.shape == (2, 41, 58) and torch.equal(info.mask, ref_info.mask)
    assert (out - ref).abs().max() <= 1e-5


def test_uint16_and_rgba_tiled_passthrough():
    net = random_net("tiny", seed=2)
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 65536, (30, 45, 4), dtype=np.uint16)
    mask = make_mask("blobs", 30, 45, seed=1)[0, 0].numpy()
    ref = Deblurrer(net, tile=None).run(rgba, mask=mask)
    out, info = Deblurrer(net, tile=8).run(rgba, mask=mask, return_info=True)
    assert out.dtype == np.uint16 and np.array_equal(out[..., 3], rgba[..., 3])
    assert np.array_equal(out[~info.mask], rgba[~info.mask]) and np.abs(out.astype(int) - ref.astype(int)).max() <= 1


# ------------------------------------------------------------------------------------ overlap rule
@pytest.mark.parametrize("name", ["tiny", "default", "tiny_v2"])
def test_too_small_overlap_is_refused_naming_the_minimum(name):
    net = random_net(name)
    field = receptive_field(net)
    minimum = field.min_overlap
    with pytest.raises(ValueError) as err:
        Deblurrer(net, tile=64, tile_overlap=minimum - 1)
    assert f"at least {minimum}" in str(err.value) and "\n" not in str(err.value)
    assert Deblurrer(net, tile=64, tile_overlap=minimum + 1).tiling.overlap == minimum + field.align


def test_overlap_below_the_receptive_field_gives_a_different_result():
    """The minimum is needed: run the tiles with less overlap (bypassing the check) and the output changes."""
    net = reparameterize_model(random_net("tiny", seed=11))
    field = receptive_field(net)
    image = np.random.default_rng(0).random((48, 64, 3)).astype(np.float32)
    deblurrer = Deblurrer(net, tile=None, execution="dense")
    ref = deblurrer.run(image, mask="full")
    full = torch.ones(1, 1, 48, 64, dtype=torch.bool)

    def tiled(overlap):
        prepared = prepare_image(image)
        run = run_tiled(prepared, plan_tiles(48, 64, 16, overlap), deblurrer.executor, deblurrer.network,
                        deblurrer.device, full, threshold=0.5, dilation=0, execution="dense", count_flops=False)
        return prepared.finish(run.output)

    assert np.abs(tiled(field.body) - ref).max() <= 1e-5
    assert np.abs(tiled(field.body - ALIGN) - ref).max() > 1e-4   # far beyond the 1e-5 tolerance


@pytest.mark.parametrize("tile,overlap,needle", [(-1, None, "tile must"), ("big", None, "tile must"),
                                                 (2.5, None, "tile must"), (16, -4, "tile_overlap must"),
                                                 (16, "wide", "tile_overlap must")])
def test_bad_tile_options(tile, overlap, needle):
    with pytest.raises(ValueError, match=needle) as err:
        Deblurrer(random_net("tiny"), tile=tile, tile_overlap=overlap)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------- policy and memory
def test_auto_tiles_above_the_pixel_budget_only(monkeypatch):
    net = random_net("tiny", seed=3)
    image = np.random.default_rng(1).random((40, 50, 3)).astype(np.float32)
    monkeypatch.setattr(tiling, "AUTO_TILE_PIXELS", 40 * 50 - 1)
    monkeypatch.setattr(tiling, "DEFAULT_TILE", 16)
    _, info = Deblurrer(net).run(image, mask="full", return_info=True)
    assert info.tiles == 12
    _, info = Deblurrer(net).run(image[:, :49], mask="full", return_info=True)   # at the budget: whole
    assert info.tiles == 1
    _, info = Deblurrer(net, tile=0).run(image, mask="full", return_info=True)
    assert info.tiles == 1
    assert Tiling.resolve("auto", None, receptive_field(net)).tiles(1, 16, 16) is None


def test_tiled_run_never_builds_the_whole_float_image(monkeypatch):
    def refuse(self):
        raise AssertionError("the whole float image was built")

    monkeypatch.setattr(PreparedImage, "rgb", property(refuse))
    image = np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out, info = Deblurrer(random_net("tiny"), tile=16).run(image, return_info=True)
    assert out.shape == image.shape and info.tiles == 12


def test_plan_tiles_cover_the_image_once():
    for height, width, tile in [(1, 1, 4), (7, 9, 4), (4000, 6000, 1024), (101, 3, 8)]:
        cover = np.zeros((height, width), int)
        for t in plan_tiles(height, width, tile, 28):
            assert t.top % ALIGN == 0 and t.left % ALIGN == 0 and t.crop[0] % ALIGN == 0 and t.crop[2] % ALIGN == 0
            assert t.bottom - t.top <= tile and t.right - t.left <= tile
            cover[t.top:t.bottom, t.left:t.right] += 1
        assert (cover == 1).all()


def test_flops_are_the_sum_of_exact_per_tile_counts():
    net = random_net("tiny", seed=6)
    image = np.random.default_rng(5).random((45, 62, 3)).astype(np.float32)
    mask = make_mask("blobs", 45, 62, seed=3)[0, 0].numpy()
    deblurrer = Deblurrer(net, tile=16, execution="sparse")
    _, info = deblurrer.run(image, mask=mask, return_info=True)
    working = torch.from_numpy(info.mask[::2, ::2].copy())         # one value per 2x2 block
    expected_dense = expected = 0
    # the body pass runs on each tile grown by the body's margin (Tiling.body_overlap), a user mask needs no mask pass
    for t in plan_tiles(45, 62, 16, deblurrer.tiling.overlap, body_overlap=deblurrer.tiling.body_overlap):
        if not working[t.top // 2:-(-t.bottom // 2), t.left // 2:-(-t.right // 2)].any():
            continue
        top, bottom, left, right = t.body_crop
        crop = working[top // 2:-(-bottom // 2), left // 2:-(-right // 2)]
        executor = deblurrer.executor
        plan = split_tiles(crop[None, None], executor.costs.min_fill(executor.sparse_kernel))   # the tiles it ran
        cells = read_cells(plan, 1, *crop.shape).shape[0]                                     # and its stem's cells
        stem_cells = cells if cells * TILE * TILE <= STEM_CELLS_BELOW * crop.numel() else None
        expected += deblurrer.executor.count_flops(1, bottom - top, right - left, int(crop.sum()), "sparse", False,
                                                   plan.tiles, plan.tile_pixels, stem_cells)
        expected_dense += deblurrer.executor.count_flops(1, bottom - top, right - left, 0, "dense", False)
    assert info.execution == "sparse" and info.flops_executed == expected and info.flops_dense == expected_dense


@pytest.mark.slow
def test_cli_tile_option_gives_the_untiled_output(tmp_path, capsys):
    from m2ae_infer.cli import main
    overlap, least = shipped_tiling()    # the smallest tile the CLI takes: 2 x the shipped network's overlap
    photo = np.asarray(Image.open(EXAMPLE).convert("RGB"))
    photo = np.pad(photo, ((0, max(0, 3 * least // 2 - 400)), (0, max(0, least + least // 4 - 400)), (0, 0)),
                   mode="reflect")[:max(150, 3 * least // 2), :max(131, least + least // 4)]
    Image.fromarray(np.ascontiguousarray(photo)).save(tmp_path / "in.png")
    tiles = len(plan_tiles(*photo.shape[:2], least, overlap, receptive_field(Deblurrer().network).align))
    assert main([str(tmp_path / "in.png"), "-o", str(tmp_path / "tiled.png"), "--tile", str(least), "--save-mask"]) == 0
    assert tiles > 1 and f"{tiles} tiles]" in capsys.readouterr().out
    assert main([str(tmp_path / "in.png"), "-o", str(tmp_path / "whole.png"), "--tile", "0", "--save-mask"]) == 0
    tiled, whole = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("tiled", "whole"))
    assert np.abs(tiled - whole).max() <= 1
    masks = [np.asarray(Image.open(tmp_path / f"{n}_mask.png")) for n in ("tiled", "whole")]
    assert np.array_equal(*masks)


@pytest.mark.slow
def test_tiles_run_on_other_backends():
    """The body pass goes through the executor's public run(image, mask): ONNX Runtime tiles too."""
    pytest.importorskip("onnxruntime")
    net = random_net("tiny", seed=8)
    x = np.random.default_rng(4).random((37, 45, 3)).astype(np.float32)
    mask = make_mask("blobs", 37, 45, seed=5)[0, 0].numpy()
    ref = Deblurrer(net, tile=None).run(x, mask=mask)
    out, info = Deblurrer(net, backend="onnxruntime", execution="sparse", tile=16).run(x, mask=mask, return_info=True)
    assert info.tiles == 9 and info.backend == "onnxruntime" and np.abs(out - ref).max() <= 1e-4


def test_body_pass_reads_only_the_body_margin_and_still_equals_untiled():
    """The body pass of a v2 network (detector overlap 264) runs on crops grown by the body's margin only; the
    output equals the untiled run, and the dense FLOPs of a full-mask tiled run shrink accordingly."""
    net = random_net("tiny_v2", seed=31)
    field = receptive_field(reparameterize_model(net))
    untiled = Deblurrer(net, tile=0)
    tiled = Deblurrer(net, tile=64)
    assert tiled.tiling.body_overlap == -(-field.body // field.align) * field.align < tiled.tiling.overlap
    image = torch.rand(1, 3, 150, 170, generator=torch.Generator().manual_seed(8))
    for mask in (None, "full"):
        expected = untiled.run(image, mask=mask)
        out, info = tiled.run(image, mask=mask, return_info=True)
        assert info.tiles > 1 and (out - expected).abs().max() <= 1e-5
    plan = tiled.tiling.tiles(1, 150, 170)
    area = lambda c: (c[1] - c[0]) * (c[3] - c[2])  # noqa: E731
    assert sum(area(t.body_crop) for t in plan) < sum(area(t.crop) for t in plan)
