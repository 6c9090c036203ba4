"""backend="openvino": the exported graphs in OpenVINO's CPU plugin agree with the torch dense reference
``net(image, mask)`` (fp32: <= 1e-4, unmasked pixels bit-identical, same FLOP count), through the registry and
the API, tiled and untiled; bf16 is an opt-in refused where the CPU lacks it and held to its documented bound
where it has it; engines without bf16 refuse it in one line (torch's own bf16: tests/test_precision.py)."""
from __future__ import annotations

import importlib.util
import inspect
import sys

import numpy as np
import pytest
import torch
from helpers import make_mask, random_net
from torch.utils.flop_counter import FlopCounterMode

from m2ae_infer import Deblurrer, reparameterize_model
from m2ae_infer.backends import Backend, backend_entry, backend_names, make_backend
from m2ae_infer.errors import InvalidArgument
from m2ae_infer.executor import TorchExecutor
from m2ae_infer.export import openvino as ovx
from m2ae_infer.model.mask import full_resolution, pad_to_even
from m2ae_infer import precision as prec

WHY = "openvino is not installed: pip install 'm2ae-infer[openvino]'"
needs_openvino = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("openvino", "onnx", "onnxscript")),
                                    reason=WHY)
FP32_TOLERANCE = 1e-4              # the backends-agree contract (export.onnx.TOLERANCE["fp32"])
HEIGHT, WIDTH = 32, 40


@pytest.fixture(scope="module")
def net():
    return reparameterize_model(random_net("tiny", seed=41))


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def threshold(net, image):
    """A threshold that splits the predicted mask near its median, in the widest gap between neighbouring
    probabilities there: random mask heads predict nearly constant probabilities, and no pixel may sit within
    float rounding of the threshold (that pixel could flip between engines)."""
    padded = pad_to_even(image)
    with torch.no_grad():
        probs = torch.sigmoid(net.mask_logits(padded, net.stem_features(padded))).flatten().double().sort().values
    lo, hi = int(0.3 * probs.numel()), int(0.7 * probs.numel())
    gaps = probs[lo + 1:hi] - probs[lo:hi - 1]
    at = lo + int(gaps.argmax())
    assert gaps.max() > 1e-6
    return float((probs[at] + probs[at + 1]) / 2)


@pytest.fixture(scope="module")
def engine(net, threshold):
    pytest.importorskip("openvino", reason=WHY)
    return make_backend("openvino", net, execution="sparse", threshold=threshold, threads=1)


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------ fast: interface, refusals
def test_registered_with_the_protocol_signatures_and_bf16():
    assert "openvino" in backend_names() and backend_entry("openvino").precisions == ("fp32", "bf16")
    cls = ovx.OpenVinoExecutor
    assert cls.name == "openvino" and isinstance(cls.measures_memory, bool)
    for method in ("choose", "prepare", "run", "count_flops"):
        ours, theirs = inspect.signature(getattr(Backend, method)), inspect.signature(getattr(cls, method))
        assert list(theirs.parameters) == list(ours.parameters), method


@pytest.mark.parametrize("backend", ["onnxruntime", "triton", "tensorrt"])
def test_engines_without_bf16_refuse_it_in_one_line_naming_those_with_it(net, backend):
    with pytest.raises(InvalidArgument) as err:
        Deblurrer(net, backend=backend, precision="bf16")   # refused before any engine is built
    message = str(err.value)
    assert "\n" not in message and "'torch' or 'openvino'" in message and err.value.parameter == "precision"
    with pytest.raises(ValueError, match="offered by backend 'torch' or 'openvino'"):
        make_backend(backend, net, precision="bf16")


@pytest.mark.parametrize("precision", ["fp16", "FP32", "", None])
def test_unknown_precision_is_an_invalid_argument(net, precision):
    with pytest.raises(InvalidArgument, match="precision must be one of"):
        Deblurrer(net, backend="openvino", precision=precision)


