"""The backend interface (m2ae_infer.backends): every engine implements the one protocol, the registry is
the only place that maps names to engines, and a newly registered engine works through the API unchanged."""
from __future__ import annotations

import inspect

import pytest
import torch

from m2ae_infer import Deblurrer, reparameterize_model
from m2ae_infer.backends import (EXECUTIONS, Backend, ExecutionResult, backend_entry, backend_names,
                                 choose_execution, make_backend, register_backend)
from m2ae_infer.executor import TorchExecutor
from helpers import make_mask, random_net

PROTOCOL_METHODS = ("choose", "prepare", "run", "count_flops")


def _engine_classes():
    from m2ae_infer.export.openvino import OpenVinoExecutor   # imports no openvino until built
    from m2ae_infer.export.ort import OrtExecutor
    from m2ae_infer.export.trt import TrtExecutor
    from m2ae_infer.triton_executor import TritonExecutor   # imports no triton until built
    return {"torch": TorchExecutor, "triton": TritonExecutor, "onnxruntime": OrtExecutor, "tensorrt": TrtExecutor,
            "openvino": OpenVinoExecutor}


def test_every_registered_engine_class_has_the_protocol_with_its_signatures():
    classes = _engine_classes()
    assert set(backend_names()) == set(classes)
    for name, cls in classes.items():
        assert cls.name == name and isinstance(cls.measures_memory, bool)
        for method in PROTOCOL_METHODS:
            ours, theirs = inspect.signature(getattr(Backend, method)), inspect.signature(getattr(cls, method))
            assert list(theirs.parameters) == list(ours.parameters), (name, method)


@pytest.mark.parametrize("name", ["auto", "torch", "onnxruntime"])
def test_built_engines_satisfy_the_protocol_and_agree_with_the_dense_reference(name):
    if name == "onnxruntime":
        pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    net = reparameterize_model(random_net("tiny", seed=21))
    engine = make_backend(name, net, execution="sparse")
    assert isinstance(engine, Backend) and engine.name == ("torch" if name == "auto" else name)
    image = torch.rand(1, 3, 20, 26, generator=torch.Generator().manual_seed(5))
    mask = make_mask("blobs", 20, 26)
    result = engine.run(image, mask, execution="sparse")
    assert isinstance(result, ExecutionResult) and result.execution == "sparse"
    with torch.no_grad():
        reference = net(image, mask)
    assert (result.output - reference).abs().max() <= 1e-4
    outside = ~torch.nn.functional.interpolate(result.mask.float(), size=(20, 26)).bool().expand_as(image)
    assert torch.equal(result.output[outside], image[outside])


def test_choose_execution_rule():
    assert [choose_execution("auto", a, 100, 0.45) for a in (0, 45, 46, 100)] == ["sparse", "sparse", "dense", "dense"]
    assert all(choose_execution(e, 7, 100, 0.45) == e for e in EXECUTIONS if e != "auto")
    with pytest.raises(ValueError, match="execution must be one of"):
        choose_execution("fast", 0, 1, 0.5)


def test_unknown_backend_is_one_line_naming_the_choices():
    with pytest.raises(ValueError) as err:
        make_backend("openvinoo", reparameterize_model(random_net("tiny", seed=1)))
    message = str(err.value)
    assert "\n" not in message and "openvinoo" in message and all(n in message for n in backend_names())
    with pytest.raises(ValueError, match="backend must be one of"):
        Deblurrer(random_net("tiny", seed=1), backend="openvinoo")


def test_a_newly_registered_engine_runs_through_the_api_and_bench_registry():
    """A third-party engine needs nothing but the protocol and register_backend: the API builds it by name and
    calls it; here it wraps the torch executor and counts its calls."""
    calls = []

    class Counting(TorchExecutor):
        name = "counting"

        def run(self, image, mask=None, *, threshold=0.5, dilation=0, execution="auto"):
            calls.append(execution)
            return super().run(image, mask, threshold=threshold, dilation=dilation, execution=execution)

    register_backend("counting", lambda net, *, device, **_: Counting(net.to(device)), "test engine",
                     timed_devices=("cuda",), untimed_reason="a test engine")
    try:
        net = random_net("tiny", seed=2)
        image = torch.rand(18, 22, 3, generator=torch.Generator().manual_seed(3)).numpy()
        ours, info = Deblurrer(net, backend="counting", tile=0).run(image, mask="full", return_info=True)
        plain = Deblurrer(net, backend="torch", tile=0).run(image, mask="full")
        assert calls and info.backend == "counting" and (ours == plain).all()
        assert not backend_entry("counting").timed_on("cpu")
    finally:
        from m2ae_infer import backends
        backends._REGISTRY.pop("counting")
