"""``m2ae-eval``: held-out quality, exactness and do-no-harm: blurry input vs our model vs a classical oracle.

Rows: ``blurry`` (the input), ``ours_dense`` / ``ours_sparse`` (public ``Deblurrer.run``, *predicted* mask),
``ours_true_mask`` (the same network given the TRUE mask: what the body does when the mask head is perfect, so
the two sources of error can be told apart), ``classical`` (Richardson-Lucy given the TRUE kernel and TRUE mask:
an oracle reference). Exit codes: 0 done;
1 an exactness contract failed (sparse != dense, or a pixel outside the mask changed); 2 usage error, bad
checkpoint, missing corpus / video or missing scikit-image.

Sets (``--set``): ``synthetic`` (the training generator, :mod:`m2ae_infer.data.synth`, on held-out photos; all
rows), ``independent`` (:mod:`m2ae_infer.data.independent`, another way of making local blur; no classical row:
its kernels are not given as PSFs), ``sharp`` (whole sharp photos of a corpus split: how much is flagged and how
much the output differs from the input; rows blurry / ours_dense / ours_sparse) and ``video`` (real local motion,
:mod:`m2ae_infer.data.video`: averaged frames of a static-camera video; no classical row, the motion is unknown).
Every report has the do-no-harm figures: whole-image PSNR of the output against the input's (the output should
never be below the input), the change outside the TRUE mask, and the flagged fraction on sharp samples.
:func:`evaluate` is the callable core (a network or Deblurrer and samples in, per-sample dicts out);
:func:`summarize` makes the report.

Decisions: per-sample PSNR is capped at ``PSNR_CAP`` dB (identical images would be infinite). RL runs per
channel in linear light (the generator averages sub-frames in linear light), with an edge-padded margin.
Two moving regions each get their own PSF, assigned per pixel by the generator's ``Sample.regions`` labels.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .atomic import atomic_write
from .cliutil import (OneLineArgumentParser, check_device, cli_main, device_arg, path_arg, progress_stream, say,
                      writable_folder)
from .messages import one_line
from .shipped import DETECTOR_SIDE

PSNR_CAP = 100.0
MAX_CROP = 1536   # the largest photo is 1411 px; a larger crop would be mostly mirror padding
ROWS = ("blurry", "ours_dense", "ours_sparse", "ours_true_mask", "classical")
GAMMA = 2.2
_INSTALL_HINT = 'm2ae-eval needs scikit-image (and scipy): pip install "m2ae-infer[train]"'


# ---------------------------------------------------------------------------------------------- metrics
def masked_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """PSNR (data range 1) of ``[H, W, C]`` images over the pixels where ``mask`` ``[H, W]`` is true
    (all pixels for ``None``); ``None`` for an empty mask; capped at ``PSNR_CAP``."""
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
    if mask is not None:
        if not mask.any():
            return None
        diff = diff[mask]
    mse = float(diff.mean())
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else min(PSNR_CAP, -10.0 * np.log10(mse))


def masked_ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """Mean of skimage's SSIM map (``channel_axis=-1, data_range=1``, 7x7 window) over ``mask`` (all pixels
    for None). Like skimage's own mean, the 3-pixel image border (windows hanging over the edge) is left
    out unless the mask lies only there, so a full mask gives exactly ``structural_similarity``."""
    from skimage.metrics import structural_similarity
    if mask is not None and not mask.any():
        return None
    mean, smap = structural_similarity(a, b, channel_axis=-1, data_range=1.0, full=True)
    if mask is None:
        return float(mean)
    inner = np.zeros_like(mask)
    inner[3:-3, 3:-3] = mask[3:-3, 3:-3]
    return float(smap[inner if inner.any() else mask].mean())


def mask_scores(pred: np.ndarray, true: np.ndarray) -> dict:
    """Counts and IoU / precision / recall of a predicted bool mask against the true one. Empty
    denominators score 1.0 (nothing predicted: no false positives; nothing to find: nothing missed)."""
    inter, union = int((pred & true).sum()), int((pred | true).sum())
    n_pred, n_true = int(pred.sum()), int(true.sum())
    return {"inter": inter, "union": union, "pred": n_pred, "true": n_true, **_ratios(inter, union, n_pred, n_true)}


def _ratios(inter: int, union: int, n_pred: int, n_true: int) -> dict:
    ratio = lambda n, d: n / d if d else 1.0  # noqa: E731
    return {"iou": ratio(inter, union), "precision": ratio(inter, n_pred), "recall": ratio(inter, n_true)}


# ------------------------------------------------------------------------------------ classical reference
def trajectory_psf(trajectory: np.ndarray, per_pixel: int = 4) -> np.ndarray:
    """Blur kernel ``[h, w]`` (odd sizes, zero displacement at the centre, sum 1) of a ``[K, 2]`` (dx, dy)
    trajectory: the K-point path, densified (``per_pixel`` samples per pixel of travel, evenly in time like
    the generator's sub-frames), bilinearly splatted. ``blurry = sharp (*) psf`` (true convolution)."""
    traj = np.asarray(trajectory, np.float64).reshape(-1, 2)
    pts = [traj[:1]]
    for p, q in zip(traj[:-1], traj[1:]):
        n = max(1, int(np.ceil(per_pixel * np.linalg.norm(q - p))))
        pts.append(p + (np.arange(1, n + 1) / n)[:, None] * (q - p))
    pts = np.concatenate(pts)
    half = int(np.ceil(np.abs(pts).max())) + 1
    psf = np.zeros((2 * half + 1, 2 * half + 1))
    x, y = pts[:, 0] + half, pts[:, 1] + half
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    wx, wy = x - x0, y - y0
    for dy, dx, w in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx), (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
        np.add.at(psf, (y0 + dy, x0 + dx), w)
    psf[psf < 1e-12] = 0.0
    for axis in (0, 1):  # trim all-zero borders in pairs, so the centre stays the centre
        while psf.shape[axis] > 1 and not np.take(psf, [0, -1], axis=axis).any():
            psf = np.take(psf, range(1, psf.shape[axis] - 1), axis=axis)
    return psf / psf.sum()


def richardson_lucy_rgb(blurry: np.ndarray, psf: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Richardson-Lucy per channel in linear light; float32 ``[H, W, 3]`` in [0, 1].

    skimage's RL treats the outside as zero, which darkens the border a PSF radius deeper each iteration;
    an edge-replicated margin of twice the PSF size keeps that inside the margin (chosen on training photos:
    global blur +5 dB over the input at 30 iterations, against -1..-4 dB with a PSF-radius margin)."""
    from skimage.restoration import richardson_lucy
    pad = 2 * max(psf.shape)
    lin = np.pad(np.clip(blurry, 0, 1).astype(np.float64) ** GAMMA, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    out = np.stack([richardson_lucy(lin[..., c], psf, num_iter=iterations, clip=True)
                    for c in range(lin.shape[2])], axis=-1)[pad:pad + blurry.shape[0], pad:pad + blurry.shape[1]]
    return (np.clip(out, 0, 1) ** (1 / GAMMA)).astype(np.float32)


def classical_restore(sample, iterations: int = 30) -> tuple[np.ndarray, str]:
    """Oracle Richardson-Lucy with the true PSF(s) and true mask; returns ``(image, how)``.

    Local samples: each moving region's pixels (``sample.regions``) get the whole image deconvolved with that
    region's PSF; pixels outside the true mask keep the input."""
    if sample.kind == "sharp" or not sample.mask.any():
        return sample.blurry.copy(), "none"
    if sample.kind == "global":
        return richardson_lucy_rgb(sample.blurry, trajectory_psf(sample.trajectories[0]), iterations), "global"
    out = sample.blurry.copy()
    for r in np.unique(sample.regions[sample.regions >= 0]):
        sel = sample.regions == r
        out[sel] = richardson_lucy_rgb(sample.blurry, trajectory_psf(sample.trajectories[r]), iterations)[sel]
    return out, "per-region"


# ------------------------------------------------------------------------------------------- evaluation
def _runners(model, device="auto", threshold=None, dilation=0, detector_side=DETECTOR_SIDE) -> dict:
    """``{"dense": Deblurrer, "sparse": Deblurrer}`` for a network, a :class:`Deblurrer` (its network, device,
    threshold, dilation and detector side) or such a dict already."""
    from .api import Deblurrer
    if isinstance(model, dict):
        return model
    if isinstance(model, Deblurrer):
        detector_side = model.detector_side
        device, threshold, dilation, model = model.device, model.threshold, model.dilation, model.network
    return {e: Deblurrer(model, device=device, execution=e, threshold=threshold, dilation=dilation,
                         detector_side=detector_side) for e in ("dense", "sparse")}


def evaluate(model, samples: Iterable, *, rows: Sequence[str] = ROWS, device: str = "auto", threshold: float = 0.5,
             dilation: int = 0, rl_iterations: int = 30, names: Sequence[str] | None = None, total: int | None = None,
             progress: bool = False, grid: list | None = None, grid_rows: int = 6) -> list[dict]:
    """Score ``samples`` (:class:`~m2ae_infer.data.synth.Sample` s, any iterable, consumed once) and return one
    dict per sample; :func:`summarize` turns them into the report. The one scorer of the project: ``m2ae-eval``
    and ``m2ae-train``'s end-of-run validation (:func:`m2ae_infer.train.validate`) both report its figures.

    ``model``: an ``M2AENet`` (run dense and sparse with ``device``/``threshold``/``dilation``), a
    :class:`~m2ae_infer.Deblurrer` (its network and settings) or ``{"dense": ..., "sparse": ...}`` Deblurrers.
    ``rows``: ``blurry``, ``ours_dense`` and ``ours_sparse`` always run; ``ours_true_mask`` (the network given
    the true mask) and ``classical`` (Richardson-Lucy with the true PSF) when listed. Every row also gets
    ``vs_input`` figures (PSNR of the output against the *input*, and the change outside the TRUE mask: mean
    abs and PSNR), the do-no-harm view. ``grid``: a list to append up to ``grid_rows`` image rows to (for
    :func:`_write_grid`). The first sample is run once untimed per runner first (allocations)."""
    rows = tuple(r for r in ROWS if r in rows or r in ROWS[:3])
    runners = _runners(model, device, threshold, dilation)
    from tqdm import tqdm
    per_sample = []
    for i, s in enumerate(tqdm(samples, total=total, unit="img", file=progress_stream(), disable=not progress,
                               dynamic_ncols=True)):
        if i == 0:
            for r in runners.values():   # warm-up: the first call pays for allocations, not the images
                r.run(s.blurry)
        outs, infos, seconds, how = _restore(s, runners, rows, rl_iterations)
        head = {"index": i, **({"name": names[i]} if names is not None else {})}
        per_sample.append(_score_sample(s, outs, infos, seconds, how, head))
        if grid is not None and len(grid) < grid_rows:
            grid.append(_grid_row(s, outs, np.asarray(infos["sparse"].mask, bool)))
    return per_sample


def _restore(s, runners: dict, rows: Sequence[str], rl_iterations: int) -> tuple[dict, dict, dict, str | None]:
    """Every row's output for sample ``s``: ``(outputs, run infos, seconds, how the classical row ran)``."""
    outs, infos = {"blurry": s.blurry}, {}
    for e, r in runners.items():
        outs[f"ours_{e}"], infos[e] = r.run(s.blurry, return_info=True)
    seconds = {f"ours_{e}": infos[e].seconds for e in runners}
    if "ours_true_mask" in rows:
        outs["ours_true_mask"], infos["true_mask"] = runners["sparse"].run(s.blurry, mask=s.mask, return_info=True)
        seconds["ours_true_mask"] = infos["true_mask"].seconds
    how = None
    if "classical" in rows:
        start = time.perf_counter()
        outs["classical"], how = classical_restore(s, rl_iterations)
        seconds["classical"] = time.perf_counter() - start
    return outs, infos, seconds, how


def _score_sample(s, outs: dict, infos: dict, seconds: dict, how: str | None, head: dict) -> dict:
    """One sample's dict (``head``: its index and name first): the mask, cost and exactness figures, then per
    row the quality against sharp and the do-no-harm figures against the input."""
    pred = np.asarray(infos["sparse"].mask, bool)
    row = {**head, "kind": s.kind, "size": list(s.blurry.shape[:2]), "regions": len(s.trajectories),
           **({"classical_psf": how} if how is not None else {}),
           "mask": mask_scores(pred, s.mask), "masks_agree": bool(np.array_equal(pred, infos["dense"].mask)),
           "flagged_fraction": float(pred.mean()),
           "active_fraction": infos["sparse"].active_fraction, "flops_saved": infos["sparse"].flops_saved,
           "seconds": seconds,
           "sparse_dense_max_abs": float(np.abs(outs["ours_sparse"] - outs["ours_dense"]).max()),
           "changed_outside_mask": {e: _changed_outside(s.blurry, outs[f"ours_{e}"], np.asarray(infos[e].mask))
                                    for e in infos}}
    outside = ~np.asarray(s.mask, bool)
    for name, img in outs.items():
        row[name] = {"psnr": masked_psnr(img, s.sharp), "ssim": masked_ssim(img, s.sharp),
                     "psnr_mask": masked_psnr(img, s.sharp, s.mask), "ssim_mask": masked_ssim(img, s.sharp, s.mask),
                     "vs_input": {"psnr": masked_psnr(img, s.blurry),
                                  "psnr_outside_true_mask": masked_psnr(img, s.blurry, outside),
                                  "mean_abs_outside_true_mask": (float(np.abs(img - s.blurry)[outside].mean())
                                                                 if outside.any() else None)}}
    return row


def _grid_row(s, outs: dict, pred: np.ndarray) -> list[np.ndarray]:
    """The five tiles of a sample (:data:`GRID_LABELS`): the fourth is the classical output, else the true mask,
    else (sharp photos) the change made, x10."""
    fourth = (outs["classical"] if "classical" in outs else
              np.repeat(np.asarray(s.mask, np.float32)[..., None], 3, 2) if "ours_true_mask" in outs else
              np.clip(np.abs(outs["ours_sparse"] - s.blurry) * 10, 0, 1))
    return [s.blurry, np.repeat(pred[..., None].astype(np.float32), 3, 2), outs["ours_sparse"], fourth, s.sharp]


# ------------------------------------------------------------------------------------------------- CLI
SETS = ("synthetic", "independent", "sharp", "video")
SET_ROWS = {"synthetic": ROWS, "independent": ROWS[:4], "sharp": ROWS[:3], "video": ROWS[:4]}
NOTES = {"independent": "classical row skipped: the independent generator's kernels (random walks, lines) are "
                        "not given as PSFs, so there is no true-PSF oracle",
         "video": "classical row skipped: the motion of real movers is unknown (no PSF); the true mask is the "
                  "frame-difference mask of m2ae_infer.data.video",
         "sharp": "whole sharp photos: the input is the reference, so PSNR is PSNR(output, input); rows "
                  "ours_true_mask and classical do not apply (nothing is blurred)"}
DEFAULT_SAMPLES = {"synthetic": 40, "independent": 40, "video": 8}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="m2ae-eval", description=(
        "Held-out evaluation: blurry input vs our model (dense and sparse with the predicted mask; sparse with the "
        "true mask) vs Richardson-Lucy with the true kernel; on synthetic, independent, sharp-photo or real-video "
        "sets."))
    p.add_argument("--checkpoint", metavar="CKPT", help="checkpoint (.pth/.safetensors); default: the shipped one")
    p.add_argument("--set", choices=SETS, default="synthetic",
                   help="synthetic: the training generator on held-out photos (default); independent: another "
                        "generator (m2ae_infer.data.independent); sharp: whole sharp photos of a corpus split (do no "
                        "harm); video: real local motion from a static-camera video (--video)")
    p.add_argument("--samples", type=int, help="samples (default 40; video 8; sharp: every photo, or the first N)")
    p.add_argument("--crop", type=int, default=256, help="sample size in pixels, synthetic/independent (default 256)")
    p.add_argument("--seed", type=int, help="sample seed (default 1234; 4242 for --split validation)")
    p.add_argument("--split", choices=("heldout", "validation", "dev"),
                   help="synthetic: heldout (the held-out photos; report these) or validation (new samples on the "
                        "training photos, for choosing settings such as --threshold), default heldout; with "
                        "--photos-dir: the corpus split, dev or heldout (default dev)")
    p.add_argument("--photos", metavar="A,B", help="with --split validation: only these training photos, e.g. the "
                                                  "dev photos a run was trained without (m2ae-train --exclude-photos)")
    p.add_argument("--photos-dir", metavar="DIR", type=path_arg,
                   help="a corpus folder (m2ae-data fetch DIR; DIR/manifest.json): the photos of --split for "
                        "--set sharp (required) and --set independent (default: the held-out scikit-image photos)")
    p.add_argument("--video", metavar="PATH", type=path_arg, help="--set video: a static-camera video file")
    p.add_argument("--frames", metavar="A:B", help="--set video: windows only within frames A..B-1 (e.g. 400: for "
                   "vtest.avi, whose frames before 400 may train the detector: m2ae-train --video); default all")
    p.add_argument("--radius", type=int, default=3,
                   help="--set video: frames averaged each side of the centre frame (default 3: 7 frames)")
    p.add_argument("--max-side", type=int, default=1024,
                   help="--set sharp: photos are downscaled so the long side is at most this (default 1024)")
    p.add_argument("--out", metavar="DIR", default="m2ae_eval", type=path_arg,
                   help="output folder for eval.json and eval_grid.png (default m2ae_eval)")
    p.add_argument("--force", action="store_true", help="replace eval.json and eval_grid.png already in --out")
    p.add_argument("--threshold", type=float, default=None,
                   help="blur probability threshold (default: the checkpoint's recommended one, else 0.5)")
    p.add_argument("--dilation", type=int, default=0, help="grow the mask by N working pixels (default 0)")
    p.add_argument("--detector-side", type=int, default=DETECTOR_SIDE, metavar="N",
                   help=f"the detector sees larger images averaged down to at most N pixels on the long side "
                        f"(default {DETECTOR_SIDE}, as Deblurrer); 0: at their own size")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.add_argument("--device", default="auto", type=device_arg,
                   help="auto | cpu | cuda | cuda:N (default auto, as Deblurrer)")
    p.add_argument("--rl-iterations", type=int, default=30, help="Richardson-Lucy iterations (default 30)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _error(message: str) -> int:
    say(f"m2ae-eval: error: {one_line(message)}", sys.stderr)
    return 2


def _check_args(parser, args) -> None:
    """Usage errors (exit 2, one line) that need no file."""
    if args.split is None:
        args.split = "heldout" if args.set == "synthetic" or (args.set == "independent" and not args.photos_dir) \
            else "dev" if args.photos_dir else None
    if args.seed is None:
        args.seed = 4242 if args.split == "validation" else 1234
    if args.samples is None and args.set != "sharp":
        args.samples = DEFAULT_SAMPLES[args.set]
    checks = [("--crop", args.crop, 16, MAX_CROP), ("--seed", args.seed, 0, 2**63 - 1),
              ("--threads", args.threads, 0, 1024), ("--rl-iterations", args.rl_iterations, 1, 10_000),
              ("--radius", args.radius, 1, 100), ("--max-side", args.max_side, 16, 16384)]
    if args.samples is not None:
        checks.insert(0, ("--samples", args.samples, 1, 100_000))
    for flag, value, low, high in checks:
        if not low <= value <= high:
            parser.error(f"{flag} must lie in {low}..{high}, got {value}"
                         + (" (larger crops than the photos would only mirror-pad them)" if flag == "--crop" else ""))
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        parser.error(f"--threshold must lie strictly between 0 and 1, got {args.threshold}")
    if args.dilation < 0:
        parser.error(f"--dilation must be >= 0, got {args.dilation}")
    if args.photos_dir is not None and args.set not in ("sharp", "independent"):
        parser.error(f"--photos-dir is for --set sharp or independent, not --set {args.set}")
    if args.set == "sharp" and args.photos_dir is None:
        parser.error("--set sharp needs --photos-dir DIR (a corpus folder made by m2ae-data fetch DIR)")
    if (args.video is not None) != (args.set == "video"):
        parser.error("--set video needs --video PATH" if args.video is None else "--video needs --set video")
    if args.frames is not None:
        from .data.video import parse_frames
        if args.set != "video":
            parser.error("--frames is for --set video")
        try:
            parse_frames(args.frames)
        except ValueError as exc:
            parser.error(f"--{exc}")
    corpus = args.photos_dir is not None
    allowed = ("dev", "heldout") if corpus else ("heldout", "validation") if args.set == "synthetic" else \
        ("heldout",) if args.set == "independent" else (None,)
    if args.split not in allowed:
        parser.error(f"--split {args.split} does not apply to --set {args.set}"
                     + (" without --photos-dir" if args.set == "independent" else "")
                     + (f" (choose {' or '.join(a for a in allowed if a)})" if any(allowed) else ""))
    if args.split == "validation" and args.seed < 1000:
        parser.error("--split validation needs --seed >= 1000 (training runs use small seeds)")
    if args.photos is not None and args.split != "validation":
        parser.error("--photos picks training photos: it needs --split validation")


def _photo_sample(path, max_side: int):
    """A whole corpus photo as a ``sharp`` Sample (blurry == sharp == the photo), the long side at most
    ``max_side`` (Pillow LANCZOS on the 8-bit image)."""
    from PIL import Image
    from .data.corpus import load_rgb
    from .data.synth import TRAJ_POINTS, Sample
    img = load_rgb(path)
    h, w = img.shape[:2]
    if max(h, w) > max_side:
        scale = max_side / max(h, w)
        small = Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)).resize(
            (max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
        img = np.asarray(small, np.float32) / np.float32(255.0)
    h, w = img.shape[:2]
    return Sample(img, img.copy(), np.zeros((h, w), bool), np.zeros((TRAJ_POINTS, 2), np.float32), "sharp",
                  np.zeros((0, TRAJ_POINTS, 2), np.float32), np.full((h, w), -1, np.int8))


class _Refused(Exception):
    """A problem with the inputs found after parsing: :func:`main` prints it as one line and returns 2."""


@cli_main("m2ae-eval")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    try:
        return _run(parser, args)
    except _Refused as exc:
        return _error(exc.args[0])


def _run(parser, args) -> int:
    """Everything after parsing: inputs refused before any work, then the scores, the files and the table;
    0, or 1 when an exactness contract failed."""
    skimage = _scoring_dependencies()
    photos, paths = _chosen_photos(parser, args), _corpus_paths(args)
    if args.set == "video":
        _check_video(args.video)
    runners, ckpt, meta = _load_runners(args)
    outputs = _prepare_outputs(Path(args.out), args.force)
    per_sample, grid = _score_set(args, runners, photos, paths)
    summary = summarize(per_sample, args.set)
    notes = [NOTES[args.set]] if args.set in NOTES else []
    report = {"set": args.set, "notes": notes,
              "settings": {k: v for k, v in vars(args).items() if k not in ("checkpoint", "quiet")},
              "checkpoint": {"path": str(ckpt.resolve()), "meta": meta},
              "machine": _machine(runners, skimage), **summary, "per_sample": per_sample}
    try:
        _write_json(report, outputs[0], overwrite=args.force)
        _write_grid(grid, outputs[1], overwrite=args.force, set_name=args.set)
    except (OSError, ValueError) as exc:
        raise _Refused(exc) from None
    say(f"set {args.set}: {len(per_sample)} samples" + "".join(f"\nnote: {n}" for n in notes))
    say(format_table(summary))
    say(f"wrote {outputs[0]} and {outputs[1]}")
    return 0 if summary["contracts"]["pass"] else 1


def _scoring_dependencies():
    """scikit-image (returned, for its version) and scipy, or the install hint."""
    try:
        import scipy  # noqa: F401
        import skimage
    except ImportError:
        raise _Refused(_INSTALL_HINT) from None
    return skimage


def _chosen_photos(parser, args) -> list[str] | None:
    """``--photos`` as a list of training photo names (``None``: not given)."""
    from .data.synth import check_training_photos, photo_names
    photos = None if args.photos is None else photo_names(args.photos)
    if photos == []:
        parser.error("--photos needs at least one photo name")
    try:
        check_training_photos(photos or (), "validation photos")
    except ValueError as exc:
        raise _Refused(f"--photos: {exc}") from None
    return photos


def _corpus_paths(args) -> list[Path] | None:
    """The photos of ``--split`` in ``--photos-dir`` (the first ``--samples`` for ``--set sharp``), ``None``
    without a corpus; a missing or bad corpus is refused before any work."""
    if args.photos_dir is None:
        return None
    from .data.corpus import CorpusError, photos as corpus_photos
    try:
        paths = corpus_photos(args.photos_dir, args.split, allow_heldout=True)
    except CorpusError as exc:
        raise _Refused(f"--photos-dir: {exc}") from None
    if not paths:
        raise _Refused(f"--photos-dir {args.photos_dir}: no photos in the {args.split} split; pick another "
                       "--split or corpus")
    return paths[:args.samples] if args.samples is not None and args.set == "sharp" else paths


def _check_video(video: str) -> None:
    """``--video`` exists and PyAV, which decodes it, is installed."""
    if not Path(video).is_file():
        what = "is a folder, not a video file" if Path(video).is_dir() else "not found"
        raise _Refused(f"--video {video} {what}; give a video file (e.g. a corpus's videos/opencv-doc/vtest.avi)")
    try:
        from .data.video import require_av
        require_av()
    except ImportError as exc:
        raise _Refused(exc) from None


def _load_runners(args) -> tuple[dict, Path, dict]:
    """Threads and device set, the checkpoint loaded: ``(runners, checkpoint path, its meta)``."""
    import torch
    from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint
    from .shipped import DEFAULT_CHECKPOINT
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        check_device(args.device)
    except ValueError as exc:
        raise _Refused(exc) from None
    ckpt = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    try:
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} not found; pass --checkpoint PATH")
        net, meta = load_checkpoint(ckpt), read_checkpoint(ckpt).meta
        return _runners(net, args.device, args.threshold, args.dilation, args.detector_side), ckpt, meta
    except (CheckpointError, ValueError, OSError) as exc:
        raise _Refused(exc) from None


def _prepare_outputs(out_dir: Path, force: bool) -> tuple[Path, Path]:
    """``(eval.json, eval_grid.png)`` in ``out_dir``, made writable before the work; existing ones need --force."""
    outputs = (out_dir / "eval.json", out_dir / "eval_grid.png")
    if out_dir.exists() and not out_dir.is_dir():
        raise _Refused(f"--out {out_dir} is a file, not a folder; give a folder name")
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not force:
        raise _Refused(f"{', '.join(existing)} already exist(s); pass --force to replace, or choose another --out")
    writable_folder(out_dir, "--out ", error=_Refused)   # before the work, not after it
    return outputs


def _score_set(args, runners: dict, photos, paths) -> tuple[list[dict], list]:
    """The chosen set made and scored by :func:`evaluate`: ``(per-sample dicts, grid rows)``."""
    try:
        samples, names, total = _make_samples(args, photos, paths)
    except (OSError, ValueError) as exc:     # CorpusError is a ValueError; so are undecodable videos
        raise _Refused(exc) from None
    grid = []
    try:
        per_sample = evaluate(runners, samples, rows=SET_ROWS[args.set], rl_iterations=args.rl_iterations,
                              names=names, total=total, progress=not args.quiet, grid=grid)
    except (OSError, ValueError) as exc:
        raise _Refused(exc) from None
    if not per_sample:
        raise _Refused("no samples to evaluate")
    return per_sample, grid


def _machine(runners: dict, skimage) -> dict:
    """Where the scores were made: the report's ``machine``."""
    import torch
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "scikit-image": skimage.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(runners["sparse"].device)}


