"""m2ae-eval: metric helpers against independent references, the classical oracle, the CLI end to end."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("skimage", reason="m2ae-eval needs scikit-image (pip install 'm2ae-infer[train]')")
pytest.importorskip("scipy", reason="m2ae-eval needs scipy (comes with scikit-image)")

from m2ae_infer import Deblurrer, save_checkpoint  # noqa: E402
from m2ae_infer import evaluate as ev  # noqa: E402
from m2ae_infer.data.synth import heldout_set, make_sample  # noqa: E402
from helpers import random_net  # noqa: E402


def test_masked_psnr_full_mask_equals_skimage():
    from skimage.metrics import peak_signal_noise_ratio
    rng = np.random.default_rng(0)
    a, b = rng.random((20, 17, 3), dtype=np.float32), rng.random((20, 17, 3), dtype=np.float32)
    full = np.ones((20, 17), bool)
    ref = peak_signal_noise_ratio(b, a, data_range=1.0)
    assert ev.masked_psnr(a, b, full) == pytest.approx(ref, rel=1e-6)
    assert ev.masked_psnr(a, b) == pytest.approx(ref, rel=1e-6)
    assert ev.masked_psnr(a, b, np.zeros((20, 17), bool)) is None          # empty region: skipped
    assert ev.masked_psnr(a, a) == ev.PSNR_CAP                               # identical: capped, JSON-safe
    # Only the masked pixels count: corrupting the rest changes nothing.
    half = np.zeros((20, 17), bool)
    half[:10] = True
    c = b.copy()
    c[~half] = 0.0
    assert ev.masked_psnr(a, c, half) == pytest.approx(ev.masked_psnr(a[:10], b[:10]), rel=1e-9)


def test_masked_ssim_full_mask_is_skimage_mean():
    from skimage.metrics import structural_similarity
    rng = np.random.default_rng(1)
    a = rng.random((24, 24, 3)).astype(np.float32)
    b = np.clip(a + 0.05 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
    ref = structural_similarity(a, b, channel_axis=-1, data_range=1.0)
    assert ev.masked_ssim(a, b, np.ones((24, 24), bool)) == pytest.approx(ref, rel=1e-5)


def test_mask_scores_hand_made():
    true = np.zeros((4, 4), bool)
    true[:2, :2] = True                      # 4 pixels
    pred = np.zeros((4, 4), bool)
    pred[:2, 1:3] = True                     # 4 pixels, 2 of them right
    s = ev.mask_scores(pred, true)
    assert (s["inter"], s["union"], s["pred"], s["true"]) == (2, 6, 4, 4)
    assert s["iou"] == pytest.approx(2 / 6) and s["precision"] == 0.5 and s["recall"] == 0.5
    empty = np.zeros((4, 4), bool)
    assert ev.mask_scores(empty, empty)["iou"] == 1.0                 # a sharp photo found sharp
    assert ev.mask_scores(true, empty)["precision"] == 0.0 and ev.mask_scores(true, empty)["recall"] == 1.0


@pytest.mark.parametrize("length", [4, 10])
def test_psf_of_horizontal_trajectory_is_a_line(length):
    traj = np.stack([np.linspace(-length / 2, length / 2, 15), np.zeros(15)], axis=1)
    psf = ev.trajectory_psf(traj)
    assert psf.shape == (1, length + 1)
    assert psf.sum() == pytest.approx(1.0) and (psf > 0).all()
    assert np.allclose(psf, psf[:, ::-1])                          # symmetric about the centre
    # Sub-pixel offsets spread bilinearly; the centre stays the centre (odd sizes).
    shifted = ev.trajectory_psf(traj + [0.0, 0.5])
    assert shifted.shape[0] % 2 == 1 and shifted.shape[1] % 2 == 1 and shifted.sum() == pytest.approx(1.0)


def test_psf_direction_matches_the_generator():
    """Re-blurring the sharp image with the PSF reproduces the generator's blurry image (so the
    kernel is not mirrored): a curved path, where a mirrored kernel is clearly worse."""
    from scipy.signal import convolve
    s = make_sample(_smooth_photo(), np.random.default_rng(5), crop=48, kind="global")
    psf = ev.trajectory_psf(s.trajectory)
    pad = max(psf.shape)
    lin = np.pad(s.sharp.astype(np.float64) ** ev.GAMMA, ((pad, pad), (pad, pad), (0, 0)), mode="symmetric")

    def reblur(p):
        out = np.stack([convolve(lin[..., c], p, mode="same") for c in range(3)], -1)[pad:-pad, pad:-pad]
        return ev.masked_psnr(out ** (1 / ev.GAMMA), s.blurry)
    assert reblur(psf) > 45.0 and reblur(psf) > reblur(psf[::-1, ::-1])


def _smooth_photo(size=96, seed=0):
    from scipy import ndimage
    rng = np.random.default_rng(seed)
    img = np.stack([ndimage.gaussian_filter(rng.random((size, size)), 4) for _ in range(3)], -1)
    return ((img - img.min()) / (img.max() - img.min()) * 0.8 + 0.1).astype(np.float32)


def test_richardson_lucy_with_true_psf_beats_blurry_on_global_blur():
    photo = _smooth_photo()
    gains = []
    for seed in (1, 3):       # moderate and long trajectories
        s = make_sample(photo, np.random.default_rng(seed), crop=64, kind="global")
        restored, how = ev.classical_restore(s)
        assert how == "global" and restored.dtype == np.float32 and restored.shape == s.blurry.shape
        gains.append(ev.masked_psnr(restored, s.sharp) - ev.masked_psnr(s.blurry, s.sharp))
    assert min(gains) > 1.0, gains


def test_classical_keeps_pixels_outside_the_true_mask_and_labels_regions():
    samples = heldout_set(8, crop=64)
    s = next(s for s in samples if len(s.trajectories) == 2)
    assert np.array_equal(s.regions >= 0, s.mask) and set(np.unique(s.regions)) <= {-1, 0, 1}
    restored, how = ev.classical_restore(s, iterations=5)
    assert how == "per-region"
    assert np.array_equal(restored[~s.mask].view(np.uint32), s.blurry[~s.mask].view(np.uint32))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random tiny network whose mask head is re-centred so the predicted masks are partial
    (a random head predicts all-or-nothing, which would not exercise the sparse path)."""
    net = random_net("tiny", seed=0)
    seen = []
    hook = net.mask_head.logit.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    Deblurrer(net, device="cpu").run(heldout_set(1, crop=64)[0].blurry)
    hook.remove()
    with torch.no_grad():
        net.mask_head.logit.bias.sub_(seen[0].median())
    path = tmp_path_factory.mktemp("eval") / "tiny.pth"
    save_checkpoint(net, path)
    return path


