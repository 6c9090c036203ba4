"""The trainer (``m2ae-train``): losses against independent references, a fixed-batch overfit, exact
resume, the CLI's files and its one-line errors. Tiny config, 32 px crops, a few steps each."""
from __future__ import annotations

import argparse
import dataclasses
import csv
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("skimage", reason="the synthetic training data needs scikit-image (pip install scikit-image)")

from m2ae_infer import M2AEConfig, M2AENet, load_checkpoint, reparameterize_model  # noqa: E402
from m2ae_infer.checkpoint import read_checkpoint  # noqa: E402
from m2ae_infer.model.mask import full_resolution, working_mask  # noqa: E402
from m2ae_infer.data.synth import HELDOUT_PHOTOS, TRAIN_PHOTOS  # noqa: E402
from m2ae_infer.train import (RUN_DEFAULTS, RunSettings, TrainStream, UsageError, build_optimizer,  # noqa: E402
                              charbonnier, compute_losses, init_for_training, main, mask_loss, reblur_loss)

TINY = ["--config", "tiny", "--batch", "2", "--crop", "32", "--pool", "8", "--warmup", "1", "--threads", "2",
        "--val-samples", "1", "--val-crop", "32", "-q"]


# ------------------------------------------------------------------------------------------ losses
def test_charbonnier_matches_float64_formula():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 9, 7, generator=gen), torch.rand(2, 3, 9, 7, generator=gen)
    ref = ((a.double() - b.double()) ** 2 + 1e-6).sqrt().mean()
    assert abs(charbonnier(a, b).item() - ref.item()) < 1e-7
    assert abs(charbonnier(a, a).item() - 1e-3) < 1e-9  # the floor is eps, not 0


def test_weighted_charbonnier_is_the_weighted_float64_mean():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.rand(2, 3, 6, 5, generator=gen), torch.rand(2, 3, 6, 5, generator=gen)
    w = 1.0 + 3.0 * (torch.rand(2, 1, 6, 5, generator=gen) < 0.4).double()       # per pixel, all channels
    c = ((a.double() - b.double()) ** 2 + 1e-6).sqrt()
    ref = (c * w).sum() / w.expand_as(c).sum()
    assert abs(charbonnier(a, b, weight=w.float()).item() - ref.item()) < 1e-7
    assert abs(charbonnier(a, b, weight=torch.ones(2, 1, 6, 5)).item() - charbonnier(a, b).item()) < 1e-7


def test_blur_weight_weights_the_annotated_pixels_of_the_reconstruction_loss():
    """--blur-weight W: the reconstruction loss is the weighted mean with W on the annotated blur, computed here
    from the network's own output."""
    settings = RunSettings(config="tiny", batch=2, crop=32, pool=2, blur_weight=4.0)
    stream = TrainStream(settings.crop, settings.pool, seed=3)
    blurry, sharp, mask = (torch.stack(x) for x in zip(*(stream[i] for i in range(2))))
    assert 0 < mask.float().mean() < 1
    torch.manual_seed(0)
    model = M2AENet(M2AEConfig.from_name("tiny")).eval()
    with torch.no_grad():
        ours = compute_losses(model, blurry, sharp, mask, settings)["rec"]
        plain = compute_losses(model, blurry, sharp, mask, RunSettings(config="tiny", batch=2, crop=32, pool=2))["rec"]
        restored = model.forward_train(blurry, working_mask(mask).float()).restored
    c = ((restored.double() - sharp.double()) ** 2 + 1e-6).sqrt()
    w = (1.0 + 3.0 * full_resolution(working_mask(mask), sharp.shape[-2:]).double()).expand_as(c)
    assert abs(ours.item() - ((c * w).sum() / w.sum()).item()) < 1e-6
    assert abs(plain.item() - c.mean().item()) < 1e-6 and abs(ours.item() - plain.item()) > 1e-6


def test_mask_loss_matches_bce_on_probabilities_plus_dice():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 1, 8, 8, generator=gen) * 3
    target = (torch.rand(3, 1, 8, 8, generator=gen) < 0.3).float()
    p = torch.sigmoid(logits.double())
    t = target.double()
    for pw in (1.0, 2.0, 5.0):
        weight = torch.where(t > 0, torch.full_like(t, pw), torch.ones_like(t))
        bce = F.binary_cross_entropy(p, t, weight=weight)
        dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
        assert abs(mask_loss(logits, target, pw).item() - (bce + dice).item()) < 1e-5


