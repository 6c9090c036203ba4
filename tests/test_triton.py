"""Contract 3 for the Triton kernels: every kernel and the whole Triton backend agree with the torch reference.

Runs on the CPU through the Triton interpreter (``TRITON_INTERPRET=1``, set below before any kernel module is
imported: ``@triton.jit`` reads it at decoration time). Cases are small (interpreter programs cost ~1 ms each).

Tolerance policy (FlagGems style, :mod:`m2ae_infer.kernels.triton_check`): the reference is float64 on the same
inputs, rounded to the storage dtype first; ``|actual - expected| <= 4 * res + res * |expected|`` with ``res`` the
dtype's resolution (fp32 1.3e-6, fp16 1e-3, bf16 1.6e-2). Indices and unmasked pixels are compared exactly.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before anything imports the kernel modules

import subprocess   # noqa: E402
import sys   # noqa: E402

import numpy as np   # noqa: E402
import pytest   # noqa: E402
import torch   # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton==3.7.1): Triton kernels untested")

from PIL import Image   # noqa: E402

from m2ae_infer import Deblurrer, M2AEConfig, reparameterize_model   # noqa: E402
from m2ae_infer.api import DEFAULT_CHECKPOINT   # noqa: E402
from m2ae_infer.executor import TorchExecutor   # noqa: E402
from m2ae_infer.kernels import triton_bench, triton_stage   # noqa: E402
from m2ae_infer.kernels.reference import SparseStage, neighbour_offsets, sparse_stage_, to_padded_buffer   # noqa: E402
from m2ae_infer.kernels.triton_check import RESOLUTION, mismatches, random_convs, stage_case, tail_case   # noqa: E402
from m2ae_infer.kernels.triton_common import kernels_interpreted   # noqa: E402
from m2ae_infer.kernels.triton_compact import compact_active_rows, torch_active_rows   # noqa: E402
from m2ae_infer.model.mask import full_resolution   # noqa: E402
from m2ae_infer.triton_executor import TritonExecutor   # noqa: E402
from helpers import make_mask, random_net   # noqa: E402

# Interpreted kernels take minutes: the whole module is in the slow tier (pytest -m 'not slow' skips it).
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not kernels_interpreted(triton_stage._sparse_stage_kernel),
                                reason="kernels were compiled for a GPU before TRITON_INTERPRET=1 was set")]

DTYPES = list(RESOLUTION)
WORKING_MASKS = ["empty", "one_pixel", "corners", "borders", "random0.3", "full"]
REPO_ASSETS = DEFAULT_CHECKPOINT.parent


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """FlagGems-style check that says how many elements are off, and where the worst one is."""
    diff = (actual.double() - expected.double()).abs()
    bad = mismatches(actual, expected, dtype)
    if bad.any():
        worst = np.unravel_index(int(diff.argmax()), tuple(diff.shape))
        raise AssertionError(f"{int(bad.sum())}/{diff.numel()} elements off ({dtype}); max |diff| "
                             f"{diff.max().item():.3e} at {worst}: {actual[worst].item()} vs {expected[worst].item()}")


def working_mask(kind: str, h: int, w: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return make_mask(kind, h, w, seed=seed, batch=batch)


# -- compaction --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(1, 1), (5, 7), (9, 13), (16, 16)], ids=str)
@pytest.mark.parametrize("kind", WORKING_MASKS)
def test_compaction_matches_nonzero_exactly(size, kind):
    m = working_mask(kind, *size, seed=sum(size))
    rows, n = compact_active_rows(m, block=32)     # small blocks: many programs, cross-block offsets
    expected = torch_active_rows(m)
    assert n == expected.numel() and rows.dtype == torch.int64
    assert torch.equal(rows, expected)


def test_compaction_three_dims_and_one_block():
    m = torch.rand(3, 11, 6, generator=torch.Generator().manual_seed(1)) < 0.5
    rows, n = compact_active_rows(m)
    assert torch.equal(rows, torch_active_rows(m)) and n == int(m.sum())
    assert torch.equal(compact_active_rows(m.to(torch.uint8) * 3)[0], rows)


# -- one stage ---------------------------------------------------------------------------------------------
STAGE_SHAPES = {   # (channels, mid, ffn, act, gated): body blocks and the motion analyzer, odd widths too
    "block16": (16, 16, 16, "gelu", True), "block32": (32, 32, 32, "gelu", True),
    "block48": (48, 48, 48, "gelu", True), "block48_relu_odd": (48, 24, 40, "relu", True),
    "motion32_silu": (32, 16, 0, "silu", False), "tiny8": (8, 8, 8, "gelu", True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(STAGE_SHAPES))
@pytest.mark.parametrize("kind", ["one_pixel", "borders", "random0.3", "full"])
def test_stage_kernel_matches_dense_float64(shape, kind, dtype):
    """Gather -> GEMM -> act -> mixers -> residual at the active pixels == F.conv2d everywhere, gated."""
    mask = working_mask(kind, 7, 11, seed=3)
    case = stage_case(*STAGE_SHAPES[shape], mask, dtype, seed=len(shape))
    assert_close(case.actual, case.expected, dtype)
    untouched = ~mask.expand_as(case.inputs)
    assert torch.equal(case.actual[untouched], case.inputs[untouched])     # bit-identical passthrough
    assert case.src_unchanged and case.border_zero


def test_stage_kernel_empty_mask_writes_nothing():
    case = stage_case(16, 16, 16, "gelu", True, working_mask("empty", 5, 6), torch.float32)
    assert torch.equal(case.actual, case.inputs)


@pytest.mark.parametrize("block_m", [16, 32])
def test_stage_kernel_many_programs_match_torch_spec(block_m):
    """Several programs with a partial last block (N is no multiple of BLOCK_M); neighbouring active pixels
    read pre-stage values (in-stage updates must not leak) exactly as the torch spec computes them."""
    mask = working_mask("random0.5", 9, 13, seed=4)
    case = stage_case(48, 48, 48, "gelu", True, mask, torch.float32, block_m=block_m)
    assert int(mask.sum()) % block_m != 0
    assert_close(case.actual, case.expected, torch.float32)

    convs = random_convs(32, 32, 32, True, seed=5)
    stage = SparseStage.from_convs(convs[0], "gelu", convs[1:]).to(torch.float32)
    x = torch.randn(2, 32, 9, 13)
    spec = to_padded_buffer(x)
    rows, _ = compact_active_rows(mask)
    sparse_stage_(spec, rows, neighbour_offsets(13), stage)
    src = to_padded_buffer(x)
    dst = src.clone()
    triton_stage.sparse_stage_forward(src, dst, rows, 13, triton_stage.pack_stage(stage), block_m)
    assert (dst - spec).abs().max().item() <= 1e-5


def test_chained_stages_match_torch_spec():
    """Ping-pong buffers over several stages == the torch spec's in-place stages. Small blocks, so programs
    run after neighbours' programs have written: an update leaking into a neighbour's input would show."""
    mask = working_mask("blobs", 8, 10, seed=6)
    rows, n = compact_active_rows(mask)
    assert n > 2 * 16
    stages = []
    for seed, (c, mid, ffn, act, gated) in enumerate([(16, 8, 0, "gelu", False), (16, 16, 16, "gelu", True),
                                                      (16, 16, 32, "silu", True)]):
        convs = random_convs(c, mid, ffn, gated, seed)
        stages.append(SparseStage.from_convs(convs[0], act, convs[1:]).to(torch.float32))
    x = torch.randn(2, 16, 8, 10)
    spec = to_padded_buffer(x)
    for stage in stages:
        sparse_stage_(spec, rows, neighbour_offsets(10), stage)
    out = triton_stage.sparse_stages_forward(to_padded_buffer(x), rows, 10,
                                             [triton_stage.pack_stage(s) for s in stages], block_m=16)
    assert (out - spec).abs().max().item() <= 1e-5


def test_pack_and_launch_reject_what_the_kernel_cannot_run():
    convs = random_convs(16, 16, 16, True, 0)
    three = SparseStage.from_convs(convs[0], "gelu", [convs[1], convs[2], convs[2]])
    with pytest.raises(NotImplementedError, match="1 or 2 mixers"):
        triton_stage.pack_stage(three)
    with pytest.raises(ValueError, match="dtype"):
        triton_stage.pack_stage(SparseStage.from_convs(convs[0], "gelu", convs[1:]), torch.float64)
    packed = triton_stage.pack_stage(SparseStage.from_convs(convs[0], "gelu", convs[1:]))
    buf = torch.zeros(16, 4 * 5 * 2)[:, ::2].t()               # non-contiguous view
    with pytest.raises(ValueError, match="contiguous"):
        triton_stage.sparse_stage_forward(buf, buf, torch.tensor([6]), 3, packed)


# -- tail --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", [16, 32, 48])
@pytest.mark.parametrize("kind", ["empty", "one_pixel", "borders", "random0.3"])
def test_tail_kernel_matches_pixel_shuffle(channels, kind, dtype):
    mask = working_mask(kind, 5, 7, seed=channels)
    actual, expected, image = tail_case(channels, mask, dtype, block_m=16, seed=channels)
    assert_close(actual, expected, torch.float32)       # fp32 image + fp32-accumulated delta
    untouched = ~full_resolution(mask, image.shape[-2:]).expand_as(image)
    assert torch.equal(actual[untouched], image[untouched])


# -- the backend end to end --------------------------------------------------------------------------------
CONFIGS = {
    "tiny": M2AEConfig.from_name("tiny"),
    "c16": M2AEConfig(channels=16, num_blocks=2, mask_channels=8, mask_layers=2, motion_channels=8, motion_points=5),
    "c48_relu": M2AEConfig(channels=48, num_blocks=1, mask_channels=8, mask_layers=2, motion_channels=16,
                           motion_points=5, act="relu"),
    "tiny_v2": M2AEConfig.from_name("tiny_v2"),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    net = random_net(CONFIGS[request.param], seed=21)
    return (Deblurrer(net, backend="triton", device="cpu", execution="sparse"),
            Deblurrer(net, backend="torch", execution="dense"))


@pytest.mark.parametrize("size", [(12, 14), (13, 9)], ids=str)
@pytest.mark.parametrize("kind", ["empty", "one_pixel", "borders", "random0.3", "full"])
def test_triton_backend_matches_torch_dense(pair, size, kind):
    triton_db, torch_db = pair
    image = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2))
    mask = make_mask(kind, *size, seed=5, batch=2)
    out, info = triton_db.run(image, mask=mask, return_info=True)
    expected = torch_db.run(image, mask=mask)
    assert info.backend == "triton" and info.execution == "sparse"
    assert (out - expected).abs().max().item() <= 1e-4
    untouched = ~info.mask[:, None].expand_as(image)
    assert torch.equal(out[untouched], image[untouched])


def test_triton_backend_predicted_mask_and_auto(pair):
    triton_db, torch_db = pair
    image = torch.rand(1, 3, 14, 12, generator=torch.Generator().manual_seed(3))
    out, info = triton_db.run(image, return_info=True)
    assert (out - torch_db.run(image)).abs().max().item() <= 1e-4
    auto = TritonExecutor(triton_db.network, dense_above=0.5)
    assert auto.run(image, make_mask("full", 14, 12), execution="auto").execution == "dense"
    assert auto.run(image, make_mask("one_pixel", 14, 12), execution="auto").execution == "sparse"


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)], ids=str)
def test_triton_executor_half_storage(dtype, tol):
    """fp16 / bf16 feature buffer and weights (fp32 accumulation) through all stages and the tail: the image
    error stays within a documented bound of the fp32 torch result (values in [0, 1])."""
    net = reparameterize_model(random_net(CONFIGS["c16"], seed=8))
    image = torch.rand(1, 3, 12, 14, generator=torch.Generator().manual_seed(4))
    mask = make_mask("random0.3", 12, 14, seed=1)
    expected = TorchExecutor(net).run(image, mask, execution="dense").output
    out = TritonExecutor(net, dtype=dtype, block_m=16).run(image, mask, execution="sparse").output
    err = (out - expected).abs().max().item()
    assert err <= tol, f"{dtype}: max abs error {err:.3e}"


def test_shipped_checkpoint_matches_torch_on_a_crop():
    """The shipped network on odd 27 x 41 crops of the example photo: its own predicted mask (the whole photo's,
    cut at the crop where it is densest: v2's detector sees +-265 px, more than a crop holds, so the mask is
    predicted on the whole photo) and the example's hand mask (~57 %)."""
    photo = np.asarray(Image.open(REPO_ASSETS / "example_blurry.png").convert("RGB")).astype(np.float32) / 255
    hand_mask = np.asarray(Image.open(REPO_ASSETS / "example_mask.png").convert("L"))
    triton_db = Deblurrer(backend="triton", device="cpu", execution="sparse")
    torch_db = Deblurrer(backend="torch", execution="dense")
    _, whole = torch_db.run(photo, return_info=True)
    density = torch.nn.functional.avg_pool2d(torch.from_numpy(whole.mask).float()[None, None], (27, 41), stride=8)
    iy, ix = divmod(int(density.flatten().argmax()), density.shape[-1])
    y0, x0 = 8 * iy, 8 * ix
    for (y, x), mask in (((y0, x0), whole.mask[y0:y0 + 27, x0:x0 + 41]), ((100, 200), hand_mask[100:127, 200:241])):
        crop = np.ascontiguousarray(photo[y:y + 27, x:x + 41])
        out, info = triton_db.run(crop, mask=mask, return_info=True)
        assert info.active_fraction > 0.05 and info.backend == "triton"
        assert np.abs(out - torch_db.run(crop, mask=mask)).max() <= 1e-4


