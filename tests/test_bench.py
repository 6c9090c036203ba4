"""m2ae-bench logic on a tiny grid: counts, ratios and files checked against independent computations.

No timing assertions: latencies are only checked to be positive and consistent with the ratio reported.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import replace

import pytest
import torch
from helpers import random_net
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from m2ae_infer import reparameterize_model
from m2ae_infer.benchmarks import report
from m2ae_infer.benchmarks import grid, latency
from m2ae_infer.benchmarks.baselines import (BASELINES, DENSE_ENGINES, CompiledDense, NAFNet, build_baseline,
                                             default_dense_baselines, fastest_dense)
from m2ae_infer.benchmarks.cli import main, settings_from, build_parser
from m2ae_infer.benchmarks.grid import BenchSettings, Case, Engine, make_backends, measure_case, parse_resolution, run_grid
from m2ae_infer.benchmarks.latency import Timing, peak_memory, time_interleaved
from m2ae_infer.executor import TorchExecutor
from m2ae_infer.kernels.tiles import TILE
from m2ae_infer.benchmarks.masks import working_density_mask
from m2ae_infer.model.mask import pad_to_even, working_mask

TINY = BenchSettings(resolutions=("30x46",), densities=(0.1, 0.5, 1.0), masks=("blobs", "scattered", "real"),
                     backends=("torch",), baselines=("NAFNet-w16-d2",), dense_baselines=("eager",), repeats=1,
                     warmup=0, photos=1)


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


@pytest.fixture(scope="module")
def deploy_net():
    return reparameterize_model(random_net("tiny"))


@pytest.fixture(scope="module")
def tiny_result(deploy_net):
    return run_grid(deploy_net, TINY, {"cpu": "test", "torch_threads": 1, "torch": torch.__version__},
                    progress=False)


def test_grid_rows_cover_the_grid(tiny_result):
    rows = tiny_result.rows
    assert len(rows) == 2 * 3 + 1          # 2 controlled kinds x 3 densities + 1 real photo, one backend
    assert {(r["mask"], r["target_density"]) for r in rows if r["mask"] != "real"} == {
        (k, d) for k in ("blobs", "scattered") for d in (0.1, 0.5, 1.0)}
    for r in rows:
        assert r["backend"] == "torch" and (r["height"], r["width"]) == (30, 46)
        assert r["dense_ms"] > 0 and r["sparse_ms"] > 0
        assert r["latency_ratio"] == pytest.approx(r["sparse_ms"] / r["dense_ms"])
        assert r["max_abs_diff"] <= 1e-5           # sparse == dense (contract 2), measured in the bench
    assert "triton" not in {r["backend"] for r in rows}


def test_active_fraction_is_the_masks_working_density(tiny_result):
    for r in (r for r in tiny_result.rows if r["mask"] != "real"):
        mask = working_density_mask(r["mask"], 30, 46, r["target_density"], TINY.seed)
        assert r["active_fraction"] == pytest.approx(float(working_mask(mask).float().mean()))


def test_flops_match_an_independent_count(tiny_result, deploy_net):
    """Dense: FlopCounterMode on the network's own dense forward. Sparse: stem + the masked stages' share for the
    pixels they computed (the per-pixel kernel's active pixels and the tile kernel's whole tiles: every stage costs
    the same per computed pixel) + the tail's share for the active pixels."""
    image = torch.rand(1, 3, 30, 46)
    for r in tiny_result.rows:
        if r["mask"] == "real":
            dense = _flops(lambda: deploy_net(image))
        else:
            mask = working_density_mask(r["mask"], 30, 46, r["target_density"], TINY.seed)
            dense = _flops(lambda: deploy_net(image, mask))
        assert r["flops_dense"] == dense
        stem = _flops(lambda: deploy_net.stem_features(pad_to_even(image)))
        features = deploy_net.stem_features(pad_to_even(image))
        head = _flops(lambda: deploy_net.mask_logits(pad_to_even(image), features))
        tail = _flops(lambda: deploy_net.tail(features))
        total = features.shape[-2] * features.shape[-1]
        dense_front = stem + (head if r["mask"] == "real" else 0)
        # the sparse stem (kernels/cells.py) computes whole cells of TILE x TILE working pixels
        sparse_stem = stem if r["stem_cells"] is None else stem / total * r["stem_cells"] * TILE * TILE
        front = sparse_stem + (head if r["mask"] == "real" else 0)
        computed = r["active_fraction"] * total - r["tile_pixels"] + r["sparse_tiles"] * TILE * TILE
        expected = front + computed / total * (dense - dense_front - tail) + r["active_fraction"] * tail
        assert r["flops_sparse"] == pytest.approx(expected, rel=1e-9)
        assert r["flop_ratio"] == pytest.approx(r["flops_sparse"] / r["flops_dense"])


