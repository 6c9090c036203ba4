"""Contract 2 and 4: sparse execution equals dense masked execution; its cost follows the mask."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from m2ae_infer import M2AEConfig, M2AENet, reparameterize_model
from m2ae_infer.benchmarks.masks import working_density_mask
from m2ae_infer.executor import SPARSE_KERNELS, TorchExecutor
from m2ae_infer.kernels.reference import (SparseStage, active_pixels, neighbour_offsets, padded_rows,
                                          shuffle_targets, sparse_stage_, sparse_tail_, to_padded_buffer)
from m2ae_infer.kernels import reference
from m2ae_infer.model.mask import full_resolution
from helpers import MASK_KINDS, make_mask, random_net

SIZES = [(1, 1), (3, 5), (16, 16), (21, 34)]


@pytest.fixture(scope="module", params=[(cfg, kernel) for cfg in ("tiny", "tiny_v2") for kernel in SPARSE_KERNELS],
                ids=lambda p: "-".join(p))
def executor(request):
    """Every sparse kernel of the torch executor: per pixel, tiled, and the cost model's mix of the two."""
    config, kernel = request.param
    return TorchExecutor(reparameterize_model(random_net(config, seed=11)), sparse_kernel=kernel)


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_sparse_equals_dense_masked(executor, size, mask_kind):
    image = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(7))
    mask = make_mask(mask_kind, *size, seed=3, batch=2)
    sparse = executor.run(image, mask, execution="sparse")
    dense = executor.run(image, mask, execution="dense")
    assert sparse.execution == "sparse" and dense.execution == "dense"
    assert torch.equal(sparse.mask, dense.mask)
    err = (sparse.output - dense.output).abs().max().item()
    assert err <= 1e-5, f"sparse vs dense max abs error {err:.3e}"
    # Pixels outside the working mask come back bit-identical to the input (independent of both paths).
    untouched = ~full_resolution(sparse.mask, size).expand_as(image)
    assert torch.equal(sparse.output[untouched], image[untouched])
    assert torch.equal(dense.output[untouched], image[untouched])


@pytest.mark.parametrize("mask_kind", ["random0.2", "blobs", "borders"])
def test_sparse_equals_training_network(mask_kind):
    """End to end against the independent reference: the training-form network with BN branches."""
    net = random_net(M2AEConfig(channels=16, num_blocks=3, mask_channels=8, motion_channels=8, ffn_expand=2),
                     seed=12)
    executor = TorchExecutor(reparameterize_model(net))
    image = torch.rand(1, 3, 27, 40)
    mask = make_mask(mask_kind, 27, 40, seed=5)
    with torch.no_grad():
        expected = net(image, mask)
    err = (executor.run(image, mask, execution="sparse").output - expected).abs().max().item()
    assert err <= 1e-5 * (expected.max() - expected.min()).item()


@pytest.mark.parametrize("mask_kind", ["random0.3", "blobs"])
def test_sparse_equals_dense_across_gemm_chunks(executor, mask_kind, monkeypatch):
    """fp32 (oneDNN's matmul on CPU) with the per-pixel rows in many chunks and the tiles in many pieces."""
    from m2ae_infer.kernels import tiles
    monkeypatch.setattr(reference, "CHUNK_ROWS", 5)
    monkeypatch.setattr(tiles, "POINTWISE_ROWS", 70)
    image = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(4))
    mask = make_mask(mask_kind, 40, 56, seed=6)
    sparse = executor.run(image, mask, execution="sparse")
    dense = executor.run(image, mask, execution="dense")
    assert (sparse.output - dense.output).abs().max().item() <= 1e-5


def test_predicted_mask_sparse_equals_dense(executor):
    image = torch.rand(1, 3, 30, 44)
    sparse = executor.run(image, execution="sparse", threshold=0.5, dilation=1)
    dense = executor.run(image, execution="dense", threshold=0.5, dilation=1)
    assert torch.equal(sparse.mask, dense.mask)
    assert (sparse.output - dense.output).abs().max().item() <= 1e-5