@pytest.mark.slow
def test_cli_end_to_end(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "m2ae_infer.evaluate", "--checkpoint", str(tiny_ckpt),
                           "--samples", "3", "--crop", "64", "--out", str(out), "--threads", "1",
                           "--rl-iterations", "5", "-q"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ours_sparse" in proc.stdout and "IoU" in proc.stdout
    report = json.loads((out / "eval.json").read_text())
    assert set(report["rows"]) == {"blurry", "ours_dense", "ours_sparse", "ours_true_mask", "classical"}
    assert report["contracts"]["changed_outside_mask"] == 0 and report["contracts"]["pass"]
    local = [r for r in report["per_sample"] if r["kind"] == "local"]
    assert local and all(set(r["changed_outside_mask"]) == {"dense", "sparse", "true_mask"} for r in local)
    # the true-mask row really ran the network inside the true mask
    assert all(r["ours_true_mask"]["psnr_mask"] != r["blurry"]["psnr_mask"] for r in local)
    assert report["contracts"]["sparse_dense_max_abs"] <= 1e-5
    assert 0.0 < report["mask"]["mean_active_fraction"] < 1.0               # the sparse path really ran
    assert report["checkpoint"]["path"].endswith("tiny.pth") and len(report["per_sample"]) == 3
    assert report["settings"]["samples"] == 3 and "torch" in report["machine"]
    blurry = report["rows"]["blurry"]["all"]
    assert blurry["psnr_mask"] is not None and 0 < blurry["psnr"] <= ev.PSNR_CAP
    from PIL import Image
    with Image.open(out / "eval_grid.png") as grid:
        assert grid.width >= 5 * 64 and grid.height >= 3 * 64


def test_bad_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    for ckpt in (bad, tmp_path / "missing.pth"):
        assert ev.main(["--checkpoint", str(ckpt), "--samples", "1", "--crop", "32", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("m2ae-eval: error:") and "\n" not in err and str(ckpt.name) in err
    assert not (tmp_path / "eval.json").exists()


def test_missing_scikit_image_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "skimage", None)       # import skimage -> ImportError
    assert ev.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "m2ae-infer[train]" in err and "\n" not in err


def test_validation_split_runs(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "val"
    assert ev.main(["--checkpoint", str(tiny_ckpt), "--split", "validation", "--samples", "1", "--crop", "32",
                    "--rl-iterations", "2", "--out", str(out), "-q"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["settings"]["split"] == "validation" and report["settings"]["seed"] == 4242
    with pytest.raises(SystemExit):
        ev.main(["--split", "validation", "--seed", "3", "--out", str(tmp_path / "x")])
    assert "1000" in capsys.readouterr().err


def test_validation_on_dev_photos(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "dev"
    assert ev.main(["--checkpoint", str(tiny_ckpt), "--split", "validation", "--photos", "camera", "--samples", "1",
                    "--crop", "32", "--rl-iterations", "2", "--out", str(out), "-q"]) == 0
    assert json.loads((out / "eval.json").read_text())["settings"]["photos"] == "camera"
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert ev.main(["--split", "validation", "--photos", "chelsea", "--out", str(bad), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "held out" in err and "\n" not in err and not bad.exists()
    with pytest.raises(SystemExit):      # the held-out split has no photo choice
        ev.main(["--photos", "camera", "--out", str(bad)])
    assert "--split validation" in capsys.readouterr().err


def test_usage_error_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        ev.main(["--samples", "0"])
    assert exc.value.code == 2


def test_existing_results_need_force_and_bad_out_is_refused_before_work(tiny_ckpt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text("mine")
    # refused before any sample is generated: the sample generator must not even be called
    import m2ae_infer.data.synth as synth
    monkeypatch.setattr(synth, "heldout_set", lambda *a, **k: pytest.fail("ran before checking --out"))
    base = ["--checkpoint", str(tiny_ckpt), "--samples", "1", "--crop", "32", "-q"]
    assert ev.main([*base, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "eval.json" in err and "--force" in err and "\n" not in err
    assert (out / "eval.json").read_text() == "mine"
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    assert ev.main([*base, "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err and a_file.read_text() == "mine"
    monkeypatch.undo()
    assert ev.main([*base, "--out", str(out), "--force", "--rl-iterations", "2", "--threads", "1"]) == 0
    assert json.loads((out / "eval.json").read_text())["settings"]["samples"] == 1


@pytest.mark.parametrize("flag,value", [("--crop", "100000"), ("--crop", "8"), ("--samples", "0"), ("--seed", "-5"),
                                        ("--rl-iterations", "0"), ("--threshold", "2"), ("--dilation", "-1"),
                                        ("--out", ""), ("--device", "mps")])
def test_out_of_range_options_name_the_flag(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        ev.main([flag, value, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2ae-eval: error:") and flag in err and value in err and "\n" not in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ sets: sharp, independent, video; evaluate()
def _tiny_corpus(root, sizes=((40, 56), (48, 36)), split="dev"):
    """A corpus folder with one tiny smooth photo per size, in ``split`` (the m2ae-corpus manifest format)."""
    from PIL import Image
    entries = []
    for i, (h, w) in enumerate(sizes):
        rel = f"photos/test/p{i}.png"
        (root / "photos" / "test").mkdir(parents=True, exist_ok=True)
        Image.fromarray((_smooth_photo(max(h, w), seed=10 + i)[:h, :w] * 255).astype(np.uint8)).save(root / rel)
        entries.append({"file": rel, "kind": "photo", "split": split, "source": "test", "version": "1",
                        "license": "CC0", "original": f"p{i}.png", "width": w, "height": h, "original_width": w,
                        "original_height": h, "bytes": (root / rel).stat().st_size, "sha256": "0" * 64})
    (root / "manifest.json").write_text(json.dumps({"format": "m2ae-corpus", "version": 1, "entries": entries}))
    return root


def test_sharp_set_on_a_tiny_corpus(tiny_ckpt, tmp_path, capsys):
    corpus = _tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "sharp"
    assert ev.main(["--checkpoint", str(tiny_ckpt), "--set", "sharp", "--photos-dir", str(corpus), "--max-side", "48",
                    "--threads", "1", "--out", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "sharp samples (2)" in text and "below 40 dB" in text and "do no harm" in text
    report = json.loads((out / "eval.json").read_text())
    assert report["set"] == "sharp" and report["settings"]["split"] == "dev" and report["notes"]
    assert set(report["rows"]) == {"blurry", "ours_dense", "ours_sparse"}
    per = report["per_sample"]
    assert [r["name"] for r in per] == ["photos/test/p0.png", "photos/test/p1.png"]
    assert per[0]["size"] == [34, 48] and per[1]["size"] == [48, 36]      # long side <= --max-side, aspect kept
    assert all(r["kind"] == "sharp" and r["blurry"]["psnr"] == ev.PSNR_CAP for r in per)
    s = report["do_no_harm"]["sharp_samples"]
    psnrs = [r["ours_sparse"]["vs_input"]["psnr"] for r in per]
    assert s["n"] == 2 and s["worst_psnr_vs_input"] == min(psnrs) and s["below_40db"] == sum(p < 40 for p in psnrs)
    assert s["mean_flagged_fraction"] == pytest.approx(np.mean([r["flagged_fraction"] for r in per]))
    assert 0.0 < s["mean_flagged_fraction"] < 1.0                          # the re-centred head flags some pixels
    # on a sharp photo PSNR against sharp IS PSNR against the input
    assert all(r["ours_sparse"]["psnr"] == r["ours_sparse"]["vs_input"]["psnr"] for r in per)
    assert report["contracts"]["pass"]
    # issue 14's sharp-photo targets, from the per-photo figures: <= 5 % flagged on average, every photo >= 40 dB
    t = report["targets"]
    assert set(t) == {"mean_flagged_fraction", "photos_below_40db"} and "targets (issue 14)" in text
    assert t["mean_flagged_fraction"]["met"] == (np.mean([r["flagged_fraction"] for r in per]) <= 0.05)
    assert t["photos_below_40db"]["value"] == sum(p < 40 for p in psnrs)
    assert t["photos_below_40db"]["met"] == all(p >= 40 for p in psnrs)
    assert (out / "eval_grid.png").is_file()


def test_sharp_set_refuses_the_heldout_split_of_a_dev_corpus_and_missing_corpora(tmp_path, capsys):
    corpus = _tiny_corpus(tmp_path / "corpus")
    for args, needle in ((["--photos-dir", str(corpus), "--split", "heldout"], "no photos in the heldout split"),
                         (["--photos-dir", str(tmp_path / "nowhere")], "manifest")):
        out = tmp_path / "o"
        assert ev.main(["--set", "sharp", *args, "--out", str(out), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("m2ae-eval: error:") and needle in err and "\n" not in err
        assert not out.exists()                                           # refused before any work


@pytest.mark.parametrize("args,needle", [(["--set", "sharp"], "--photos-dir"), (["--set", "video"], "--video"),
                                         (["--video", "x.avi"], "--set video"),
                                         (["--photos-dir", "d"], "--photos-dir"),
                                         (["--set", "video", "--video", "x.avi", "--split", "dev"], "--split"),
                                         (["--set", "independent", "--split", "validation"], "--split"),
                                         (["--split", "dev"], "--split"), (["--radius", "0"], "--radius"),
                                         (["--max-side", "4"], "--max-side")])
def test_set_usage_errors_are_one_line_exit_2(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        ev.main([*args, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2ae-eval: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_missing_video_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "o"
    assert ev.main(["--set", "video", "--video", str(tmp_path / "none.avi"), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2ae-eval: error:") and "none.avi" in err and "not found" in err and "\n" not in err
    assert not out.exists()
    (tmp_path / "clips").mkdir()
    assert ev.main(["--set", "video", "--video", str(tmp_path / "clips"), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is a folder, not a video file" in err and "\n" not in err and not out.exists()


def test_video_set_end_to_end(tiny_ckpt, tmp_path, capsys):
    av = pytest.importorskip("av", reason="reading videos needs PyAV (pip install 'm2ae-infer[train]')")
    rng = np.random.default_rng(3)
    bg = (_smooth_photo(64, seed=4)[:48] * 255).astype(np.uint8)
    path = tmp_path / "walk.mkv"
    with av.open(str(path), "w") as c:
        st = c.add_stream("ffv1", rate=10)
        st.width, st.height, st.pix_fmt = 64, 48, "bgr0"
        for t in range(14):
            f = bg.copy()
            f[16:28, 4 + 3 * t:16 + 3 * t] = rng.integers(150, 256, 3)    # a moving patch
            for p in st.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    out = tmp_path / "vid"
    assert ev.main(["--checkpoint", str(tiny_ckpt), "--set", "video", "--video", str(path), "--samples", "2",
                    "--radius", "2", "--threads", "1", "--out", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "outside the true mask" in text and "targets (issue 14): mask iou" in text
    report = json.loads((out / "eval.json").read_text())
    assert set(report["rows"]) == {"blurry", "ours_dense", "ours_sparse", "ours_true_mask"}
    assert report["settings"]["samples"] == 2 and all(r["kind"] == "local" for r in report["per_sample"])
    harm = report["do_no_harm"]
    for row in ("ours_dense", "ours_sparse", "ours_true_mask"):
        assert set(harm["outside_true_mask"][row]) == {"mean_abs", "psnr_vs_input"}
    # the true-mask row changes only pixels its (cell-rounded) working mask covers: little outside the true mask
    per = report["per_sample"]
    for row in ("ours_sparse", "ours_true_mask"):
        figures = [r[row]["vs_input"]["mean_abs_outside_true_mask"] for r in per]
        assert harm["outside_true_mask"][row]["mean_abs"] == pytest.approx(np.mean(figures))
    assert 0 <= harm["outside_true_mask"]["ours_true_mask"]["mean_abs"] < 0.02
    assert all(r["blurry"]["vs_input"]["psnr_outside_true_mask"] == ev.PSNR_CAP for r in per)
    assert report["rows"]["blurry"]["all"]["psnr_mask"] < 40                # the patch really is smeared
    # issue 14's real-motion targets (IoU >= 0.45, >= +0.5 dB in the motion mask, no window below the input),
    # recomputed from the per-window records
    t, inter = report["targets"], sum(r["mask"]["inter"] for r in per)
    iou = inter / sum(r["mask"]["union"] for r in per)
    assert t["mask_iou"]["value"] == pytest.approx(iou) and t["mask_iou"]["met"] == (iou >= 0.45)
    gain = np.mean([r["ours_sparse"]["psnr_mask"] for r in per]) - np.mean([r["blurry"]["psnr_mask"] for r in per])
    assert t["psnr_mask_gain_db"]["value"] == pytest.approx(gain) and t["psnr_mask_gain_db"]["met"] == (gain >= 0.5)
    below = sum(r["ours_sparse"]["psnr"] < r["blurry"]["psnr"] for r in per)
    assert t["samples_below_input"] == {"value": below, "op": "<=", "bound": 0, "met": below == 0}


def test_independent_set_skips_classical_and_says_so(tiny_ckpt, tmp_path, capsys):
    pytest.importorskip("m2ae_infer.data.independent")
    out = tmp_path / "ind"
    assert ev.main(["--checkpoint", str(tiny_ckpt), "--set", "independent", "--samples", "2", "--crop", "32",
                    "--threads", "1", "--out", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "classical row skipped" in text
    report = json.loads((out / "eval.json").read_text())
    assert "classical" not in report["rows"] and "ours_true_mask" in report["rows"]
    assert report["settings"]["split"] == "heldout" and report["settings"]["seed"] == 1234


def test_evaluate_callable_with_a_net_or_a_deblurrer(tiny_ckpt):
    from m2ae_infer import load_checkpoint
    net = load_checkpoint(tiny_ckpt)
    samples = heldout_set(2, crop=32)
    a = ev.evaluate(net, samples, rows=("blurry", "ours_dense", "ours_sparse"), device="cpu")
    b = ev.evaluate(Deblurrer(net, device="cpu"), iter(samples), rows=ev.ROWS[:3], total=2)
    assert len(a) == len(b) == 2 and "classical" not in a[0] and "ours_true_mask" not in a[0]
    for x, y in zip(a, b):
        assert x["ours_sparse"]["psnr"] == y["ours_sparse"]["psnr"] and x["mask"] == y["mask"]
    s = ev.summarize(a)
    assert set(s["rows"]) == {"blurry", "ours_dense", "ours_sparse"} and "do_no_harm" in s
    assert s["do_no_harm"]["output_below_input"]["ours_sparse"] == sum(
        r["ours_sparse"]["psnr"] < r["blurry"]["psnr"] for r in a)


def test_train_validate_and_evaluate_report_one_float64_psnr(tiny_ckpt):
    """m2ae-train's end-of-run score is m2ae-eval's: both match a float64 PSNR over the annotated mask (mean over
    the samples that have one) of the network's own dense output, and the pooled full-resolution mask IoU."""
    from m2ae_infer import load_checkpoint
    from m2ae_infer.data.synth import validation_set
    from m2ae_infer.model.mask import full_resolution
    from m2ae_infer.reparam import reparameterize_model
    from m2ae_infer.train import validate
    net = load_checkpoint(tiny_ckpt)
    samples = validation_set(10, crop=32)           # 8 local, 1 sharp (no mask), 1 global
    deploy = reparameterize_model(net)
    psnr_in, psnr_out, inter, union = [], [], 0, 0
    with torch.no_grad():
        for s in samples:
            x = torch.from_numpy(s.blurry).permute(2, 0, 1)[None]
            restored = deploy(x).clamp(0, 1)[0].permute(1, 2, 0).double().numpy()
            pred = full_resolution(deploy.predict_mask(x, deploy.stem_features(x)), x.shape[-2:])[0, 0].numpy()
            inter, union = inter + int((pred & s.mask).sum()), union + int((pred | s.mask).sum())
            if s.mask.any():
                for out, img in ((psnr_in, s.blurry), (psnr_out, restored)):
                    out.append(10 * np.log10(1 / np.mean((img.astype(np.float64) - s.sharp)[s.mask] ** 2)))
    assert psnr_in and len(psnr_in) < len(samples)          # some samples without a mask: left out of the mean
    assert 0 < inter < union                                 # a partial mask: the IoU means something
    scored = validate(net, n=10, crop=32)
    summary = ev.summarize(ev.evaluate(net, samples, rows=ev.ROWS[:3], device="cpu"))
    for value, ref in ((scored["psnr_blurry_in_mask"], np.mean(psnr_in)),
                       (summary["rows"]["blurry"]["all"]["psnr_mask"], np.mean(psnr_in)),
                       (scored["psnr_restored_in_mask"], np.mean(psnr_out)),
                       (summary["rows"]["ours_sparse"]["all"]["psnr_mask"], np.mean(psnr_out))):
        assert value == pytest.approx(ref, rel=1e-5)
    assert scored["mask_iou"] == summary["mask"]["pooled"]["iou"] == pytest.approx(inter / union)
    assert np.mean(psnr_out) != pytest.approx(np.mean(psnr_in), rel=1e-3)   # the network really changed pixels


@pytest.mark.parametrize("argv,needle", [(["--frames", "400:"], "--frames is for --set video"),
                                         (["--set", "video", "--video", "v.avi", "--frames", "9:3"], "--frames")])
def test_frames_option_is_checked(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as exc:
        ev.main([*argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and needle in err and "\n" not in err
