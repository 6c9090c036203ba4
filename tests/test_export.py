"""Export (issue 8): ONNX graphs in ONNX Runtime agree with the torch executor, the sparse graph computes the
active pixels only with standard ops, the onnxruntime backend of Deblurrer, m2ae-export, TensorRT.

The independent reference throughout is :class:`TorchExecutor` on the same deploy network (contract 3:
fp32 <= 1e-4); pixels outside the mask must come back bit-identical (contract 2). Exports are shared per
module (each costs a few seconds of tracing).
"""
import os
import sys

import numpy as np
import pytest
import torch

from m2ae_infer import Deblurrer, reparameterize_model, save_checkpoint
from m2ae_infer.executor import TorchExecutor
from m2ae_infer.model.mask import full_resolution
from helpers import make_mask, random_net

WHY = "the [onnx] extra is not installed: pip install 'm2ae-infer[onnx]'"
onnx = pytest.importorskip("onnx", reason=WHY)
pytest.importorskip("onnxruntime", reason=WHY)
pytest.importorskip("onnxscript", reason=WHY)

from m2ae_infer.export.cli import main as export_main  # noqa: E402
from m2ae_infer.export.onnx import (GraphSpec, ort_session, export_onnx, op_counts, read_metadata,  # noqa: E402
                                    verify_onnx, write_atomic)
from m2ae_infer.export.trt import Profile, trtexec_command, unavailable_reason  # noqa: E402

SIZES = [(16, 20), (15, 23), (9, 34)]          # one exported graph runs them all (dynamic H, W; odd sizes)
MASKS = ["empty", "one_pixel", "corners", "borders", "random0.05", "random0.5", "blobs", "full"]
THRESHOLD, DILATION = 0.5, 1


def spread_mask_logits(net, seed: int = 0):
    """Random mask heads predict nearly constant probabilities; scale the logit so that a predicted mask at
    threshold 0.5 covers part of the image (and no pixel sits within rounding of the threshold)."""
    with torch.no_grad():
        net.mask_head.logit.weight.mul_(200.0)
        image = torch.rand(1, 3, 24, 30, generator=torch.Generator().manual_seed(seed))
        net.mask_head.logit.bias.sub_(net.mask_logits(image, net.stem_features(image)).median())
    return net


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return reparameterize_model(spread_mask_logits(random_net("tiny", seed=31)))


@pytest.fixture(scope="module")
def models(net):
    """Exported graphs, keyed by (kind, mask_input), built on first use."""
    cache = {}

    def get(kind: str, mask_input: bool):
        if (kind, mask_input) not in cache:
            spec = GraphSpec(kind, mask_input, THRESHOLD, DILATION)
            model = export_onnx(net, spec)
            cache[kind, mask_input] = spec, model, ort_session(model, threads=1, providers=["CPUExecutionProvider"])
        return cache[kind, mask_input]
    return get


@pytest.fixture(scope="module")
def reference(net):
    return TorchExecutor(net)


def run_session(session, image, mask=None):
    feeds = {"image": image.numpy()} if mask is None else {"image": image.numpy(), "mask": mask.numpy()}
    restored, working = session.run(None, feeds)
    return torch.from_numpy(restored), torch.from_numpy(working)


def assert_passthrough(restored, image, working):
    outside = ~full_resolution(working, image.shape[-2:]).expand_as(image)
    assert torch.equal(restored[outside], image[outside]), "pixels outside the mask must be bit-identical"