@pytest.mark.parametrize("channels,mid,ffn", [(16, 16, 16), (12, 20, 8), (5, 7, 3)])
@pytest.mark.parametrize("mask_kind", ["one_pixel", "borders", "random0.3", "full"])
@pytest.mark.parametrize("chunk", [None, 7], ids=["one-chunk", "chunks-of-7"])
def test_sparse_stage_matches_conv2d(channels, mid, ffn, mask_kind, chunk, monkeypatch):
    """The torch spec of one stage against F.conv2d computed everywhere, in float64; also with the active rows
    gathered in several chunks (``CHUNK_ROWS``), as large masks are."""
    if chunk is not None:
        monkeypatch.setattr(reference, "CHUNK_ROWS", chunk)
    gen = torch.Generator().manual_seed(channels)
    spatial = torch.nn.Conv2d(channels, mid, 3, padding=1).double()
    mix_in, mix_out = torch.nn.Conv2d(mid, 2 * ffn, 1).double(), torch.nn.Conv2d(ffn, channels, 1).double()
    stage = SparseStage.from_convs(spatial, "gelu", [mix_in, mix_out])
    x = torch.randn(2, channels, 9, 13, generator=gen, dtype=torch.float64)
    m = make_mask(mask_kind, 9, 13, batch=2)
    with torch.no_grad():
        h = F.gelu(F.conv2d(x, spatial.weight, spatial.bias, padding=1))
        a, b = F.conv2d(h, mix_in.weight, mix_in.bias).chunk(2, dim=1)
        expected = torch.where(m, x + F.conv2d(a * b, mix_out.weight, mix_out.bias), x)
    buffer = to_padded_buffer(x)
    coords = active_pixels(m[:, 0])
    sparse_stage_(buffer, padded_rows(*coords, 9, 13), neighbour_offsets(13), stage)
    actual = buffer.view(2, 11, 15, channels)[:, 1:-1, 1:-1].permute(0, 3, 1, 2)
    assert (actual - expected).abs().max().item() <= 1e-12
    assert torch.equal(actual[~m.expand_as(x)], x[~m.expand_as(x)])
    assert torch.count_nonzero(buffer.view(2, 11, 15, channels)[:, [0, -1]]) == 0   # zero border intact


def test_sparse_tail_matches_pixel_shuffle():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 6, 4, 5, generator=gen, dtype=torch.float64)
    image = torch.rand(2, 3, 8, 10, generator=gen, dtype=torch.float64)
    tail = torch.nn.Conv2d(6, 12, 1).double()
    m = make_mask("random0.4", 4, 5, batch=2)
    with torch.no_grad():
        expected = torch.where(full_resolution(m, (8, 10)), image + F.pixel_shuffle(tail(features), 2), image)
    coords = active_pixels(m[:, 0])
    out = image.clone()
    sparse_tail_(out, image, to_padded_buffer(features), padded_rows(*coords, 4, 5),
                 shuffle_targets(*coords, 3, 2, 8, 10), tail.weight.detach().flatten(1).t(), tail.bias.detach())
    assert (out - expected).abs().max().item() <= 1e-12


def test_auto_switches_to_dense_above_threshold(executor):
    """``auto``: dense for a full mask (no sparse kernel beats dense there), sparse for one pixel of 32x32 working
    pixels, and dense whatever the mask above ``dense_above``."""
    image = torch.rand(1, 3, 64, 64)
    assert executor.run(image, make_mask("full", 64, 64)).execution == "dense"
    assert executor.run(image, make_mask("one_pixel", 64, 64)).execution == "sparse"
    assert executor.run(image, make_mask("empty", 64, 64)).execution == "sparse"
    low = TorchExecutor(reparameterize_model(random_net("tiny")), dense_above=0.0)
    assert low.run(image, make_mask("one_pixel", 64, 64)).execution == "dense"


def test_auto_follows_the_cost_model():
    """Where the cost model (``KernelCosts.body``) puts a sparse call at or above the dense body, ``auto`` runs dense:
    a scattered 60 % mask per pixel (pixel cost * 0.6 > 1), and the same mask tiled (every tile active)."""
    from m2ae_infer.executor import KERNEL_COSTS
    assert KERNEL_COSTS["fp32"].pixel * 0.6 > 1.0 and KERNEL_COSTS["fp32"].tile > 1.0
    image = torch.rand(1, 3, 64, 64)
    mask = full_resolution(make_mask("random0.6", 32, 32, seed=4), (64, 64))
    for kernel in SPARSE_KERNELS:
        ex = TorchExecutor(reparameterize_model(random_net("tiny")), sparse_kernel=kernel)
        assert ex.run(image, mask).execution == "dense", kernel
        assert ex.run(image, mask, execution="sparse").execution == "sparse", kernel


