"""RunInfo FLOPs come from a cost model, equal FlopCounterMode on the real call, and never show in the user's
counter (issue 16, part 1). The reference is ``FlopCounterMode`` around the real ``run(return_info=False)``."""
import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from m2ae_infer import Deblurrer
from m2ae_infer.flops import AffineFlops, count_isolated
from m2ae_infer.tiling import receptive_field
from helpers import make_mask, random_net


def real_flops(deblurrer: Deblurrer, image, **kwargs) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        deblurrer.run(image, **kwargs)
    return int(counter.get_total_flops())


@pytest.fixture(scope="module", params=["tiny", "tiny_v2"])
def net(request):
    return random_net(request.param, seed=31)


@pytest.mark.slow
@pytest.mark.parametrize("tiled", [False, True], ids=["untiled", "tiled"])
@pytest.mark.parametrize("execution", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("mask_kind", ["predicted", "blobs", "random0.05", "empty"])
def test_info_flops_equal_flop_counter_on_the_real_call(net, tiled, execution, mask_kind):
    overlap = receptive_field(net).min_overlap
    tile = 2 * overlap if tiled else 0
    size = (3 * overlap + 5, 2 * overlap + 9) if tiled else (37, 46)
    image = np.random.default_rng(7).random((*size, 3)).astype(np.float32)
    mask = None if mask_kind == "predicted" else make_mask(mask_kind, *size, seed=2)[0, 0].numpy()
    deblurrer = Deblurrer(net, device="cpu", execution=execution, tile=tile, threshold=0.5)
    expected = real_flops(deblurrer, image, mask=mask)
    _, info = deblurrer.run(image, mask=mask, return_info=True)
    assert info.flops_executed == expected
    assert (info.tiles > 1) == tiled
    if not tiled and info.execution == "dense":
        assert info.flops_executed == info.flops_dense
    # The second call takes every count from the cache, and a counter around it sees the real work only.
    assert real_flops(deblurrer, image, mask=mask, return_info=True) == expected


def test_a_users_counter_sees_only_the_real_work_on_the_first_call(net):
    """The first call of a shape counts on the meta twin; a FlopCounterMode around it must not see that."""
    image = np.random.default_rng(8).random((30, 34, 3)).astype(np.float32)
    mask = make_mask("blobs", 30, 34, seed=4)[0, 0].numpy()
    reference = real_flops(Deblurrer(net, device="cpu", execution="sparse"), image, mask=mask)
    fresh = Deblurrer(net, device="cpu", execution="sparse")
    assert real_flops(fresh, image, mask=mask, return_info=True) == reference


@pytest.mark.parametrize("active,tiles,in_tiles", [(0, 0, 0), (1, 0, 0), (7, 0, 0), (1000, 0, 0), (9, 2, 9),
                                                   (1000, 5, 300)])
@pytest.mark.parametrize("stem_cells", [None, 0, 1, 37])
def test_sparse_counts_are_affine_in_the_active_pixels(active, tiles, in_tiles, stem_cells):
    """The cost model's assumption, checked against a direct meta count at each (active pixels, tiles, active
    pixels in tiles, cells of the sparse stem or the dense stem)."""
    from m2ae_infer.reparam import reparameterize_model
    from m2ae_infer.executor import TorchExecutor
    executor = TorchExecutor(reparameterize_model(random_net("tiny_v2", seed=5)))
    cells = () if stem_cells is None else (stem_cells,)
    direct = executor._count_on_meta((1, 64, 80, "sparse", True, stem_cells is not None),
                                     (active - in_tiles, tiles, in_tiles, *cells))
    assert executor.count_flops(1, 64, 80, active, "sparse", True, tiles, in_tiles, stem_cells) == direct


def test_count_isolated_hides_from_an_outer_counter_and_reraises():
    a = torch.randn(16, 16)
    outer = FlopCounterMode(display=False)
    with outer:
        inner = count_isolated(lambda: a @ a)
    assert inner == 2 * 16 ** 3 and outer.get_total_flops() == 0
    with pytest.raises(ZeroDivisionError):
        count_isolated(lambda: 1 / 0)
    calls = []
    model = AffineFlops(lambda key, counts: calls.append(counts) or 10 + 3 * counts[0] + 7 * counts[1])
    assert [model(("k",), n) for n in ((0, 0), (5, 0), (9, 2))] == [10, 25, 51]
    assert calls == [(0, 0), (1, 0), (0, 1)]