def test_flops_are_the_torch_sparse_path_counts():
    net = reparameterize_model(random_net("tiny", seed=2))
    triton_ex = TritonExecutor(net)
    # Nothing active: exactly the dense front (stem + mask head), counted here by FlopCounterMode on the network.
    from torch.utils.flop_counter import FlopCounterMode
    image = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(4))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.mask_logits(image, net.stem_features(image))
    assert triton_ex.count_flops(1, 20, 24, 0, "sparse") == counter.get_total_flops() > 0
    # Per active pixel: 2 * (9*C*C_mid + mixers) over the stages, plus the tail's 2*C*12.
    per_pixel = sum(2 * (s.w1.numel() + (s.wa.numel() + s.wb.numel() if s.gated else 0) + s.wo.numel())
                    for s in triton_ex.stages) + 2 * triton_ex.tail_weight.numel()
    assert triton_ex.count_flops(1, 20, 24, 5, "sparse") - triton_ex.count_flops(1, 20, 24, 0, "sparse") \
        == 5 * per_pixel


# -- errors and the GPU timing entry -----------------------------------------------------------------------
def test_without_cuda_or_interpreter_one_line_error(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the Triton backend runs here")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs a CUDA GPU.*TRITON_INTERPRET=1.*backend='torch'") as err:
        Deblurrer(random_net("tiny"), backend="triton", device="cpu")
    assert "\n" not in str(err.value)


