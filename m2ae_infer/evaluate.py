"""``m2ae-eval``: held-out quality and exactness: blurry input vs our model vs a classical oracle.

Rows: ``blurry`` (the input), ``ours_dense`` / ``ours_sparse`` (public ``Deblurrer.run``, *predicted* mask),
``ours_true_mask`` (the same network given the TRUE mask: what the body does when the mask head is perfect, so
the two sources of error can be told apart), ``classical`` (Richardson-Lucy given the TRUE kernel and TRUE mask:
an oracle reference). Exit codes: 0 done;
1 an exactness contract failed (sparse != dense, or a pixel outside the mask changed); 2 usage error, bad
checkpoint or missing scikit-image.

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

import numpy as np

from .atomic import atomic_write, prepare_folder
from .cliutil import OneLineArgumentParser, check_device, device_arg, path_arg, progress_stream, say
from .messages import one_line

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


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="m2ae-eval", description=(
        "Held-out evaluation: blurry input vs our model (dense and sparse with the predicted mask; sparse with the true "
        "mask) vs Richardson-Lucy with the true kernel."))
    p.add_argument("--checkpoint", metavar="CKPT", help="checkpoint (.pth/.safetensors); default: the shipped one")
    p.add_argument("--samples", type=int, default=40, help="held-out samples (default 40)")
    p.add_argument("--crop", type=int, default=256, help="sample size in pixels (default 256)")
    p.add_argument("--seed", type=int, help="sample seed (default 1234 for heldout, 4242 for validation)")
    p.add_argument("--split", choices=("heldout", "validation"), default="heldout",
                   help="heldout: the held-out photos (report these); validation: new samples on the training "
                        "photos, for choosing settings such as --threshold (default heldout)")
    p.add_argument("--photos", metavar="A,B", help="with --split validation: only these training photos, e.g. the "
                                                  "dev photos a run was trained without (m2ae-train --exclude-photos)")
    p.add_argument("--out", metavar="DIR", default="m2ae_eval", type=path_arg,
                   help="output folder for eval.json and eval_grid.png (default m2ae_eval)")
    p.add_argument("--force", action="store_true", help="replace eval.json and eval_grid.png already in --out")
    p.add_argument("--threshold", type=float, default=0.5, help="blur probability threshold (default 0.5)")
    p.add_argument("--dilation", type=int, default=0, help="grow the mask by N working pixels (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's choice)")
    p.add_argument("--device", default="auto", type=device_arg,
                   help="auto | cpu | cuda | cuda:N (default auto, as Deblurrer)")
    p.add_argument("--rl-iterations", type=int, default=30, help="Richardson-Lucy iterations (default 30)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def _error(message: str) -> int:
    say(f"m2ae-eval: error: {one_line(message)}", sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = 1234 if args.split == "heldout" else 4242
    for flag, value, low, high in (("--samples", args.samples, 1, 100_000), ("--crop", args.crop, 16, MAX_CROP),
                                   ("--seed", args.seed, 0, 2**63 - 1), ("--threads", args.threads, 0, 1024),
                                   ("--rl-iterations", args.rl_iterations, 1, 10_000)):
        if not low <= value <= high:
            parser.error(f"{flag} must lie in {low}..{high}, got {value}"
                         + (" (larger crops than the photos would only mirror-pad them)" if flag == "--crop" else ""))
    if not 0.0 < args.threshold < 1.0:
        parser.error(f"--threshold must lie strictly between 0 and 1, got {args.threshold}")
    if args.dilation < 0:
        parser.error(f"--dilation must be >= 0, got {args.dilation}")
    if args.split == "validation" and args.seed < 1000:
        parser.error("--split validation needs --seed >= 1000 (training runs use small seeds)")
    if args.photos is not None and args.split != "validation":
        parser.error("--photos picks training photos: it needs --split validation")
    try:
        import scipy  # noqa: F401
        import skimage
    except ImportError:
        return _error(_INSTALL_HINT)
    import torch
    from .api import DEFAULT_CHECKPOINT, Deblurrer
    from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint
    from .data.synth import check_training_photos, heldout_set, photo_names, validation_set
    photos = None if args.photos is None else photo_names(args.photos)
    if photos == []:
        parser.error("--photos needs at least one photo name")
    try:
        check_training_photos(photos or (), "validation photos")
    except ValueError as exc:
        return _error(f"--photos: {exc}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        check_device(args.device)
    except ValueError as exc:
        return _error(exc)
    ckpt = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    try:
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} not found; pass --checkpoint PATH")
        net, meta = load_checkpoint(ckpt), read_checkpoint(ckpt).meta
        runners = {e: Deblurrer(net, device=args.device, execution=e, threshold=args.threshold,
                                dilation=args.dilation) for e in ("dense", "sparse")}
    except (CheckpointError, ValueError, OSError) as exc:
        return _error(exc)
    out_dir = Path(args.out)
    outputs = (out_dir / "eval.json", out_dir / "eval_grid.png")
    if out_dir.exists() and not out_dir.is_dir():
        return _error(f"--out {out_dir} is a file, not a folder; give a folder name")
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not args.force:
        return _error(f"{', '.join(existing)} already exist(s); pass --force to replace, or choose another --out")
    try:
        prepare_folder(out_dir)   # before the work, not after it
    except OSError as exc:
        return _error(f"cannot write to --out {out_dir} ({exc.strerror or exc}); choose a writable folder")
    if not args.quiet:
        on = f" on {', '.join(photos)}" if photos else ""
        say(f"m2ae-eval: generating {args.samples} {args.split} samples ({args.crop} px){on}", sys.stderr)
    samples = (heldout_set(args.samples, seed=args.seed, crop=args.crop) if args.split == "heldout" else
               validation_set(args.samples, seed=args.seed, crop=args.crop, photos=photos))
    for r in runners.values():   # warm-up: the first call pays for allocations, not the images
        r.run(samples[0].blurry)
    per_sample, grid = [], []
    from tqdm import tqdm
    for i, s in enumerate(tqdm(samples, unit="img", file=progress_stream(), disable=args.quiet, dynamic_ncols=True)):
        outs, infos = {"blurry": s.blurry}, {}
        for e, r in runners.items():
            outs[f"ours_{e}"], infos[e] = r.run(s.blurry, return_info=True)
        outs["ours_true_mask"], infos["true_mask"] = runners["sparse"].run(s.blurry, mask=s.mask, return_info=True)
        start = time.perf_counter()
        outs["classical"], how = classical_restore(s, args.rl_iterations)
        t_classical = time.perf_counter() - start
        pred = np.asarray(infos["sparse"].mask, bool)
        row = {"index": i, "kind": s.kind, "classical_psf": how, "regions": len(s.trajectories),
               "mask": mask_scores(pred, s.mask), "masks_agree": bool(np.array_equal(pred, infos["dense"].mask)),
               "active_fraction": infos["sparse"].active_fraction, "flops_saved": infos["sparse"].flops_saved,
               "seconds": {"ours_dense": infos["dense"].seconds, "ours_sparse": infos["sparse"].seconds,
                           "ours_true_mask": infos["true_mask"].seconds, "classical": t_classical},
               "sparse_dense_max_abs": float(np.abs(outs["ours_sparse"] - outs["ours_dense"]).max()),
               "changed_outside_mask": {e: _changed_outside(s.blurry, outs[f"ours_{e}"], np.asarray(infos[e].mask))
                                        for e in (*runners, "true_mask")}}
        for name, img in outs.items():
            row[name] = {"psnr": masked_psnr(img, s.sharp), "ssim": masked_ssim(img, s.sharp),
                         "psnr_mask": masked_psnr(img, s.sharp, s.mask), "ssim_mask": masked_ssim(img, s.sharp, s.mask)}
        per_sample.append(row)
        if len(grid) < 6:
            grid.append([s.blurry, np.repeat(pred[..., None], 3, 2), outs["ours_sparse"], outs["classical"], s.sharp])
    summary = summarize(per_sample)
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("checkpoint", "quiet")},
              "checkpoint": {"path": str(ckpt.resolve()), "meta": meta},
              "machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "scikit-image": skimage.__version__,
                          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "device": str(runners["sparse"].device)},
              **summary, "per_sample": per_sample}
    try:
        _write_json(report, outputs[0], overwrite=args.force)
        _write_grid(grid, outputs[1], overwrite=args.force)
    except (OSError, ValueError) as exc:
        return _error(exc)
    say(format_table(summary))
    say(f"wrote {out_dir / 'eval.json'} and {out_dir / 'eval_grid.png'}")
    return 0 if summary["contracts"]["pass"] else 1


def _changed_outside(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> int:
    """Pixels outside ``mask`` whose bytes differ in any channel (bit-identical passthrough check)."""
    diff = (np.ascontiguousarray(before).view(np.uint32) != np.ascontiguousarray(after).view(np.uint32)).any(-1)
    return int((diff & ~mask).sum())


def summarize(per_sample: list[dict]) -> dict:
    """Means per row (all samples and per kind), pooled mask scores, cost, exactness and the issue's targets."""
    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    groups = {"all": per_sample, **{k: [r for r in per_sample if r["kind"] == k]
                                    for k in ("local", "sharp", "global") if any(r["kind"] == k for r in per_sample)}}
    metrics = ("psnr", "ssim", "psnr_mask", "ssim_mask")
    rows = {name: {g: {"n": len(rs), **{m: mean(r[name][m] for r in rs) for m in metrics}} for g, rs in groups.items()}
            for name in ROWS}
    for name in ROWS[1:]:
        rows[name]["seconds_per_image"] = mean(r["seconds"][name] for r in per_sample)
    pooled = {k: sum(r["mask"][k] for r in per_sample) for k in ("inter", "union", "pred", "true")}
    mask = {"pooled": _ratios(pooled["inter"], pooled["union"], pooled["pred"], pooled["true"]),
            "per_sample_mean": {k: mean(r["mask"][k] for r in per_sample) for k in ("iou", "precision", "recall")},
            "mean_active_fraction": mean(r["active_fraction"] for r in per_sample),
            "mean_flops_saved": mean(r["flops_saved"] for r in per_sample)}
    exact = {"sparse_dense_max_abs": max(r["sparse_dense_max_abs"] for r in per_sample),
             "masks_agree": all(r["masks_agree"] for r in per_sample),
             "changed_outside_mask": sum(sum(r["changed_outside_mask"].values()) for r in per_sample)}
    exact["pass"] = (exact["sparse_dense_max_abs"] <= 1e-5 and exact["masks_agree"]
                     and exact["changed_outside_mask"] == 0)
    gain = None
    if rows["ours_sparse"]["all"]["psnr_mask"] is not None:
        gain = rows["ours_sparse"]["all"]["psnr_mask"] - rows["blurry"]["all"]["psnr_mask"]
    targets = {"mask_iou_ge_0.75": mask["pooled"]["iou"] >= 0.75, "psnr_mask_gain_db": gain,
               "psnr_mask_gain_ge_3db": gain is not None and gain >= 3.0,
               "outside_mask_bit_exact": exact["changed_outside_mask"] == 0}
    return {"rows": rows, "mask": mask, "contracts": exact, "targets": targets}