def _make_samples(args, photos, paths):
    """``(samples, names, total)`` for the chosen set; samples may be a lazy iterator (sharp photos)."""
    from .data import synth
    say_ = (lambda m: None) if args.quiet else (lambda m: say(f"m2ae-eval: {m}", sys.stderr))  # noqa: E731
    if args.set == "synthetic":
        on = f" on {', '.join(photos)}" if photos else ""
        say_(f"generating {args.samples} {args.split} samples ({args.crop} px){on}")
        samples = (synth.heldout_set(args.samples, seed=args.seed, crop=args.crop) if args.split == "heldout" else
                   synth.validation_set(args.samples, seed=args.seed, crop=args.crop, photos=photos))
        return samples, None, len(samples)
    if args.set == "independent":
        from .data.corpus import load_rgb
        from .data.independent import independent_set
        if paths is None:
            source = f"the held-out scikit-image photos ({', '.join(synth.HELDOUT_PHOTOS)})"
            images = [synth.load_photo(n) for n in synth.HELDOUT_PHOTOS]
        else:
            source = f"{len(paths)} {args.split} photos of {args.photos_dir}"
            images = [load_rgb(p) for p in paths]
        say_(f"generating {args.samples} independent samples ({args.crop} px) on {source}")
        samples = independent_set(images, args.samples, seed=args.seed, crop=args.crop)
        return samples, None, len(samples)
    if args.set == "sharp":
        say_(f"{len(paths)} {args.split} photos of {args.photos_dir} (long side <= {args.max_side})")
        root = Path(args.photos_dir).absolute()
        names = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths]
        return (_photo_sample(p, args.max_side) for p in paths), names, len(paths)
    from .data.video import clip_set, parse_frames
    say_(f"decoding {args.samples} windows of {2 * args.radius + 1} frames from {args.video}")
    samples = clip_set(args.video, args.samples, args.radius, args.seed, frames=parse_frames(args.frames))
    return samples, None, len(samples)


