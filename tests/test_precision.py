"""``precision="bf16"`` of the torch backend: the fp32 reference ``net(image, mask)`` within the documented
bound (``precision.BF16_TOLERANCE``), the same mask as fp32, unmasked pixels bit-identical, sparse equal to dense
within bf16 rounding, FLOPs equal to ``FlopCounterMode`` on the real call; refused in one line where the hardware
has no native bf16. The bf16 numbers need a CPU with AVX-512-BF16 or AMX and skip elsewhere, saying so."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_mask, random_net
from torch.utils.flop_counter import FlopCounterMode

from m2ae_infer import Deblurrer, reparameterize_model
from m2ae_infer import precision as prec
from m2ae_infer.backends import backend_entry, make_backend
from m2ae_infer.errors import InvalidArgument
from m2ae_infer.executor import SPARSE_KERNELS, TorchExecutor
from m2ae_infer.model.mask import full_resolution

NO_BF16 = prec.bf16_unavailable("cpu")
needs_bf16 = pytest.mark.skipif(NO_BF16 is not None, reason=f"torch bf16 needs native bf16: {NO_BF16}")
HEIGHT, WIDTH = 48, 72      # working grid 24 x 36: whole 8x8 tiles and tiles crossing the right edge


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        fn()
    return int(counter.get_total_flops())


@pytest.fixture(scope="module", params=["tiny", "tiny_v2"])
def net(request):
    return reparameterize_model(random_net(request.param, seed=23))


def test_the_torch_entry_offers_bf16():
    assert backend_entry("torch").precisions == ("fp32", "bf16")


@pytest.mark.parametrize("reason", ["this CPU has no native bf16 (AVX-512-BF16 or AMX)"])
def test_refused_in_one_line_without_native_bf16(monkeypatch, reason):
    net = reparameterize_model(random_net("tiny", seed=1))
    monkeypatch.setattr("m2ae_infer.executor.bf16_unavailable", lambda device: reason)
    for build in (lambda: make_backend("torch", net, precision="bf16"),
                  lambda: Deblurrer(net, backend="auto", precision="bf16")):
        with pytest.raises(InvalidArgument) as err:
            build()
        message = str(err.value)
        assert "\n" not in message and reason in message and "precision='fp32'" in message
        assert err.value.parameter == "precision"


def test_bf16_unavailable_names_devices_it_cannot_use():
    assert prec.bf16_unavailable("meta") is None
    assert "not mps" in prec.bf16_unavailable("mps")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU flags from /proc/cpuinfo (Linux)")
def test_cpu_bf16_follows_the_cpu_flags():
    """Native bf16 means the CPU's own bf16 instructions, read here from the kernel's CPU flags (an independent
    source): an AVX-512 CPU without them runs oneDNN's bf16 emulated, slower than fp32, and must be refused."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert (prec.bf16_unavailable("cpu") is None) == native


def test_output_error_and_tolerance_on_known_values():
    reference = torch.zeros(1, 3, 2, 2)
    output = reference.clone()
    output[0, 0, 0, 0] = 0.01
    inside = torch.ones_like(reference, dtype=torch.bool)
    err = prec.output_error(output, reference, inside)
    assert err["max_abs"] == pytest.approx(0.01) and err["mean_abs"] == pytest.approx(0.01 / 12)
    assert err["psnr_db"] == pytest.approx(10 * np.log10(12 / 1e-4)) and err["values"] == 12
    assert prec.within_tolerance(err) and not prec.within_tolerance({**err, "max_abs": 0.5})


@needs_bf16
@pytest.mark.parametrize("kernel", SPARSE_KERNELS)
@pytest.mark.parametrize("execution", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("mask_kind", ["blobs", "full", "random0.3", None])   # None: the network predicts it
def test_within_the_bound_of_fp32_with_its_mask_and_untouched_pixels(net, kernel, execution, mask_kind):
    image = torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(5))
    mask = None if mask_kind is None else make_mask(mask_kind, HEIGHT, WIDTH, seed=3)
    fp32 = TorchExecutor(net, sparse_kernel=kernel).run(image, mask, execution=execution)
    ours = TorchExecutor(net, sparse_kernel=kernel, precision="bf16").run(image, mask, execution=execution)
    assert ours.output.dtype == torch.float32 and torch.equal(ours.mask, fp32.mask)
    assert ours.execution in ("sparse", "dense") and (execution == "auto" or ours.execution == execution)
    changed = full_resolution(ours.mask, (HEIGHT, WIDTH)).expand_as(image)
    assert torch.equal(ours.output[~changed], image[~changed])
    if changed.any():
        err = prec.output_error(ours.output, fp32.output, changed)
        assert prec.within_tolerance(err), err
        assert err["max_abs"] > 0      # it did run in bf16: fp32 would match to ~1e-7


@needs_bf16
@pytest.mark.parametrize("kernel", SPARSE_KERNELS)
def test_sparse_equals_dense_within_bf16_rounding(net, kernel):
    image = torch.rand(2, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(6))
    mask = torch.cat([make_mask("blobs", HEIGHT, WIDTH, seed=s) for s in (1, 2)])
    executor = TorchExecutor(net, sparse_kernel=kernel, precision="bf16")
    sparse, dense = (executor.run(image, mask, execution=k).output for k in ("sparse", "dense"))
    changed = full_resolution(executor.run(image, mask).mask, (HEIGHT, WIDTH)).expand_as(image)
    assert prec.within_tolerance(prec.output_error(sparse, dense, changed))


@needs_bf16
@pytest.mark.parametrize("kernel", SPARSE_KERNELS)
@pytest.mark.parametrize("execution", ["sparse", "dense"])
def test_flop_count_equals_the_counter_on_the_real_call(net, kernel, execution):
    image = torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(8))
    mask = make_mask("blobs", HEIGHT, WIDTH, seed=9)
    executor = TorchExecutor(net, sparse_kernel=kernel, precision="bf16")
    result = executor.run(image, mask, execution=execution)
    counted = _flops(lambda: executor.run(image, mask, execution=execution))
    assert counted > 0 and executor.count_flops(1, HEIGHT, WIDTH, result.active_pixels, result.execution, False,
                                                result.sparse_tiles, result.tile_pixels, result.stem_cells) == counted


@needs_bf16
@pytest.mark.slow
@pytest.mark.parametrize("tile", [None, 96])
def test_the_shipped_checkpoint_through_the_api_stays_within_the_bound(tile):
    """The documented bound on the photo it was measured on (the example photo and its mask), untiled and tiled."""
    from m2ae_infer.export.onnx import example_inputs
    fp32 = Deblurrer(tile=None)
    for _, image, mask in example_inputs():
        executor = TorchExecutor(fp32.network, precision="bf16")
        for execution in ("sparse", "dense"):
            output = executor.run(image, mask, execution=execution).output
            err = prec.error_against_fp32(fp32.network, image, mask, output)
            assert prec.within_tolerance(err), (execution, err)
    rgb = image[0].permute(1, 2, 0).numpy()
    ours, info = Deblurrer(precision="bf16", tile=tile).run(rgb, mask=mask[0, 0].numpy(), return_info=True)
    ref, ref_info = Deblurrer(tile=tile).run(rgb, mask=mask[0, 0].numpy(), return_info=True)
    assert info.tiles == ref_info.tiles and (info.tiles > 1) == bool(tile)
    assert np.array_equal(info.mask, ref_info.mask) and np.array_equal(ours[~info.mask], rgb[~info.mask])
    assert 0 < np.abs(ours - ref).max() <= prec.BF16_TOLERANCE["max_abs"]