def test_missing_openvino_is_one_line_naming_the_extra(net, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)     # `import openvino` raises ImportError
    with pytest.raises(ValueError) as err:
        make_backend("openvino", net)
    message = str(err.value)
    assert "\n" not in message and message.startswith("backend 'openvino' needs openvino")
    assert "pip install 'm2ae-infer[openvino]'" in message


@needs_openvino
def test_bf16_is_refused_on_a_cpu_without_it(net, monkeypatch):
    monkeypatch.setattr(ovx, "cpu_precisions", lambda: ("fp32",))
    with pytest.raises(ValueError) as err:
        make_backend("openvino", net, precision="bf16")
    message = str(err.value)
    assert "\n" not in message and "precision='bf16' needs a CPU with bf16" in message and "fp32" in message


@needs_openvino
def test_cpu_precisions_follow_the_plugins_capabilities():
    import openvino as ov
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert ovx.cpu_precisions() == (("fp32", "bf16") if "BF16" in caps else ("fp32",))


# ------------------------------------------------------------------------------------ slow: numbers
@pytest.mark.slow
@needs_openvino
@pytest.mark.parametrize("execution", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("mask_kind", ["blobs", "full", None])      # None: the graph predicts the mask
def test_matches_the_torch_dense_reference(engine, net, image, threshold, execution, mask_kind):
    mask = None if mask_kind is None else make_mask(mask_kind, HEIGHT, WIDTH, seed=2)
    result = engine.run(image, mask, threshold=threshold, execution=execution)
    expected = TorchExecutor(net).run(image, mask, threshold=threshold, execution=execution)
    assert torch.equal(result.mask, expected.mask)
    # auto: OpenVINO's own switch (torch's auto follows the cost model of its two sparse kernels)
    dense = result.active_pixels > ovx.OPENVINO_DENSE_ABOVE * result.mask.numel()
    assert result.execution == (execution if execution != "auto" else "dense" if dense else "sparse")
    assert 0 < result.active_pixels < result.mask.numel() or mask_kind == "full"
    with torch.no_grad():
        reference = net(image, mask, threshold=threshold)
    assert (result.output - reference).abs().max() <= FP32_TOLERANCE
    outside = ~full_resolution(result.mask, (HEIGHT, WIDTH)).expand_as(image)
    assert torch.equal(result.output[outside], image[outside])
    predicted = mask is None
    ours = engine.count_flops(1, HEIGHT, WIDTH, result.active_pixels, result.execution, predicted)
    assert ours == TorchExecutor(net).count_flops(1, HEIGHT, WIDTH, result.active_pixels, result.execution, predicted)
    if result.execution == "dense":
        assert ours == _flops(lambda: net(image, mask, threshold=threshold))


@pytest.mark.slow
@needs_openvino
@pytest.mark.parametrize("width", [850, 854, 856])    # working widths 425, 427, 428: 480p is 854 wide
def test_sparse_is_exact_where_float_division_rounds_down(engine, net, width):
    """Where OpenVINO's float Div (a multiplication by the reciprocal) floored 854 / 427 to 1, a sparse graph
    that divided flat indices by the width read wrong neighbours (errors up to 0.9); the graph now takes (y, x)
    from a 2-D NonZero."""
    image = torch.rand(1, 3, 6, width, generator=torch.Generator().manual_seed(10))
    mask = make_mask("full", 6, width)
    result = engine.run(image, mask, execution="sparse")
    with torch.no_grad():
        assert (result.output - net(image, mask)).abs().max() <= FP32_TOLERANCE


@pytest.mark.slow
@needs_openvino
def test_auto_follows_the_density_of_a_user_mask(engine):
    blobs, full = make_mask("blobs", HEIGHT, WIDTH, seed=2), make_mask("full", HEIGHT, WIDTH)
    image = torch.rand(2, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(8))
    assert engine.run(image, torch.cat([blobs, blobs]), execution="auto").execution == "sparse"
    batch = engine.run(image, torch.cat([full, full]), execution="auto")
    assert batch.execution == "dense" and batch.output.shape == image.shape


@pytest.mark.slow
@needs_openvino
@pytest.mark.parametrize("tile", [0, 16])
def test_deblurrer_openvino_equals_torch_untiled_and_tiled(net, tile):
    rgb = torch.rand(HEIGHT, WIDTH, 3, generator=torch.Generator().manual_seed(9)).numpy()
    mask = make_mask("blobs", HEIGHT, WIDTH, seed=4)[0, 0].numpy()
    ours, info = Deblurrer(net, backend="openvino", tile=tile, execution="sparse").run(rgb, mask=mask, return_info=True)
    torch_out, torch_info = Deblurrer(net, backend="torch", tile=0).run(rgb, mask=mask, return_info=True)
    assert info.backend == "openvino" and (info.tiles > 1) == bool(tile)
    assert np.abs(ours - torch_out).max() <= FP32_TOLERANCE
    assert np.array_equal(ours[~info.mask], rgb[~info.mask]) and np.array_equal(info.mask, torch_info.mask)


@pytest.mark.slow
def test_bf16_proxy_reproduces_the_documented_figures():
    """The figures BF16_TOLERANCE is built on (torch bf16 stand-ins, any CPU) stay inside it."""
    from m2ae_infer.export.onnx import example_inputs
    net = Deblurrer(tile=None).network
    _, image, mask = example_inputs()[0]
    for engine in ("torch-autocast", "torch-bf16"):
        err = ovx.bf16_error(net, image, mask, engine)
        assert 0 < err["max_abs"] <= ovx.BF16_TOLERANCE["max_abs"], (engine, err)
        assert err["mean_abs"] <= ovx.BF16_TOLERANCE["mean_abs"] and err["psnr_db"] >= ovx.BF16_TOLERANCE["min_psnr_db"]


@pytest.mark.slow
@needs_openvino
def test_bf16_within_the_documented_bound_on_the_shipped_checkpoint():
    if "bf16" not in ovx.cpu_precisions():
        pytest.skip("this CPU has no bf16 (OpenVINO's OPTIMIZATION_CAPABILITIES lack BF16)")
    from m2ae_infer.export.onnx import example_inputs
    deblurrer = Deblurrer(backend="openvino", precision="bf16", execution="dense", tile=None)
    for _, image, mask in example_inputs():
        err = ovx.bf16_error(deblurrer.network, image, mask, "openvino")
        assert err["max_abs"] <= ovx.BF16_TOLERANCE["max_abs"] and err["mean_abs"] <= ovx.BF16_TOLERANCE["mean_abs"]
        assert err["psnr_db"] >= ovx.BF16_TOLERANCE["min_psnr_db"]
        result = deblurrer.executor.run(image, mask, execution="dense")
        outside = ~full_resolution(result.mask, image.shape[-2:]).expand_as(image)
        assert torch.equal(result.output[outside], image[outside])


@pytest.mark.slow
@needs_openvino
@pytest.mark.parametrize("execution", ["dense", "sparse", "auto"])
def test_bf16_predicts_the_fp32_mask(execution):
    """In bf16 the mask graph stays f32: a predicted mask equals the fp32 torch one (bf16 logits flipped ~2 % of the
    coin photo's mask), and the restored pixels stay within the bound."""
    if "bf16" not in ovx.cpu_precisions():
        pytest.skip("this CPU has no bf16 (OpenVINO's OPTIMIZATION_CAPABILITIES lack BF16)")
    from m2ae_infer.benchmarks.photos import real_photos
    deblurrer = Deblurrer(backend="openvino", precision="bf16", execution=execution, tile=None)
    for _, image in real_photos(240, 320, 0)[:2]:
        ours = deblurrer.executor.run(image, threshold=deblurrer.threshold, execution=execution)
        reference = TorchExecutor(deblurrer.network).run(image, threshold=deblurrer.threshold, execution="dense")
        assert torch.equal(ours.mask, reference.mask)
        changed = full_resolution(ours.mask, image.shape[-2:]).expand_as(image)
        assert torch.equal(ours.output[~changed], image[~changed])
        if changed.any():
            assert prec.within_tolerance(prec.output_error(ours.output, reference.output, changed))