# ----------------------------------------------------------------------------------- ORT vs torch
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sparse", "dense"])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_user_mask_graph_matches_torch(models, reference, kind, mask_kind):
    _, _, session = models(kind, True)
    for i, size in enumerate(SIZES):
        image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(i))
        mask = make_mask(mask_kind, *size, seed=i)
        restored, working = run_session(session, image, mask)
        expected = reference.run(image, mask, execution=kind)
        assert restored.shape == image.shape and working.dtype == torch.bool
        assert torch.equal(working, expected.mask)
        err = (restored - expected.output).abs().max().item()
        assert err <= 1e-4, f"{kind} graph vs torch at {size}: {err:.2e}"
        assert_passthrough(restored, image, working)
        if mask_kind == "empty":
            assert torch.equal(restored, image)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_predicted_mask_graph_matches_torch(models, reference, kind):
    _, model, session = models(kind, False)
    densities = []
    for i, size in enumerate(SIZES):
        image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(10 + i))
        restored, working = run_session(session, image)
        expected = reference.run(image, threshold=THRESHOLD, dilation=DILATION, execution=kind)
        assert working.shape == (1, 1, (size[0] + 1) // 2, (size[1] + 1) // 2)
        assert torch.equal(working, expected.mask), "threshold and dilation are baked into the graph"
        assert (restored - expected.output).abs().max().item() <= 1e-4
        assert_passthrough(restored, image, working)
        densities.append(working.float().mean().item())
    assert any(0.0 < d < 1.0 for d in densities), "the test needs partial predicted masks"
    meta = read_metadata(model)
    assert meta["m2ae.graph"] == kind and meta["m2ae.threshold"] == "0.5" and meta["m2ae.dilation"] == "1"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_v2_detector_graph_matches_torch(kind):
    """Network v2 (the multi-scale blur detector reads the image, 1/8 cells, log energies) exports too."""
    v2 = reparameterize_model(spread_mask_logits(random_net("tiny_v2", seed=32)))
    model = export_onnx(v2, GraphSpec(kind, False, THRESHOLD, DILATION))
    session = ort_session(model, threads=1, providers=["CPUExecutionProvider"])
    densities = []
    for i, size in enumerate([*SIZES, (40, 57)]):
        image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(20 + i))
        restored, working = run_session(session, image)
        expected = TorchExecutor(v2).run(image, threshold=THRESHOLD, dilation=DILATION, execution=kind)
        assert torch.equal(working, expected.mask)
        assert (restored - expected.output).abs().max().item() <= 1e-4
        assert_passthrough(restored, image, working)
        densities.append(working.float().mean().item())
    assert any(0.0 < d < 1.0 for d in densities), "the test needs partial predicted masks"


def test_graph_interface(models):
    """Names and dims a deployment script relies on: batch 1, dynamic height/width, bool masks."""
    for mask_input in (False, True):
        _, model, _ = models("sparse", mask_input)
        dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*model.graph.input, *model.graph.output]}
        out_mask = "working_mask" if mask_input else "mask"
        assert dims["image"] == [1, 3, "height", "width"] and dims["restored"] == [1, 3, "height", "width"]
        assert dims[out_mask] == [1, 1, "mask_height", "mask_width"]
        if mask_input:
            assert dims["mask"] == [1, 1, "height", "width"]


# ----------------------------------------------------------------------------------- graph structure
def conv_weights(model) -> list[str]:
    """The initializer of each Conv's weight; the stem's is ``net.stem.weight`` reordered into a 6x6 kernel over
    the image (M2AENet.stem_features), which the exporter folds into a constant of its own name: named
    ``net.stem.`` here by its shape ``[C, 3, 6, 6]`` (no other conv of the network has it)."""
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    names = [node.input[1] for node in model.graph.node if node.op_type == "Conv"]
    return ["net.stem.weight" if shapes.get(n, ())[1:] == (3, 6, 6) else n for n in names]


