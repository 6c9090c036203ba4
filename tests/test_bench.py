"""m2ae-bench logic on a tiny grid: counts, ratios and files checked against independent computations.

No timing assertions: latencies are only checked to be positive and consistent with the ratio reported.
"""
from __future__ import annotations

import csv
import json
import time

import pytest
import torch
from helpers import random_net
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from m2ae_infer import reparameterize_model
from m2ae_infer.benchmarks import report
from m2ae_infer.benchmarks.baselines import BASELINES, NAFNet, build_baseline
from m2ae_infer.benchmarks.cli import main
from m2ae_infer.benchmarks.grid import BenchSettings, parse_resolution, run_grid
from m2ae_infer.benchmarks.latency import peak_memory, time_interleaved
from m2ae_infer.benchmarks.masks import working_density_mask
from m2ae_infer.model.mask import pad_to_even, working_mask

TINY = BenchSettings(resolutions=("30x46",), densities=(0.1, 0.5, 1.0), masks=("blobs", "scattered", "real"),
                     backends=("torch",), baselines=("NAFNet-w16-d2",), repeats=1, warmup=0, photos=1)


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
    """Dense: FlopCounterMode on the network's own dense forward. Sparse: stem + active share of the rest,
    since every masked stage costs the same per working pixel."""
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
        front = stem + (head if r["mask"] == "real" else 0)
        assert r["flops_sparse"] == pytest.approx(front + r["active_fraction"] * (dense - front), rel=1e-9)
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
                             backends=("torch", "onnxruntime"), baselines=(), repeats=1, warmup=0, memory=False)
    rows = run_grid(deploy_net, settings, {"cpu": "test", "torch_threads": 1, "torch": ""}, threads=1,
                    progress=False).rows
    torch_row, ort_row = rows
    assert (torch_row["backend"], ort_row["backend"]) == ("torch", "onnxruntime")
    assert ort_row["active_fraction"] == torch_row["active_fraction"]
    assert ort_row["flops_sparse"] == torch_row["flops_sparse"] and ort_row["max_abs_diff"] <= 1e-5
    assert ort_row["dense_peak_mb"] is None          # ORT's arena hides per-call peaks: not reported


def test_backends_that_cannot_run_are_listed_with_a_reason(deploy_net):
    from m2ae_infer.benchmarks.grid import make_backends
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