def test_reblur_loss_zero_motion_and_empty_mask():
    gen = torch.Generator().manual_seed(2)
    sharp, blurry = torch.rand(2, 3, 10, 12, generator=gen), torch.rand(2, 3, 10, 12, generator=gen)
    mask = (torch.rand(2, 1, 10, 12, generator=gen) < 0.4).float()
    params = torch.zeros(2, 4, 5, 6)  # no motion: reblur(sharp) == sharp
    m = mask.expand_as(sharp).bool()
    ref = (sharp.double() - blurry.double()).abs()[m].mean()
    assert abs(reblur_loss(sharp, blurry, params, mask, 5).item() - ref.item()) < 1e-6
    assert reblur_loss(sharp, blurry, params, torch.zeros_like(mask), 5).item() == 0.0
    # a pure horizontal shift of a horizontal ramp by u: every sample point is x + u*t, the mean is x
    ramp = torch.arange(12.0).expand(1, 3, 10, 12) / 12
    shift = torch.tensor([3.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1).expand(1, 4, 5, 6)
    inner = torch.zeros(1, 1, 10, 12)
    inner[..., 4:8] = 1  # away from the borders (clamped there)
    assert reblur_loss(ramp, ramp, shift, inner, 7).item() < 1e-6


# ---------------------------------------------------------------------------------------- training
def test_training_data_never_uses_heldout_photos():
    stream = TrainStream(crop=32, pool=4, seed=0)
    assert not set(stream.base.photos) & set(HELDOUT_PHOTOS)
    first, again = stream[5], TrainStream(crop=32, pool=4, seed=0)[5]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # a pure function of (seed, index)


def test_exclude_photos_keeps_dev_photos_out(tmp_path, capsys):
    stream = TrainStream(crop=32, pool=4, seed=0, exclude_photos="coffee, camera")
    assert set(stream.base.photos) == set(TRAIN_PHOTOS) - {"coffee", "camera"}
    out = tmp_path / "run"
    assert main(["--out", str(out), "--steps", "1", "--exclude-photos", "coffee,camera", *TINY]) == 0
    meta = read_checkpoint(out / "final_deploy.safetensors").meta
    data = meta["data"]
    assert data["excluded_photos"] == ["coffee", "camera"] and not {"coffee", "camera"} & set(data["photos"])
    assert meta["validation"]["photos"] == ["coffee", "camera"]        # scored on the unseen dev photos
    assert "validation, dev photos coffee,camera" in capsys.readouterr().out
    capsys.readouterr()
    for bad in ("lena", "chelsea"):
        assert main(["--out", str(tmp_path / bad), "--steps", "1", "--exclude-photos", bad, *TINY]) == 2
        err = capsys.readouterr().err.strip()
        assert bad in err and "\n" not in err and not (tmp_path / bad).exists()


@pytest.mark.slow
def test_overfit_one_batch_decreases_loss():
    # a long schedule (steps=1000) keeps the learning rate up during these 60 steps
    settings = RunSettings(config="tiny", batch=4, crop=32, pool=4, steps=1000, warmup=2, lr=5e-3)
    stream = TrainStream(settings.crop, settings.pool, seed=3)
    blurry, sharp, mask = (torch.stack(x) for x in zip(*(stream[i] for i in range(4))))
    assert mask.sum() > 0
    torch.manual_seed(0)
    model = init_for_training(M2AENet(M2AEConfig.from_name("tiny"))).train()
    opt, sched = build_optimizer(model, settings)
    history = []
    for _ in range(60):
        losses = compute_losses(model, blurry, sharp, mask, settings)
        history.append({k: v.item() for k, v in losses.items()})
        opt.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        opt.step()
        sched.step()
    first, last = history[0], history[-1]
    # measured here: total 0.37x, rec 0.66x, mask 0.30x, reblur 0.99x (trajectories learn slowly from ~0)
    assert last["loss"] < 0.6 * first["loss"], (first, last)
    assert last["rec"] < 0.85 * first["rec"], (first, last)
    assert last["mask"] < 0.7 * first["mask"], (first, last)
    assert last["reblur"] < first["reblur"], (first, last)


def _log(path):
    with open(path) as f:
        return [(r["step"], r["loss"], r["rec"], r["reblur"], r["mask"]) for r in csv.DictReader(f)]


def test_resume_is_exact(tmp_path):
    straight, chunked = tmp_path / "straight", tmp_path / "chunked"
    assert main(["--out", str(straight), "--steps", "4", *TINY]) == 0
    assert main(["--out", str(chunked), "--steps", "4", "--stop-after", "2", *TINY]) == 0
    assert read_checkpoint(chunked / "last.pth").meta["stopped"] == "stop-after"
    assert main(["--out", str(chunked), "--resume", "--threads", "2", "-q", "--val-samples", "0"]) == 0
    a, b = read_checkpoint(straight / "last.pth"), read_checkpoint(chunked / "last.pth")
    assert a.meta["step"] == b.meta["step"] == 4 and b.meta["completed"]
    assert a.state_dict.keys() == b.state_dict.keys()
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key
    sa = torch.load(straight / "last_state.pt", weights_only=True)
    sb = torch.load(chunked / "last_state.pt", weights_only=True)
    for i, st in sa["optimizer"]["state"].items():
        for name, value in st.items():
            assert torch.equal(value, sb["optimizer"]["state"][i][name]), (i, name)
    assert sa["scheduler"] == sb["scheduler"]
    assert _log(straight / "train_log.csv") == _log(chunked / "train_log.csv")


# --------------------------------------------------------------------------------------------- CLI
def test_cli_writes_loadable_checkpoints(tmp_path, capsys, monkeypatch):
    from m2ae_infer.data import synth
    loaded, load = [], synth._cached_photo
    monkeypatch.setattr(synth, "_cached_photo", lambda name: (loaded.append(name), load(name))[1])
    out = tmp_path / "run"
    assert main(["--out", str(out), "--steps", "3", *TINY]) == 0
    assert loaded and not set(loaded) & set(HELDOUT_PHOTOS)   # the end-of-run score too: no held-out photo
    assert "validation, new samples on the training photos" in capsys.readouterr().out
    model = load_checkpoint(out / "last.pth")
    deploy = load_checkpoint(out / "final_deploy.safetensors")
    assert not model.inference_mode and deploy.inference_mode
    meta = read_checkpoint(out / "final_deploy.safetensors").meta
    assert meta["step"] == 3 and meta["completed"] and meta["data"]["photos"]
    assert set(meta["validation"]) >= {"psnr_blurry_in_mask", "psnr_restored_in_mask", "mask_iou"}
    assert set(meta["losses"]) == {"loss", "rec", "reblur", "mask"}
    state = torch.load(out / "last_state.pt", weights_only=True)
    assert state["step"] == 3 and state["settings"]["config"] == "tiny"
    assert [r[0] for r in _log(out / "train_log.csv")] == ["1", "2", "3"]
    x = torch.rand(1, 3, 20, 22)
    with torch.no_grad():
        assert torch.allclose(model(x), deploy(x), atol=1e-5)


def test_cli_time_limit_stops_cleanly(tmp_path):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--steps", "50", "--time-limit", "0.01", *TINY]) == 0
    meta = read_checkpoint(out / "last.pth").meta
    assert meta["stopped"] == "time limit" and meta["step"] < 50 and not meta["completed"]
    assert (out / "final_deploy.safetensors").is_file()


@pytest.mark.parametrize("argv", [
    ["--steps", "0"], ["--crop", "33"], ["--lr", "-1"], ["--config", "huge"], ["--bogus"], ["--batch", "x"],
    ["--time-limit", "0"], ["--w-mask", "nan"], ["--resume"], ["--defocus", "1.5"], ["--gate", "mask"],
    ["--train", "body"], ["--train", "mask"], ["--config", "default,mask_channels=0"], ["--seed", "-1"],
    ["--seed", str(2**32)], ["--out", ""],
])
def test_cli_bad_options_one_line_exit_2(tmp_path, capsys, argv):
    assert main(["--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2ae-train: error:") and "\n" not in err, err
    assert not (tmp_path / "run").exists()   # a refused run leaves no folder behind


# values the CLI cannot give (its parser refuses them first) or that test_cli_bad_options does not try
@pytest.mark.parametrize("field,value", [
    ("batch", 0), ("pool", 0), ("warmup", -1), ("clip", 0.0), ("lr", float("inf")), ("pos_weight", 0.0),
    ("w_reblur", -0.5), ("weight_decay", float("nan")), ("crop", 8), ("defocus", -0.1), ("train", "head"),
    ("gate", "both"), ("reblur_source", "noise"), ("steps", 2.5), ("seed", True), ("config", 3),
    ("fresh_head", "yes"), ("init", 7), ("exclude_photos", "nowhere"), ("data", "no/such/corpus"),
])
def test_run_settings_refuse_a_bad_value_in_one_line(field, value):
    with pytest.raises(UsageError) as exc:
        RunSettings(**{"config": "tiny", field: value})
    message = str(exc.value)
    assert "\n" not in message and "--" + field.replace("_", "-") in message, message
    assert str(value) in message, message


def test_run_settings_on_resume(tmp_path):
    """Only --steps may change; a setting the run predates takes its default, one it no longer has is dropped;
    the stored form is a plain dict that weights_only loading reads back."""
    assert RunSettings().to_dict() == RUN_DEFAULTS
    stored = {k: v for k, v in RunSettings(config="tiny", batch=3).to_dict().items() if k != "defocus"}
    given = lambda **kw: argparse.Namespace(**{k: kw.get(k) for k in RUN_DEFAULTS})  # noqa: E731
    resumed = RunSettings.from_args(given(steps=9000), {**stored, "retired_setting": 1})
    assert resumed == RunSettings(config="tiny", batch=3, steps=9000) and resumed.defocus == 0.0
    assert RunSettings.from_args(given(batch=3), stored).batch == 3            # the same value: fine
    for option, value in (("batch", 4), ("defocus", 0.5)):
        with pytest.raises(UsageError, match=f"--{option} {value} differs from the resumed run's"):
            RunSettings.from_args(given(**{option: value}), stored)
    torch.save({"settings": resumed.to_dict()}, tmp_path / "state.pt")
    assert RunSettings(**torch.load(tmp_path / "state.pt", weights_only=True)["settings"]) == resumed


def test_cli_bad_init_is_exit_2_and_leaves_no_folder(tmp_path, capsys):
    bad = tmp_path / "random.pth"
    bad.write_bytes(b"\x00" * 100)
    assert main(["--out", str(tmp_path / "run"), "--init", str(bad), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2ae-train: error:") and str(bad) in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_folder_holding_run_files_and_an_unwritable_out(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "train_log.csv").write_text("my own log")
    assert main(["--out", str(out), "--steps", "1", *TINY]) == 2
    assert "train_log.csv" in capsys.readouterr().err
    assert (out / "train_log.csv").read_text() == "my own log" and sorted(os.listdir(out)) == ["train_log.csv"]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--out", str(blocker / "run"), "--steps", "1", *TINY]) == 2   # a file where a folder must be
    err = capsys.readouterr().err.strip()
    assert "cannot write to --out" in err and "\n" not in err


def test_cli_refuses_to_clobber_or_change_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--out", str(out), "--steps", "2", *TINY]) == 0
    capsys.readouterr()
    assert main(["--out", str(out), "--steps", "2", *TINY]) == 2  # exists, no --resume
    assert main(["--out", str(out), "--resume", "--batch", "3", "-q"]) == 2  # run settings are fixed
    before = (out / "last.pth").read_bytes()
    assert main(["--out", str(out), "--resume", "--steps", "1", "-q"]) == 2  # below the step reached (2)
    assert main([]) == 2  # --out is required
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("m2ae-train: error:") for line in lines)
    assert "--steps 1 is below" in lines[2] and (out / "last.pth").read_bytes() == before


def test_union_gate_lets_the_body_see_wrongly_flagged_pixels():
    """With the mask head flagging everything and an empty annotation, only the union gate runs the body."""
    net = M2AENet(M2AEConfig.from_name("tiny")).eval()
    with torch.no_grad():
        net.mask_head.logit.bias.fill_(50.0)          # logit > 0 everywhere
        net.tail.weight.zero_()
        net.tail.bias.fill_(0.1)                      # a residual of exactly 0.1 wherever the body runs
    x, empty = torch.rand(1, 3, 16, 20), torch.zeros(1, 1, 8, 10)
    with torch.no_grad():
        assert torch.equal(net.forward_train(x, empty).restored, x)
        gated = net.forward_train(x, empty, gate_predicted=True).restored
    assert torch.allclose(gated, x + 0.1, atol=1e-6)


def test_init_fine_tunes_from_a_training_checkpoint(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["--out", str(first), "--steps", "2", *TINY]) == 0
    assert main(["--out", str(second), "--steps", "1", "--lr", "1e-12", "--init", str(first / "last.pth"),
                 "--gate", "union", *TINY]) == 0
    a, b = load_checkpoint(first / "last.pth"), load_checkpoint(second / "last.pth")
    # lr 1e-12: one step cannot move the weights visibly, so b must start from a's weights
    # (parameters only: BatchNorm running statistics move in any training forward pass)
    assert all(torch.allclose(pa, pb, atol=1e-6) for pa, pb in zip(a.parameters(), b.parameters()))
    assert read_checkpoint(second / "last.pth").meta["settings"]["gate"] == "union"
    assert main(["--out", str(tmp_path / "c"), "--steps", "1", "--init", str(first / "final_deploy.safetensors"),
                 *TINY]) != 0
    assert "deploy" in capsys.readouterr().err


def test_train_mask_changes_the_mask_head_only(tmp_path):
    """--train mask from a deploy checkpoint: every tensor outside the mask head comes back bit-identical, the
    head moves; a resized head (config override) starts fresh and the rest is still copied."""
    first = tmp_path / "a"
    assert main(["--out", str(first), "--steps", "1", *TINY]) == 0
    init = first / "final_deploy.safetensors"
    start = load_checkpoint(init).state_dict()
    for out, config in ((tmp_path / "same", "tiny"), (tmp_path / "wider", "tiny,mask_channels=12")):
        assert main(["--out", str(out), "--steps", "3", "--lr", "1e-2", "--train", "mask", "--init", str(init),
                     *TINY, "--config", config]) == 0
        trained = load_checkpoint(out / "final_deploy.safetensors")
        assert trained.config == M2AEConfig.from_spec(config) and trained.inference_mode
        state = trained.state_dict()
        assert set(state) == set(start)
        body = [k for k in start if not k.startswith("mask_head.")]
        assert body and all(torch.equal(state[k], start[k]) for k in body)
        head = [k for k in start if k.startswith("mask_head.")]
        assert any(state[k].shape != start[k].shape or not torch.equal(state[k], start[k]) for k in head)
        meta = read_checkpoint(out / "last.pth").meta
        assert meta["settings"]["train"] == "mask" and meta["losses"]["rec"] == 0.0 < meta["losses"]["mask"]


def test_train_mask_fresh_head(tmp_path, capsys):
    """--fresh-head: the same config, but the head starts from the seeded random init (an independently built
    M2AENet under the same seed) instead of --init's head; the body is still copied."""
    first = tmp_path / "a"
    assert main(["--out", str(first), "--steps", "1", *TINY]) == 0
    init = first / "final_deploy.safetensors"
    out = tmp_path / "fresh"
    assert main(["--out", str(out), "--steps", "1", "--lr", "1e-12", "--train", "mask", "--fresh-head",
                 "--init", str(init), "--seed", "5", *TINY]) == 0
    state, start = load_checkpoint(out / "last.pth").state_dict(), load_checkpoint(init).state_dict()
    torch.manual_seed(5)
    reference = M2AENet(M2AEConfig.from_spec("tiny"), inference_mode=True).state_dict()
    head = [k for k in start if k.startswith("mask_head.")]
    assert head and all(torch.allclose(state[k], reference[k], atol=1e-6) for k in head)
    assert not all(torch.allclose(state[k], start[k], atol=1e-3) for k in head)
    assert all(torch.equal(state[k], start[k]) for k in start if k not in head)
    capsys.readouterr()
    assert main(["--out", str(tmp_path / "b"), "--steps", "1", "--fresh-head", *TINY]) == 2
    assert "--fresh-head needs --train mask" in capsys.readouterr().err


def test_train_mask_refuses_another_body(tmp_path, capsys):
    first = tmp_path / "a"
    assert main(["--out", str(first), "--steps", "1", *TINY]) == 0
    capsys.readouterr()
    assert main(["--out", str(tmp_path / "b"), "--steps", "1", "--train", "mask", "--init",
                 str(first / "last.pth"), *TINY, "--config", "tiny,channels=12"]) == 2
    err = capsys.readouterr().err.strip()
    assert "outside the mask head" in err and "\n" not in err


def test_train_mask_resume_is_exact(tmp_path):
    first = tmp_path / "a"
    assert main(["--out", str(first), "--steps", "1", *TINY]) == 0
    common = ["--train", "mask", "--init", str(first / "last.pth"), *TINY, "--val-samples", "0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["--out", str(whole), "--steps", "4", *common]) == 0
    assert main(["--out", str(split), "--steps", "4", "--stop-after", "2", *common]) == 0
    assert main(["--out", str(split), "--resume", "-q", "--val-samples", "0"]) == 0
    a, b = load_checkpoint(whole / "last.pth").state_dict(), load_checkpoint(split / "last.pth").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_body_from_a_deploy_checkpoint_keeps_the_mask_head(tmp_path):
    """--train body from a deploy checkpoint (grown back exactly by expand_model): the mask head comes back
    bit-identical, the body moves, no BatchNorm statistic moves (frozen norms), and resume is exact."""
    first = tmp_path / "a"
    assert main(["--out", str(first), "--steps", "1", *TINY]) == 0
    init = first / "final_deploy.safetensors"
    start = load_checkpoint(init).state_dict()
    common = ["--train", "body", "--gate", "union", "--init", str(init), "--lr", "1e-2", *TINY,
              "--val-samples", "0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["--out", str(whole), "--steps", "3", *common]) == 0
    trained = load_checkpoint(whole / "final_deploy.safetensors").state_dict()
    assert set(trained) == set(start)
    head = [k for k in start if k.startswith("mask_head.")]
    assert head and all(torch.equal(trained[k], start[k]) for k in head)
    assert any(not torch.equal(trained[k], start[k]) for k in start if k.startswith("blocks."))
    form = load_checkpoint(whole / "last.pth")
    assert not form.inference_mode
    stats = {k: v for k, v in form.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    fresh = {k: v for k, v in M2AENet(M2AEConfig.from_spec("tiny")).state_dict().items() if k in stats}
    assert stats and all(torch.equal(stats[k], fresh[k]) for k in stats if not k.startswith("mask_head."))
    assert main(["--out", str(split), "--steps", "3", "--stop-after", "1", *common]) == 0
    assert main(["--out", str(split), "--resume", "-q", "--val-samples", "0"]) == 0
    a, b = load_checkpoint(whole / "last.pth").state_dict(), load_checkpoint(split / "last.pth").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_body_can_add_blocks_that_start_as_no_ops(tmp_path):
    """--train body --config tiny,num_blocks=3 from a 2-block deploy checkpoint: the added block starts as an
    exact no-op, so at step 0 the deeper network computes what the init computes (compared with the init's own
    dense forward); fewer blocks, or another field changed, is refused in one line."""
    from m2ae_infer.train import RunSettings, build_model

    first = tmp_path / "a"
    assert main(["--out", str(first), "--steps", "2", *TINY]) == 0
    init = first / "final_deploy.safetensors"
    start = load_checkpoint(init)
    settings = dataclasses.replace(RunSettings(), train="body", init=str(init), config="tiny,num_blocks=3")
    deeper = build_model(settings).eval()
    assert len(deeper.blocks) == 3 and not deeper.inference_mode
    torch.manual_seed(3)
    image = torch.rand(1, 3, 24, 20)
    mask = torch.rand(1, 1, 24, 20) > 0.5
    with torch.no_grad():
        assert torch.allclose(deeper(image, mask=mask), start(image, mask=mask), atol=1e-6)
        grown = reparameterize_model(deeper)
        assert torch.allclose(grown(image, mask=mask), start(image, mask=mask), atol=1e-6)
    assert main(["--out", str(tmp_path / "b"), "--steps", "1", "--train", "body", "--init", str(init), *TINY,
                 "--config", "tiny,num_blocks=1"]) == 2
    assert main(["--out", str(tmp_path / "c"), "--steps", "1", "--train", "body", "--init", str(init), *TINY,
                 "--config", "tiny,num_blocks=3,channels=12"]) == 2