@pytest.mark.parametrize("mask_input", [False, True])
def test_sparse_graph_uses_gather_matmul_scatter_only(models, mask_input):
    _, model, _ = models("sparse", mask_input)
    ops = op_counts(model)
    assert ops["NonZero"] == 1 and ops["MatMul"] >= 3 and ops["Gather"] >= 3
    scatters = [n for n in model.graph.node if n.op_type.startswith("Scatter")]
    assert scatters and all(n.op_type == "ScatterND" for n in scatters)
    # TensorRT takes ScatterND without reduction only: the graph gathers, adds and scatters (replace).
    assert all(a.name != "reduction" or a.s in (b"", b"none") for n in scatters for a in n.attribute)
    # Convolutions only in the dense front (stem, mask head): none in the masked stages or the tail.
    assert conv_weights(model) and all(w.startswith(("net.stem.", "net.mask_head.")) for w in conv_weights(model))
    nonzero = next(n for n in model.graph.node if n.op_type == "NonZero")
    assert any(n.op_type == "Cast" and nonzero.input[0] in n.output for n in model.graph.node), \
        "NonZero must read a float tensor (TensorRT's NonZero takes FP32/FP16)"


def test_dense_graph_uses_convolutions(models, net):
    _, model, _ = models("dense", True)
    ops = op_counts(model)
    assert "NonZero" not in ops and not any(op.startswith("Scatter") for op in ops)
    stage_convs = [w for w in conv_weights(model) if w.startswith(("net.motion.", "net.blocks."))]
    assert len(stage_convs) == 2 + 3 * len(net.blocks) and ops["Where"] >= len(net.stages())


@pytest.mark.slow
def test_fp16_graph_within_documented_tolerance(net, reference):
    spec = GraphSpec("sparse", mask_input=True, fp16=True)
    model = export_onnx(net, spec)
    assert read_metadata(model)["m2ae.precision"] == "fp16"
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    image = torch.rand(1, 3, 21, 26, generator=torch.Generator().manual_seed(3))
    mask = make_mask("blobs", 21, 26)
    [result] = verify_onnx(model, net, [("rand", image, mask)], spec, threads=1)
    assert result.passed and result.passthrough_exact and result.max_abs_diff <= 1e-2
    assert result.max_abs_diff > 0   # it really computed in half precision


# ----------------------------------------------------------------------------------- Deblurrer
@pytest.mark.slow
@pytest.mark.parametrize("execution", ["sparse", "dense", "auto"])
def test_deblurrer_onnxruntime_equals_torch(net, execution):
    """The same outputs and masks as the torch backend; ``auto`` follows ONNX Runtime's own switch (torch's follows
    its kernels' cost model); the FLOPs are those of the torch per-pixel kernel, which the sparse graph runs."""
    kwargs = dict(device="cpu", execution=execution, threshold=THRESHOLD, dense_above=0.45)
    ort_d = Deblurrer(net, backend="onnxruntime", **kwargs)
    torch_d = Deblurrer(net, backend="torch", **kwargs)
    per_pixel = TorchExecutor(net, sparse_kernel="pixels")
    assert ort_d.backend == "onnxruntime"
    img = np.random.default_rng(5).random((2, 3, 17, 22), dtype=np.float32)
    img = torch.from_numpy(img)                          # a batch of 2: the graphs run one image at a time
    for mask in (None, make_mask("random0.2", 17, 22, seed=1)[0, 0].numpy(), "full"):
        out, info = ort_d.run(img, mask=mask, return_info=True)
        expected, expected_info = torch_d.run(img, mask=mask, return_info=True)
        assert (out - expected).abs().max().item() <= 1e-4
        assert torch.equal(info.mask, expected_info.mask)
        active = round(info.active_fraction * 2 * 9 * 11)   # working grid 9 x 11, batch of 2
        assert info.execution == (execution if execution != "auto" else
                                  "dense" if active > 0.45 * 2 * 9 * 11 else "sparse")
        flops = per_pixel.count_flops(2, 17, 22, active, info.execution, mask is None)
        assert info.flops_executed == flops and info.backend == "onnxruntime"
        assert torch.equal(out[~info.mask[:, None].expand_as(img)], img[~info.mask[:, None].expand_as(img)])