def _changed_outside(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> int:
    """Pixels outside ``mask`` whose bytes differ in any channel (bit-identical passthrough check)."""
    diff = (np.ascontiguousarray(before).view(np.uint32) != np.ascontiguousarray(after).view(np.uint32)).any(-1)
    return int((diff & ~mask).sum())


def summarize(per_sample: list[dict], set_name: str | None = None) -> dict:
    """Means per row (all samples and per kind), pooled mask scores, cost, exactness, do-no-harm figures and the
    the targets of ``set_name`` (:data:`TARGETS`). The rows are those the samples were scored with (see
    :func:`evaluate`)."""
    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    present = tuple(r for r in ROWS if r in per_sample[0])
    groups = {"all": per_sample, **{k: [r for r in per_sample if r["kind"] == k]
                                    for k in ("local", "sharp", "global") if any(r["kind"] == k for r in per_sample)}}
    metrics = ("psnr", "ssim", "psnr_mask", "ssim_mask")
    rows = {name: {g: {"n": len(rs), **{m: mean(r[name][m] for r in rs) for m in metrics}} for g, rs in groups.items()}
            for name in present}
    for name in present[1:]:
        rows[name]["seconds_per_image"] = mean(r["seconds"][name] for r in per_sample)
    pooled = {k: sum(r["mask"][k] for r in per_sample) for k in ("inter", "union", "pred", "true")}
    mask = {"pooled": _ratios(pooled["inter"], pooled["union"], pooled["pred"], pooled["true"]),
            "per_sample_mean": {k: mean(r["mask"][k] for r in per_sample) for k in ("iou", "precision", "recall")},
            "mean_active_fraction": mean(r["active_fraction"] for r in per_sample),
            "mean_flops_saved": mean(r["flops_saved"] for r in per_sample), "true_pixels": pooled["true"]}
    exact = {"sparse_dense_max_abs": max(r["sparse_dense_max_abs"] for r in per_sample),
             "masks_agree": all(r["masks_agree"] for r in per_sample),
             "changed_outside_mask": sum(sum(r["changed_outside_mask"].values()) for r in per_sample)}
    exact["pass"] = (exact["sparse_dense_max_abs"] <= 1e-5 and exact["masks_agree"]
                     and exact["changed_outside_mask"] == 0)
    ours = present[1:]
    sharp = groups.get("sharp", [])
    sharp_psnr = [r["ours_sparse"]["vs_input"]["psnr"] for r in sharp]
    worst = min(range(len(sharp)), key=lambda i: sharp_psnr[i]) if sharp else None
    harm = {"psnr_input": rows["blurry"]["all"]["psnr"],
            "psnr_output": {n: rows[n]["all"]["psnr"] for n in ours},
            "output_below_input": {n: int(sum(r[n]["psnr"] < r["blurry"]["psnr"] for r in per_sample)) for n in ours},
            "outside_true_mask": {n: {"mean_abs": mean(r[n]["vs_input"]["mean_abs_outside_true_mask"]
                                                       for r in per_sample),
                                      "psnr_vs_input": mean(r[n]["vs_input"]["psnr_outside_true_mask"]
                                                            for r in per_sample)} for n in ours},
            "sharp_samples": {"n": len(sharp),
                              "mean_flagged_fraction": mean(r["flagged_fraction"] for r in sharp),
                              "worst_psnr_vs_input": float(sharp_psnr[worst]) if sharp else None,
                              "worst": (sharp[worst].get("name", sharp[worst]["index"]) if sharp else None),
                              "below_40db": int(sum(p < 40.0 for p in sharp_psnr))}}
    gain = None
    if rows["ours_sparse"]["all"]["psnr_mask"] is not None:
        gain = rows["ours_sparse"]["all"]["psnr_mask"] - rows["blurry"]["all"]["psnr_mask"]
    summary = {"rows": rows, "mask": mask, "contracts": exact, "do_no_harm": harm, "psnr_mask_gain_db": gain}
    return {**summary, "targets": check_targets(summary, set_name)}


# The quality targets of issue 14 ("A shipped model that deblurs photos it has never seen, and never damages a sharp
# one"), per evaluation set, as docs/model_card.md reports them: name -> (">=" or "<=", bound). "Whole-image PSNR never
# below the input's" and, on real motion, "untouched elsewhere" are both samples_below_input == 0.
TARGETS = {
    "synthetic": {"mask_iou": (">=", 0.6), "psnr_mask_gain_db": (">=", 1.5), "samples_below_input": ("<=", 0)},
    "independent": {"mask_iou": (">=", 0.6), "psnr_mask_gain_db": (">=", 1.5), "samples_below_input": ("<=", 0)},
    "video": {"mask_iou": (">=", 0.45), "psnr_mask_gain_db": (">=", 0.5), "samples_below_input": ("<=", 0)},
    "sharp": {"mean_flagged_fraction": ("<=", 0.05), "photos_below_40db": ("<=", 0)},
}


def check_targets(summary: dict, set_name: str | None) -> dict:
    """``{name: {"value", "op", "bound", "met"}}`` for the :data:`TARGETS` of ``set_name`` (none for another set,
    e.g. a training run's validation); ``met`` is None where the value does not exist (no true mask)."""
    harm = summary["do_no_harm"]
    values = {"mask_iou": summary["mask"]["pooled"]["iou"] if summary["mask"]["true_pixels"] else None,
              "psnr_mask_gain_db": summary["psnr_mask_gain_db"],
              "samples_below_input": harm["output_below_input"]["ours_sparse"],
              "mean_flagged_fraction": harm["sharp_samples"]["mean_flagged_fraction"],
              "photos_below_40db": harm["sharp_samples"]["below_40db"]}
    out = {}
    for name, (op, bound) in TARGETS.get(set_name, {}).items():
        v = values[name]
        met = None if v is None else (v >= bound if op == ">=" else v <= bound)
        out[name] = {"value": v, "op": op, "bound": bound, "met": met}
    return out


def format_table(summary: dict) -> str:
    fmt = lambda v, p=2: "    -" if v is None else f"{v:.{p}f}"  # noqa: E731
    yes = lambda v: "n/a" if v is None else "yes" if v else "no"  # noqa: E731
    lines = [f"{'row':<14} {'PSNR':>7} {'SSIM':>6} {'PSNR@mask':>10} {'SSIM@mask':>10} {'s/img':>7}"]
    for name, r in summary["rows"].items():
        a = r["all"]
        lines.append(f"{name:<14} {fmt(a['psnr']):>7} {fmt(a['ssim'], 4):>6} {fmt(a['psnr_mask']):>10} "
                     f"{fmt(a['ssim_mask'], 4):>10} {fmt(r.get('seconds_per_image'), 3):>7}")
    m, c, t, h = summary["mask"], summary["contracts"], summary["targets"], summary["do_no_harm"]
    n = summary["rows"]["blurry"]["all"]["n"]
    out = h["outside_true_mask"]["ours_sparse"]
    mean_abs = "-" if out["mean_abs"] is None else f"{out['mean_abs']:.2e}"
    lines += [f"mask (pooled): IoU {m['pooled']['iou']:.3f}  precision {m['pooled']['precision']:.3f}  "
              f"recall {m['pooled']['recall']:.3f}; active {m['mean_active_fraction']:.1%}, "
              f"FLOPs saved {m['mean_flops_saved']:.1%}",
              f"sparse vs dense max |diff| {c['sparse_dense_max_abs']:.2e}; pixels changed outside the mask "
              f"{c['changed_outside_mask']}; contracts {'PASS' if c['pass'] else 'FAIL'}",
              f"do no harm: whole-image PSNR ours_sparse {fmt(h['psnr_output']['ours_sparse'])} vs input "
              f"{fmt(h['psnr_input'])} dB; output below input on {h['output_below_input']['ours_sparse']}/{n} "
              f"samples (target 0); outside the true mask: mean |change| "
              f"{mean_abs}, PSNR(output, input) "
              f"{fmt(out['psnr_vs_input'])} dB"]
    s = h["sharp_samples"]
    if s["n"]:
        lines.append(f"sharp samples ({s['n']}): flagged {s['mean_flagged_fraction']:.2%} of pixels on average; "
                     f"worst PSNR(output, input) {fmt(s['worst_psnr_vs_input'])} dB ({s['worst']}); "
                     f"{s['below_40db']} below 40 dB")
    if t:
        lines.append("targets (issue 14): " + "; ".join(
            f"{name.replace('_', ' ')} {fmt(v['value'], 3) if isinstance(v['value'], float) else v['value']} "
            f"({v['op']} {v['bound']}: {yes(v['met'])})" for name, v in t.items()))
    return "\n".join(lines)


def _write_json(report: dict, path: Path, overwrite: bool = False) -> None:
    with atomic_write(path, "w", overwrite=overwrite) as f:
        json.dump(_finite(report), f, indent=2, allow_nan=False)


def _finite(obj):
    """NaN/inf (e.g. from a checkpoint's meta) as null: the file stays valid JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return None if isinstance(obj, float) and not np.isfinite(obj) else obj


GRID_LABELS = {"synthetic": ("blurry", "predicted mask", "ours (sparse)", "classical (RL)", "sharp"),
               "independent": ("blurry", "predicted mask", "ours (sparse)", "true mask", "sharp"),
               "video": ("blurry (avg)", "predicted mask", "ours (sparse)", "true mask", "centre frame"),
               "sharp": ("input", "predicted mask", "ours (sparse)", "|out - in| x10", "input")}
GRID_TILE = 384   # tiles with a longer side are downscaled to it (whole photos, video frames)


def _write_grid(grid: list[list[np.ndarray]], path: Path, overwrite: bool = False, set_name: str = "synthetic") -> None:
    """One row per sample, the set's five columns (:data:`GRID_LABELS`); tiles of different sizes are
    downscaled to at most ``GRID_TILE`` px and placed top-left in equal cells."""
    from PIL import Image, ImageDraw
    from .imgsave import save_image
    labels, gap, head = GRID_LABELS[set_name], 4, 16

    def tile(a):
        im = Image.fromarray(np.clip(np.asarray(a, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8))
        if max(im.size) > GRID_TILE:
            s = GRID_TILE / max(im.size)
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
        return np.asarray(im)

    tiles = [[tile(t) for t in row] for row in grid]
    h = max(t.shape[0] for row in tiles for t in row)
    w = max(t.shape[1] for row in tiles for t in row)
    canvas = np.full((head + len(tiles) * (h + gap), len(labels) * (w + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, t in enumerate(row):
            y, x = head + i * (h + gap), j * (w + gap)
            canvas[y:y + t.shape[0], x:x + t.shape[1]] = t
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for j, label in enumerate(labels):
        draw.text((j * (w + gap) + 2, 2), label, fill=(0, 0, 0))
    save_image(img, path, overwrite=overwrite)


if __name__ == "__main__":
    sys.exit(main())