def test_rejects_training_form_and_bad_execution():
    with pytest.raises(ValueError, match="reparameterize"):
        TorchExecutor(random_net("tiny"))
    ex = TorchExecutor(reparameterize_model(random_net("tiny")))
    with pytest.raises(ValueError, match="execution"):
        ex.run(torch.rand(1, 3, 4, 4), execution="fast")


def counted_flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def default_executor():
    return TorchExecutor(reparameterize_model(M2AENet(M2AEConfig()).eval()))


@pytest.mark.parametrize("mask_kind", ["blobs", "random0.2"])
def test_flops_follow_the_mask_default_config(default_executor, mask_kind):
    """At ~20 % active pixels the default config executes <= 0.3 of the dense FLOPs (real runs counted)."""
    h, w = 96, 128
    image = torch.rand(1, 3, h, w)
    if mask_kind == "blobs":
        mask = working_density_mask("blobs", h, w, 0.2, seed=9)
    else:   # scattered working pixels (a random full-resolution mask would activate far more 2x2 blocks)
        mask = full_resolution(make_mask("random0.2", h // 2, w // 2, seed=2), (h, w))
    frac = default_executor.run(image, mask, execution="sparse").mask.float().mean().item()
    assert 0.15 <= frac <= 0.25
    sparse = counted_flops(lambda: default_executor.run(image, mask, execution="sparse"))
    dense = counted_flops(lambda: default_executor.run(image, mask, execution="dense"))
    assert sparse <= 0.3 * dense, f"sparse/dense FLOPs {sparse / dense:.3f} at {frac:.2%} active"
    # The meta-device count used for Deblurrer stats agrees with the count of the real runs.
    run = default_executor.run(image, mask, execution="sparse")
    assert default_executor.count_flops(1, h, w, run.active_pixels, "sparse", False, run.sparse_tiles,
                                        run.tile_pixels, run.stem_cells) == sparse
    assert default_executor.count_flops(1, h, w, run.active_pixels, "dense", predict_mask=False) == dense


def test_flops_scale_with_active_pixels(default_executor, monkeypatch):
    """The body's FLOPs, with the dense stem (the sparse stem's own count: tests/test_cells.py, test_bench.py)."""
    import m2ae_infer.executor as executor_mod
    monkeypatch.setattr(executor_mod, "STEM_CELLS_BELOW", -1.0)
    image = torch.rand(1, 3, 64, 64)
    counts = [counted_flops(lambda: default_executor.run(image, make_mask(k, 64, 64), execution="sparse"))
              for k in ("empty", "one_pixel", "random0.5", "full")]
    assert counts[0] < counts[1] < counts[2] < counts[3]
    per_pixel = counts[1] - counts[0]
    full_active = 32 * 32
    assert counts[3] - counts[0] == pytest.approx(per_pixel * full_active, rel=1e-9)


@pytest.mark.parametrize("sparse_kernel", ["pixels", "tiles"])
def test_every_pixel_active_counts_the_dense_flops(sparse_kernel, monkeypatch):
    """With every working pixel active, the sparse body runs the dense body's multiply-adds as GEMMs:
    ``FlopCounterMode`` must count them as it counts the dense path's convolutions."""
    import m2ae_infer.executor as executor_mod
    monkeypatch.setattr(executor_mod, "STEM_CELLS_BELOW", -1.0)
    executor = TorchExecutor(reparameterize_model(random_net("tiny_v2", seed=12)), sparse_kernel=sparse_kernel)
    image, mask = torch.rand(1, 3, 48, 64), torch.ones(1, 1, 48, 64, dtype=torch.bool)
    sparse = counted_flops(lambda: executor.run(image, mask, execution="sparse"))
    dense = counted_flops(lambda: executor.run(image, mask, execution="dense"))
    assert sparse == dense > 0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows,k,m", [(1, 16, 32), (37, 288, 32), (4096, 32, 64), (5, 32, 12)])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "contiguous"])
def test_affine_matches_linear(dtype, tol, rows, k, m, packed, monkeypatch):
    """oneDNN's matmul (addmm in float64, which oneDNN lacks) against ``F.linear`` in float64, for a weight packed
    as :meth:`SparseStage.from_convs` packs it and for a plain contiguous ``[K, M]`` one; under ``FlopCounterMode``
    it runs addmm and counts ``2 N K M``."""
    calls = []
    if reference._ONEDNN_LINEAR_OP is not None:
        op = reference._ONEDNN_LINEAR_OP
        monkeypatch.setattr(reference, "_ONEDNN_LINEAR_OP", lambda *a: calls.append(1) or op(*a))
    g = torch.Generator().manual_seed(rows + k + m)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(m, k, generator=g) / k ** 0.5, torch.randn(m, generator=g)
    weight = w.to(dtype).t() if packed else w.t().contiguous().to(dtype)
    out = reference.affine(x.to(dtype), weight, b.to(dtype))
    expected = F.linear(x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double())
    assert out.dtype == dtype and out.shape == (rows, m)
    assert (out.double() - expected).abs().max().item() <= tol * max(1.0, expected.abs().max().item())
    assert len(calls) == (reference._ONEDNN_LINEAR_OP is not None and dtype != torch.float64)
    counter = FlopCounterMode(display=False)
    with counter:
        counted = reference.affine(x.to(dtype), weight, b.to(dtype))
    assert counter.get_total_flops() == 2 * rows * k * m
    assert (counted.double() - expected).abs().max().item() <= tol * max(1.0, expected.abs().max().item())


def test_kernel_costs_come_from_the_machines_file(tmp_path, monkeypatch):
    """``M2AE_KERNEL_COSTS`` names a JSON table of this machine's constants (what ``tile_sparse --write-costs``
    writes): the executor's cost model and its tile split follow it; unset, the defaults; a bad file is one line."""
    from m2ae_infer.benchmarks.tile_sparse import write_costs
    from m2ae_infer.errors import CostsFileError
    from m2ae_infer.executor import COSTS_ENV, KERNEL_COSTS, kernel_costs
    monkeypatch.delenv(COSTS_ENV, raising=False)
    assert kernel_costs("fp32") == KERNEL_COSTS["fp32"]
    path = tmp_path / "costs.json"
    write_costs(str(path), "fp32", 2.5, 1.25)
    write_costs(str(path), "bf16", 3.0, 1.5)          # merged: fp32 kept
    monkeypatch.setenv(COSTS_ENV, str(path))
    costs = kernel_costs("fp32")
    assert (costs.pixel, costs.tile, costs.compiled_dense) == (2.5, 1.25, KERNEL_COSTS["fp32"].compiled_dense)
    assert (kernel_costs("bf16").pixel, kernel_costs("bf16").tile) == (3.0, 1.5)
    executor = TorchExecutor(reparameterize_model(random_net("tiny_v2", seed=3)))
    assert executor.costs == costs and executor.costs.min_fill("auto") == 0.5
    for text, needle in [("{not json", "cannot read"), ('{"fp32": {"pixel": -1}}', "fp32.pixel must be a positive"),
                         ('{"fp32": {"tile": "fast"}}', "fp32.tile must be a positive"), ("[1, 2]", "not a")]:
        path.write_text(text)
        with pytest.raises(CostsFileError) as exc:
            kernel_costs("fp32")
        assert needle in str(exc.value) and COSTS_ENV in str(exc.value) and "\n" not in str(exc.value)
    mine = tmp_path / "notes.json"
    mine.write_text("[1, 2, 3]")                       # not a cost table: never overwritten
    with pytest.raises(ValueError, match="not a cost table"):
        write_costs(str(mine), "fp32", 2.0, 1.0)
    assert mine.read_text() == "[1, 2, 3]"


def test_tile_sparse_cli_writes_a_cost_file_the_executor_reads(tmp_path, monkeypatch):
    """``python -m m2ae_infer.benchmarks.tile_sparse --write-costs FILE`` end to end (a tiny grid): the file holds
    this run's medians and ``kernel_costs`` returns them; a file there that is not a cost table is refused, kept."""
    import subprocess
    import sys
    from m2ae_infer.executor import COSTS_ENV, kernel_costs
    path = tmp_path / "costs.json"
    cmd = [sys.executable, "-m", "m2ae_infer.benchmarks.tile_sparse", "--resolution", "48x64", "--densities",
           "0.2,0.5", "--repeats", "1", "--threads", "1", "--write-costs", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json
    written = json.loads(path.read_text())["fp32"]
    monkeypatch.setenv(COSTS_ENV, str(path))
    assert (kernel_costs("fp32").pixel, kernel_costs("fp32").tile) == (written["pixel"], written["tile"])
    path.write_text("[1]")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)    # the variable names it: one line
    assert proc.returncode == 2 and COSTS_ENV in proc.stderr and "Traceback" not in proc.stderr
    monkeypatch.delenv(COSTS_ENV)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a cost table" in proc.stderr and path.read_text() == "[1]"