def test_without_triton_package_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)          # `import triton` now raises ImportError
    with pytest.raises(ValueError, match="pip install triton") as err:
        Deblurrer(random_net("tiny"), backend="triton", device="cpu")
    assert "\n" not in str(err.value)


def _python_without_interpret(args: list[str], cwd, timeout: int) -> subprocess.CompletedProcess:
    """A fresh ``python ARGS`` whose environment lacks TRITON_INTERPRET (set in this process above)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_kernels_work_when_torch_imported_triton_before_interpret_was_set(tmp_path):
    """torch.utils.flop_counter imports triton.language (decorating its own @jit helpers in compiled mode);
    kernels defined afterwards under TRITON_INTERPRET=1 must not depend on those helpers."""
    code = ("import os, torch, torch.utils.flop_counter, sys; assert 'triton.language' in sys.modules\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "from m2ae_infer.kernels.triton_check import _main\n"
            "raise SystemExit(_main(['--size', '4', '5', '--channels', '16']))\n")
    proc = _python_without_interpret(["-c", code], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_kernels_imported_before_interpret_was_set_give_one_line_error(tmp_path):
    code = ("import os, torch; import m2ae_infer.kernels.triton_stage; os.environ['TRITON_INTERPRET'] = '1'\n"
            "from m2ae_infer import Deblurrer, M2AENet, M2AEConfig\n"
            "try:\n    Deblurrer(M2AENet(M2AEConfig.from_name('tiny')), backend='triton', device='cpu')\n"
            "except ValueError as e:\n    print('ERR', e)\n")
    proc = _python_without_interpret(["-c", code], tmp_path, timeout=120)
    assert proc.stdout.startswith("ERR") and "before TRITON_INTERPRET=1 was set" in proc.stdout, proc.stderr[-800:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: compiled kernels cannot run here")
def test_compiled_kernels_on_the_gpu(tmp_path):
    """Where CUDA exists, the same checks run compiled (a subprocess without TRITON_INTERPRET)."""
    proc = _python_without_interpret(["-m", "m2ae_infer.kernels.triton_check", "--device", "cuda"], tmp_path,
                                     timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_gpu_stage_timings_needs_cuda():
    with pytest.raises(RuntimeError, match="CUDA|TRITON_INTERPRET"):
        triton_bench.gpu_stage_timings(channels=(16,), sizes=((8, 8),), densities=(0.5,))


def test_stage_timing_loop_runs_through_the_interpreter():
    """The measurement loop behind gpu_stage_timings, with a CPU timer: every case also checks correctness."""
    rows = triton_bench.stage_timing_cases((16, 48), ((6, 9),), (0.2, 1.0), dtype=torch.float32, act="gelu",
                                           ffn_expand=1, mask_kind="blobs", device="cpu",
                                           bench=triton_bench.cpu_timer)
    assert len(rows) == 4
    for row in rows:
        assert row["max_abs_err"] <= 1e-4 and row["triton_stage_ms"] > 0 and row["active"] > 0
    assert {r["active"] for r in rows if r["density"] == 1.0} == {54}