def test_auto_choice_follows_density(tiny_result):
    picks = {r["target_density"]: r["auto_picks"] for r in tiny_result.rows if r["mask"] == "blobs"}
    assert picks[0.1] == "sparse" and picks[1.0] == "dense"


def test_baselines_side_by_side(tiny_result, deploy_net):
    names = [b["network"] for b in tiny_result.baselines]
    assert names == ["M2AENet dense (ours)", "M2AENet sparse (ours)", "NAFNet-w16-d2"]
    nafnet = build_baseline("NAFNet-w16-d2")
    naf = tiny_result.baselines[2]
    assert naf["params"] == sum(p.numel() for p in nafnet.parameters())
    assert naf["flops"] == _flops(lambda: nafnet(torch.rand(1, 3, 30, 46)))
    assert tiny_result.baselines[0]["flops"] == _flops(lambda: deploy_net(torch.rand(1, 3, 30, 46)))


@pytest.mark.parametrize("size", [(30, 46), (33, 17), (8, 8)])
def test_nafnet_keeps_any_size(size):
    net = NAFNet(8, (1, 1), 1, (1, 1)).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, *size)).shape == (1, 3, *size)
    assert set(BASELINES) >= {"NAFNet-w16-d2", "NAFNet-w16-d3", "NAFNet-w32-GoPro"}