def format_table(summary: dict) -> str:
    fmt = lambda v, p=2: "    -" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [f"{'row':<14} {'PSNR':>7} {'SSIM':>6} {'PSNR@mask':>10} {'SSIM@mask':>10} {'s/img':>7}"]
    for name, r in summary["rows"].items():
        a = r["all"]
        lines.append(f"{name:<14} {fmt(a['psnr']):>7} {fmt(a['ssim'], 4):>6} {fmt(a['psnr_mask']):>10} "
                     f"{fmt(a['ssim_mask'], 4):>10} {fmt(r.get('seconds_per_image'), 3):>7}")
    m, c, t = summary["mask"], summary["contracts"], summary["targets"]
    lines += [f"mask (pooled): IoU {m['pooled']['iou']:.3f}  precision {m['pooled']['precision']:.3f}  "
              f"recall {m['pooled']['recall']:.3f}; active {m['mean_active_fraction']:.1%}, "
              f"FLOPs saved {m['mean_flops_saved']:.1%}",
              f"sparse vs dense max |diff| {c['sparse_dense_max_abs']:.2e}; pixels changed outside the mask "
              f"{c['changed_outside_mask']}; contracts {'PASS' if c['pass'] else 'FAIL'}",
              f"targets: IoU>=0.75 {'yes' if t['mask_iou_ge_0.75'] else 'no'}; PSNR@mask gain "
              f"{fmt(t['psnr_mask_gain_db'])} dB (>=3: {'yes' if t['psnr_mask_gain_ge_3db'] else 'no'})"]
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


def _write_grid(grid: list[list[np.ndarray]], path: Path, overwrite: bool = False) -> None:
    from PIL import Image, ImageDraw
    from .imgsave import save_image
    labels, gap, head = ("blurry", "predicted mask", "ours (sparse)", "classical (RL)", "sharp"), 4, 16
    h, w = grid[0][0].shape[:2]
    canvas = np.full((head + len(grid) * (h + gap), len(labels) * (w + gap) - gap, 3), 255, np.uint8)
    for i, tiles in enumerate(grid):
        for j, tile in enumerate(tiles):
            y, x = head + i * (h + gap), j * (w + gap)
            canvas[y:y + h, x:x + w] = np.clip(np.asarray(tile, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for j, label in enumerate(labels):
        draw.text((j * (w + gap) + 2, 2), label, fill=(0, 0, 0))
    save_image(img, path, overwrite=overwrite)


if __name__ == "__main__":
    sys.exit(main())
