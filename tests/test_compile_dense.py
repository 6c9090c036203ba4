"""``compile_dense=True`` (torch backend): the dense path through ``torch.compile`` equals the eager dense path
(the contracts' 1e-5, unmasked pixels bit-identical, the same FLOPs as ``FlopCounterMode`` counts), compiles once
per shape (timed apart), ``auto`` weighs the sparse kernels against the compiled dense body, and the other engines
refuse the option in one line."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import make_mask, random_net
from torch.utils.flop_counter import FlopCounterMode

from m2ae_infer import Deblurrer, reparameterize_model
from m2ae_infer.backends import make_backend
from m2ae_infer.errors import InvalidArgument
from m2ae_infer.executor import KernelCosts, TorchExecutor
from m2ae_infer.kernels.tiles import plan_tiles
from m2ae_infer.model.mask import full_resolution, working_mask
from m2ae_infer.precision import BF16_TOLERANCE, bf16_unavailable

HEIGHT, WIDTH = 32, 48


@pytest.fixture(scope="module")
def net():
    return reparameterize_model(random_net("tiny_v2", seed=31))


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def precision(request):
    if request.param == "bf16" and bf16_unavailable("cpu"):
        pytest.skip(f"bf16 needs native bf16: {bf16_unavailable('cpu')}")
    return request.param


@pytest.fixture(scope="module")
def compiled(net, precision):
    return TorchExecutor(net, compile_dense=True, precision=precision)


def test_equals_eager_dense_and_counts_the_same_flops(net, compiled, precision):
    image = torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(2))
    mask = make_mask("blobs", HEIGHT, WIDTH, seed=5)
    eager = TorchExecutor(net, precision=precision).run(image, mask, execution="dense")
    ours = compiled.run(image, mask, execution="dense")
    assert compiled.compile_seconds.keys() == {(1, 3, HEIGHT, WIDTH)}
    tolerance = 1e-5 if precision == "fp32" else BF16_TOLERANCE["max_abs"]   # inductor may sum bf16 in another order
    assert (ours.output - eager.output).abs().max() <= tolerance and torch.equal(ours.mask, eager.mask)
    outside = ~full_resolution(ours.mask, (HEIGHT, WIDTH)).expand_as(image)
    assert torch.equal(ours.output[outside], image[outside])
    first = dict(compiled.compile_seconds)
    counter = FlopCounterMode(display=False)
    with counter:
        again = compiled.run(image, mask, execution="dense")
    assert compiled.compile_seconds == first and torch.equal(again.output, ours.output)   # compiled once
    assert counter.get_total_flops() == compiled.count_flops(1, HEIGHT, WIDTH, ours.active_pixels, "dense", False) > 0


def test_auto_weighs_the_sparse_kernels_against_the_compiled_dense_body(net):
    """A mask whose modelled sparse cost lies between the compiled and the eager dense body: eager ``auto`` runs it
    sparse, the compiled executor dense."""
    image = torch.rand(1, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(3))
    mask = make_mask("random0.3", HEIGHT, WIDTH, seed=7)
    eager, ours = TorchExecutor(net), TorchExecutor(net, compile_dense=True)
    m = working_mask(mask)
    pinned = KernelCosts(pixel=1.0, tile=1.0)      # the cost model pinned around this mask's cost
    cost = pinned.body(plan_tiles(m, pinned.min_fill("auto")), m.numel())
    assert 0.2 < cost < 1.0
    for executor in (eager, ours):
        executor.costs = dataclasses.replace(pinned, compiled_dense=cost * 0.9)
    assert eager.run(image, mask).execution == "sparse"
    assert ours.run(image, mask).execution == "dense"


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "triton", "tensorrt"])
def test_other_engines_refuse_it_in_one_line(net, backend):
    for build in (lambda: Deblurrer(net, backend=backend, compile_dense=True),
                  lambda: make_backend(backend, net, compile_dense=True)):
        with pytest.raises(InvalidArgument) as err:
            build()
        message = str(err.value)
        assert "\n" not in message and "backend 'torch'" in message and err.value.parameter == "compile_dense"


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_compile_dense_must_be_a_bool(net, value):
    with pytest.raises(InvalidArgument, match="compile_dense must be True or False"):
        Deblurrer(net, compile_dense=value)