def test_report_files(tiny_result, tmp_path):
    written = report.write(tiny_result, tmp_path)
    assert sorted(p.name for p in written) == sorted(report.OUTPUT_FILES)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["rows"] == json.loads(json.dumps(tiny_result.rows))
    assert data["settings"]["backends"] == ["torch"] and data["machine"]["cpu"] == "test"
    with open(tmp_path / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(tiny_result.rows)
    assert float(rows[0]["flop_ratio"]) == pytest.approx(tiny_result.rows[0]["flop_ratio"])
    for name in ("latency_ratio.png", "flop_ratio.png"):
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG" and img.width > 300
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp files left
    text = report.table(tiny_result)
    assert "NAFNet-w16-d2" in text and "scattered" in text and text.count("\n") > len(tiny_result.rows)


def test_time_interleaved_alternates_calls():
    calls = []
    timings = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               warmup=1, repeats=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert timings["a"].repeats == 3 and timings["a"].minimum <= timings["a"].median <= timings["a"].maximum


def test_time_interleaved_measures_sleep():
    t = time_interleaved({"s": lambda: time.sleep(0.02)}, warmup=0, repeats=2)["s"]
    assert 0.02 <= t.minimum < 1.0


def test_peak_memory_sees_an_allocation():
    size = 96 * 2 ** 20
    peak = peak_memory(lambda: torch.ones(size // 4).sum())
    if peak is None:
        pytest.skip("no /proc/self/clear_refs here: peak memory is not measured on this OS")
    assert size * 0.9 <= peak <= size * 1.5


@pytest.mark.parametrize("name, expected", [("720p", (720, 1280)), ("480x640", (480, 640)), ("1080P", None),
                                            ("12", None), ("1x5", None)])
def test_parse_resolution(name, expected):
    if expected is None:
        with pytest.raises(ValueError, match="resolution"):
            parse_resolution(name)
    else:
        assert parse_resolution(name) == expected


@pytest.mark.slow
def test_cli_tiny_run_and_refusal_to_overwrite(tmp_path, capsys):
    args = ["--resolutions", "24x30", "--densities", "10%,1", "--masks", "blobs", "--backends", "torch",
            "--baselines", "none", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "b")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "24x30" in out and "not run" not in out
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [r["target_density"] for r in data["rows"]] == [0.1, 1.0] and data["baselines"] == []
    before = (tmp_path / "b" / "results.json").read_bytes()
    assert main(args) == 2                                   # results there: refuse without --force
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "b" / "results.json").read_bytes() == before
    assert main([*args, "--force", "--densities", "0.3"]) == 0
    assert [r["target_density"] for r in json.loads((tmp_path / "b" / "results.json").read_text())["rows"]] == [0.3]


@pytest.mark.parametrize("bad", [["--resolutions", "huge"], ["--densities", "0.5,2"], ["--masks", "stripes"],
                                 ["--backends", "cuda"], ["--baselines", "unet"], ["--repeats", "0"],
                                 ["--dense-baselines", "eager,tvm"], ["--backends", "torch:bf16x"],
                                 ["--densities", "a,b"], ["--threads", "0"], ["--device", "mps"], ["--out", ""]])
def test_cli_rejects_bad_options_in_one_line(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*bad, "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("m2ae-bench: error:")
    assert not (tmp_path / "x").exists()


def test_cli_unwritable_out_is_refused_before_the_benchmark(tmp_path, capsys, monkeypatch):
    import m2ae_infer.benchmarks.cli as cli
    monkeypatch.setattr(cli, "run_grid", lambda *a, **k: pytest.fail("benchmarked before checking --out"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--quick", "--out", str(blocker / "b")]) == 2     # a file where a folder must be created
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2ae-bench: error: cannot write to --out") and "\n" not in err


@pytest.mark.slow
def test_onnxruntime_cells_agree_with_torch(deploy_net):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
    settings = BenchSettings(resolutions=("20x26",), densities=(0.3,), masks=("blobs",),
                             backends=("torch", "onnxruntime"), baselines=(), dense_baselines=("eager",), repeats=1,
                             warmup=0, memory=False)
    rows = run_grid(deploy_net, settings, {"cpu": "test", "torch_threads": 1, "torch": ""}, threads=1,
                    progress=False).rows
    torch_row, ort_row = rows
    assert (torch_row["backend"], ort_row["backend"]) == ("torch", "onnxruntime")
    assert ort_row["headline_dense"] in ("eager", "onnxruntime") and ort_row["eager_ratio"] is not None
    assert ort_row["active_fraction"] == torch_row["active_fraction"]
    assert ort_row["flops_sparse"] == torch_row["flops_sparse"] and ort_row["max_abs_diff"] <= 1e-5
    assert ort_row["dense_peak_mb"] is None          # ORT's arena hides per-call peaks: not reported


def test_backends_that_cannot_run_are_listed_with_a_reason(deploy_net):
    ready, skipped = make_backends(deploy_net, ("torch", "tensorrt", "triton"), "cpu", None)
    assert [b.name for b in ready] == ["torch"]
    assert set(skipped) == {"tensorrt", "triton"}
    assert all(why and "\n" not in why for why in skipped.values())
    assert "CUDA" in skipped["triton"]


def test_table_lists_kernel_timings(tiny_result):
    from dataclasses import replace
    row = {"channels": 32, "height": 240, "width": 427, "density": 0.2, "dtype": "float16",
           "triton_stage_ms": 0.05, "dense_stage_ms": 0.2, "dense_over_triton": 4.0}
    text = report.table(replace(tiny_result, kernels=[row]))
    assert "Triton stage kernel" in text and "240x427" in text and "4.00" in text


# ------------------------------------------------------------------------------------ dense rows and the headline
def test_cells_of_a_torch_only_run_have_eager_as_their_dense_row(tiny_result):
    dense = tiny_result.dense
    assert len(dense) == len(tiny_result.rows) and {d["engine"] for d in dense} == {"eager"}
    for r in tiny_result.rows:
        assert r["precision"] == "fp32" and r["headline_dense"] == "eager"
        assert r["headline_ratio"] == r["eager_ratio"] == r["latency_ratio"]
    assert all(d["max_abs_vs_eager"] == 0 and d["compile_s"] is None for d in dense)
    assert tiny_result.settings.dense_baselines == ("eager",)


def _dense(engine, precision, ms):
    return {"engine": engine, "precision": precision, "ms": ms}


def test_fastest_dense_picks_the_smallest_median_of_the_same_precision():
    rows = [_dense("eager", "fp32", 100.0), _dense("compile", "fp32", 80.0), _dense("openvino-f32", "fp32", 90.0),
            _dense("openvino-bf16", "bf16", 40.0), _dense("onnxruntime", "fp32", 150.0)]
    assert fastest_dense(rows, "fp32")["engine"] == "compile"
    assert fastest_dense(rows, "bf16")["engine"] == "openvino-bf16"     # faster than every fp32 row: own class
    assert fastest_dense(rows[:1] + rows[2:], "fp32")["engine"] == "openvino-f32"
    assert fastest_dense(rows, "fp16") is None


def test_measure_case_takes_the_headline_from_the_fastest_dense_row_of_the_cells_precision(deploy_net, monkeypatch):
    """Timings are planted (time_interleaved replaced) so that the selection is tested, not the machine: four
    engines, two of them running sparse cells (one fp32, one labelled bf16); all run the torch executor."""
    def engine(name, precision, dense_name, sparse):
        return Engine(name, precision, TorchExecutor(reparameterize_model(deploy_net)), dense_name, sparse)
    engines = [engine("torch", "fp32", "eager", True), engine("openvino:bf16", "bf16", "openvino-bf16", True),
               engine("openvino-f32", "fp32", "openvino-f32", False), engine("onnxruntime", "fp32", "onnxruntime", False)]
    planted = {"torch dense": 100.0, "torch sparse": 30.0, "torch auto": 33.0, "openvino:bf16 dense": 60.0,
               "openvino:bf16 sparse": 12.0, "openvino:bf16 auto": 15.0, "openvino-f32 dense": 75.0,
               "onnxruntime dense": 200.0}
    seen = {}

    def fake(fns, *, warmup, repeats, pause):
        seen.update(keys=list(fns), pause=pause)
        return {k: Timing(planted[k] / 1e3, planted[k] / 1e3, planted[k] / 1e3, repeats) for k in fns}
    monkeypatch.setattr(grid, "time_interleaved", fake)
    mask = working_density_mask("blobs", 30, 46, 0.3, 0)
    case = Case("blobs", torch.rand(1, 3, 30, 46, generator=torch.Generator().manual_seed(3)), mask, 0.3)
    cells, dense = measure_case(engines, case, replace(TINY, memory=False))
    assert seen["keys"] == list(planted) and seen["pause"] == grid.PAUSE > 0
    assert [d["engine"] for d in dense] == ["eager", "openvino-bf16", "openvino-f32", "onnxruntime"]
    assert [d["ms"] for d in dense] == pytest.approx([100.0, 60.0, 75.0, 200.0])
    fp32, bf16 = cells
    assert (fp32["backend"], fp32["headline_dense"]) == ("torch", "openvino-f32")   # not the faster bf16 row
    assert fp32["headline_ratio"] == pytest.approx(30 / 75) and fp32["eager_ratio"] == pytest.approx(30 / 100)
    assert fp32["latency_ratio"] == pytest.approx(30 / 100)
    assert fp32["auto_headline_ratio"] == pytest.approx(33 / 75) and fp32["auto_own_ratio"] == pytest.approx(33 / 100)
    assert fp32["auto_picks"] == "sparse" and bf16["auto_headline_ratio"] == pytest.approx(15 / 60)
    assert (bf16["precision"], bf16["headline_dense"]) == ("bf16", "openvino-bf16")
    assert bf16["headline_ratio"] == pytest.approx(12 / 60) and bf16["eager_ratio"] == pytest.approx(12 / 100)
    assert all(d["max_abs_vs_eager"] == 0 for d in dense) and fp32["max_abs_diff"] <= 1e-5


def test_torch_kernel_rows_share_torchs_dense_row(deploy_net):
    """``--backends torch,torch/pixels,torch/tiles``: three sparse cells per case, one dense row (torch eager), and
    each cell's kernel is the one its row names (the plan it ran: no tiles per pixel, every active pixel tiled on
    a working grid of whole 8x8 tiles)."""
    engines, skipped = make_backends(deploy_net, ("torch", "torch/pixels", "torch/tiles"), "cpu", 1)
    assert not skipped and [e.dense_name for e in engines] == ["eager"] * 3
    mask = working_density_mask("blobs", 32, 48, 0.3, 0)
    case = Case("blobs", torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(3)), mask, 0.3)
    cells, dense = measure_case(engines, case, replace(TINY, memory=False, repeats=1))
    assert [d["engine"] for d in dense] == ["eager"]
    by = {c["backend"]: c for c in cells}
    assert by["torch/pixels"]["sparse_tiles"] == 0 and by["torch/tiles"]["tiled_fraction"] == 1.0
    assert all(c["max_abs_diff"] <= 1e-5 and c["dense_ms"] == dense[0]["ms"] for c in cells)


def test_dense_rows_a_backend_covers_are_not_built_twice(deploy_net):
    engines, skipped = make_backends(deploy_net, ("torch",), "cpu", 1, dense=("eager",))
    assert [(e.name, e.dense_name, e.sparse) for e in engines] == [("torch", "eager", True)] and not skipped


def test_default_dense_baselines_are_what_is_installed_without_compile():
    from importlib.util import find_spec
    names = default_dense_baselines()
    assert names[0] == "eager" and "compile" not in names and set(names) <= set(DENSE_ENGINES)
    assert ("onnxruntime" in names) == bool(find_spec("onnxruntime") and find_spec("onnxscript"))
    assert ("openvino-f32" in names) == bool(find_spec("openvino") and find_spec("onnxscript"))
    if "openvino-bf16" in names:
        from m2ae_infer.export.openvino import cpu_precisions
        assert "bf16" in cpu_precisions()


@pytest.mark.parametrize("given, expected", [(None, None), ("none", ()), ("eager,compile", ("eager", "compile"))])
def test_cli_dense_baselines_option(given, expected, tmp_path):
    args = ["--out", str(tmp_path)] + ([] if given is None else ["--dense-baselines", given])
    assert settings_from(build_parser().parse_args(args)).dense_baselines == expected


def test_time_interleaved_pauses_untimed_before_each_call(monkeypatch):
    slept = []
    monkeypatch.setattr(latency.time, "sleep", slept.append)
    time_interleaved({"a": lambda: None, "b": lambda: None}, warmup=1, repeats=3, pause=0.03)
    assert slept == [0.03] * 6
    with pytest.raises(ValueError, match="pause"):
        time_interleaved({"a": lambda: None}, pause=-1)


@pytest.mark.slow
def test_grid_with_dense_rows_of_other_engines(deploy_net, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    settings = BenchSettings(resolutions=("20x26",), densities=(0.3,), masks=("blobs",), backends=("torch",),
                             dense_baselines=("eager", "openvino-f32", "onnxruntime"), baselines=(), repeats=1,
                             warmup=0, memory=False)
    result = run_grid(deploy_net, settings, {"cpu": "test", "torch_threads": 1, "torch": ""}, threads=1,
                      progress=False)
    (cell,) = result.rows
    assert [(d["engine"], d["precision"]) for d in result.dense] == [
        ("eager", "fp32"), ("openvino-f32", "fp32"), ("onnxruntime", "fp32")]
    assert all(d["max_abs_vs_eager"] <= 1e-4 and d["ms"] > 0 for d in result.dense)
    best = min(result.dense, key=lambda d: d["ms"])
    assert cell["headline_dense"] == best["engine"] and cell["headline_ratio"] == pytest.approx(cell["sparse_ms"] / best["ms"])
    report.write(result, tmp_path)
    with open(tmp_path / "dense.csv", newline="") as f:
        assert [r["engine"] for r in csv.DictReader(f)] == ["eager", "openvino-f32", "onnxruntime"]
    text = (tmp_path / "results.md").read_text()
    assert "| best dense | headline |" in text and f"| {cell['headline_ratio']:.3f} |" in text
    assert "| openvino-f32 | fp32 |" in text and "max\\|s-d\\|" in text


@pytest.mark.slow
def test_compiled_dense_equals_eager_and_reports_its_compile_time(deploy_net):
    engines, _ = make_backends(deploy_net, ("torch",), "cpu", 1, dense=("compile",))
    compiled = engines[1]
    assert (compiled.name, compiled.precision, compiled.sparse) == ("compile", "fp32", False)
    assert isinstance(compiled.runner, CompiledDense)
    image = torch.rand(1, 3, 16, 20, generator=torch.Generator().manual_seed(4))
    mask = working_density_mask("blobs", 16, 20, 0.4, 0)
    case = Case("blobs", image, mask, 0.4)
    with torch.no_grad():
        assert (compiled.dense(case) - deploy_net(image, mask)).abs().max() <= 1e-5
    assert compiled.runner.compile_seconds[((1, 3, 16, 20), False)] > 0