def test_deblurrer_tensorrt_missing_is_one_line_error(net):
    if unavailable_reason() is None:
        pytest.skip("TensorRT is available here")
    with pytest.raises(ValueError, match="tensorrt") as err:
        Deblurrer(net, device="cpu", backend="tensorrt")
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------- files and CLI
def test_write_atomic_never_clobbers(tmp_path):
    target = tmp_path / "m.onnx"
    write_atomic(target, b"first", force=False)
    with pytest.raises(FileExistsError):
        write_atomic(target, b"second", force=False)
    assert target.read_bytes() == b"first"
    write_atomic(target, b"second", force=True)
    assert target.read_bytes() == b"second" and os.listdir(tmp_path) == ["m.onnx"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(random_net("tiny", seed=7), path)
    return path


@pytest.mark.slow
def test_cli_writes_verified_onnx_and_refuses_to_overwrite(checkpoint, tmp_path, capsys):
    out = tmp_path / "m2ae.onnx"
    assert export_main([str(checkpoint), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max |onnxruntime - torch|" in printed and "399x397" in printed and "NonZero" in printed
    assert sorted(os.listdir(tmp_path)) == ["m2ae.onnx"], "no temporary file left behind"
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert read_metadata(model)["m2ae.graph"] == "sparse"
    before = out.read_bytes()
    assert export_main([str(checkpoint), "-o", str(out), "--dense"]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == before
    assert export_main([str(checkpoint), "-o", str(out), "--dense", "--mask-input", "--force"]) == 0
    assert read_metadata(onnx.load(str(out)))["m2ae.graph"] == "dense"


@pytest.mark.slow
def test_cli_trt_without_tensorrt_writes_onnx_and_fails(checkpoint, tmp_path, capsys):
    if unavailable_reason() is None:
        pytest.skip("TensorRT is available here: the engine would really be built")
    out = tmp_path / "m2ae.engine"
    code = export_main([str(checkpoint), "-o", str(out), "--trt", "--min-shape", "64x64", "--opt-shape", "400x400",
                        "--max-shape", "1080x1920"])
    captured = capsys.readouterr()
    assert code == 1
    assert (tmp_path / "m2ae.onnx").is_file() and not out.exists()
    assert "trtexec --onnx=" in captured.out and "--minShapes=image:1x3x64x64" in captured.out
    assert len(captured.err.strip().splitlines()) == 1 and "TensorRT" in captured.err
    assert read_metadata(onnx.load(str(tmp_path / "m2ae.onnx")))["m2ae.graph"] == "dense", "TensorRT takes dense"


@pytest.mark.parametrize("argv, message", [
    (["missing.pth", "-o", "m.onnx"], "no such file"),
    (["{bad}", "-o", "m.onnx"], "unrecognized content"),
    (["{ckpt}", "-o", "m.txt"], "must end in .onnx"),
    (["{ckpt}", "-o", "m.onnx", "--opset", "12"], "--opset"),
    (["{ckpt}", "-o", "m.onnx", "--min-shape", "64x64"], "add --trt"),
    (["{ckpt}", "-o", "m.onnx", "--trt", "--min-shape", "64"], "HxW"),
    (["{ckpt}", "-o", "m.onnx", "--trt", "--opt-shape", "16x16"], "min <= opt"),
    (["{ckpt}", "-o", "m.onnx", "--threshold", "1.5"], "--threshold"),
    (["{ckpt}", "-o", "m.onnx", "--mask-input", "--threshold", "0.3"], "drop them"),
    (["{ckpt}", "-o", ""], "empty path"),
    (["{ckpt}", "-o", "bad.pth/m.onnx"], "is a file, not a folder"),
    (["{ckpt}", "-o", "m.onnx", "--mask-input", "--dilation", "1"], "drop them"),
])
def test_cli_usage_errors_exit_2_in_one_line(checkpoint, tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    argv = [a.format(ckpt=checkpoint, bad=tmp_path / "bad.pth") for a in argv]
    try:
        code = export_main(argv)
    except SystemExit as exc:      # argparse errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("m2ae-export: error:")
    assert not list(tmp_path.glob("*.onnx"))


def test_cli_unwritable_folder_is_refused_before_exporting(checkpoint, tmp_path, capsys, monkeypatch):
    import m2ae_infer.export.cli as cli

    def read_only(folder):
        raise OSError(30, "Read-only file system")
    from m2ae_infer import atomic
    monkeypatch.setattr(atomic, "prepare_folder", read_only)   # what cliutil.writable_folder calls
    monkeypatch.setattr(cli, "_export", lambda *a, **k: pytest.fail("exported before checking the folder"))
    assert export_main([str(checkpoint), "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"m2ae-export: error: cannot write to {tmp_path} (Read-only file system); choose a writable " \
                  "folder with -o"


# ----------------------------------------------------------------------------------- TensorRT
def test_trtexec_command_and_lazy_import():
    spec = GraphSpec("dense", mask_input=True)
    command = trtexec_command("m.onnx", "m.engine", Profile((32, 32), (480, 720), (1080, 1920)), spec)
    assert command.startswith("trtexec --onnx=m.onnx --saveEngine=m.engine")
    assert "--optShapes=image:1x3x480x720,mask:1x1x480x720" in command and "--noTF32" in command
    assert "--stronglyTyped" in trtexec_command("m.onnx", "m.engine", Profile(), GraphSpec(fp16=True))
    assert "tensorrt" not in sys.modules or unavailable_reason() is None, "importing export.trt must not load it"
    with pytest.raises(ValueError, match="min <= opt"):
        Profile((64, 64), (32, 32), (128, 128))


def _require_tensorrt():
    pytest.importorskip("tensorrt", reason="TensorRT is not installable on CPU machines (NVIDIA index only)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")


# The references stay on the CPU: exact fp32 (torch on CUDA would use TF32 convolutions); fp32 engines are
# built without TF32 for the same reason.
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_tensorrt_engine_matches_torch(net, reference, kind):
    _require_tensorrt()
    from m2ae_infer.export.trt import EngineRunner, build_engine

    spec = GraphSpec(kind, mask_input=True)
    engine = build_engine(export_onnx(net, spec).SerializeToString(), Profile((8, 8), (32, 48), (64, 64)), spec)
    runner = EngineRunner(engine, torch.device("cuda"))
    for i, size in enumerate(SIZES):
        image = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(i))
        mask = make_mask("blobs", *size, seed=i)
        outputs = {k: v.cpu() for k, v in runner({"image": image, "mask": mask}).items()}
        expected = reference.run(image, mask, execution=kind)
        assert torch.equal(outputs["working_mask"], expected.mask)
        assert (outputs["restored"] - expected.output).abs().max().item() <= 1e-4
        assert_passthrough(outputs["restored"], image, outputs["working_mask"])


def test_deblurrer_tensorrt_equals_torch(net):
    _require_tensorrt()
    img = torch.rand(1, 3, 40, 52, generator=torch.Generator().manual_seed(4))
    trt_d = Deblurrer(net, device="cuda", backend="tensorrt", threshold=THRESHOLD)
    out, info = trt_d.run(img, return_info=True)
    expected = Deblurrer(net, device="cpu", backend="torch", execution="dense", threshold=THRESHOLD).run(img)
    assert info.backend == "tensorrt" and info.execution == "dense"      # auto means dense on TensorRT
    assert (out - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_each_backend_takes_its_own_measured_dense_switch():
    from m2ae_infer.executor import DENSE_ABOVE
    from m2ae_infer.export.ort import ORT_DENSE_ABOVE
    net = reparameterize_model(random_net("tiny"))
    assert Deblurrer(net, backend="torch").executor.dense_above == DENSE_ABOVE
    assert Deblurrer(net, backend="onnxruntime", execution="sparse").executor.dense_above == ORT_DENSE_ABOVE
    assert Deblurrer(net, backend="onnxruntime", execution="sparse", dense_above=0.2).executor.dense_above == 0.2
