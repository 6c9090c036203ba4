"""Mask-only variant table on the corpus *dev* split: flagged fraction on sharp photos and mask IoU on local
blur, per threshold, for one or more checkpoints (how network v2 and its threshold were chosen; docs/model_card.md).

Only the mask head runs (dense), so a checkpoint is scored in about a minute on 2 CPU cores::

    python -m m2ae_infer.benchmarks.mask_table CORPUS CKPT [CKPT ...] [--video VIDEO] [--out table.json]

Sets (never the held-out split): every dev photo whole (sharp: any flagged pixel is harm), 60 samples of the
training generator on dev photos (:func:`m2ae_infer.data.scenes.scene_set`, the local ones), 40 of the
independent generator (:mod:`m2ae_infer.data.independent`), and 8 windows of a static-camera video.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from ..atomic import write_json

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)
DEV_SEED, INDEPENDENT_SEED = 4242, 4343


def _probabilities(net, image: np.ndarray) -> torch.Tensor:
    from ..model.mask import pad_to_even
    x = pad_to_even(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float())
    with torch.no_grad():
        return torch.sigmoid(net.mask_logits(x, net.stem_features(x)))[0, 0]


def mask_scores(net, samples) -> dict:
    """Pooled IoU / precision / recall of the working mask per threshold."""
    from ..model.mask import working_mask
    inter, union, pred = ({t: 0 for t in THRESHOLDS} for _ in range(3))
    true = 0
    for s in samples:
        p = _probabilities(net, s.blurry)
        target = working_mask(torch.from_numpy(s.mask)[None, None])[0, 0]
        true += int(target.sum())
        for t in THRESHOLDS:
            m = p > t
            inter[t] += int((m & target).sum())
            union[t] += int((m | target).sum())
            pred[t] += int(m.sum())
    return {t: {"iou": inter[t] / max(union[t], 1), "precision": inter[t] / max(pred[t], 1),
                "recall": inter[t] / max(true, 1)} for t in THRESHOLDS}


def table(checkpoint: str, corpus_dir: str, video: str | None) -> dict:
    from ..checkpoint import load_checkpoint
    from ..data import corpus
    from ..data.independent import independent_set
    from ..data.scenes import scene_set
    net = load_checkpoint(checkpoint).eval()
    dev = [corpus.load_rgb(p) for p in corpus.photos(corpus_dir, "dev")]
    cutouts = [corpus.load_rgba(p) for p in corpus.photos(corpus_dir, "dev", kind="cutout")]
    flagged = {t: [] for t in THRESHOLDS}
    for photo in dev:
        p = _probabilities(net, photo)
        for t in THRESHOLDS:
            flagged[t].append(float((p > t).float().mean()))
    report = {"checkpoint": checkpoint, "dev_photos": len(dev),
              "sharp_flagged_mean": {t: float(np.mean(v)) for t, v in flagged.items()},
              "sharp_flagged_max": {t: float(np.max(v)) for t, v in flagged.items()},
              "scenes_local": mask_scores(net, [s for s in scene_set(dev, 60, DEV_SEED, 256, cutouts)
                                                if s.kind == "local"]),
              "independent_local": mask_scores(net, [s for s in independent_set(dev, 40, INDEPENDENT_SEED, 256)
                                                     if s.kind == "local"])}
    if video:
        from ..data.video import TRAIN_FRAMES, clip_set   # the frames m2ae-train --video never sees
        report["video"] = mask_scores(net, [s for s in clip_set(video, 8, 3, 0, frames=(TRAIN_FRAMES, None))
                                            if s.mask.any()])
    return report


def format_rows(report: dict) -> list[str]:
    rows = []
    for t in THRESHOLDS:
        cells = [f"{report['sharp_flagged_mean'][t]:.3f}", f"{report['sharp_flagged_max'][t]:.3f}"]
        for key in ("scenes_local", "independent_local", "video"):
            if key in report:
                s = report[key][t]
                cells.append(f"{s['iou']:.3f} ({s['precision']:.2f}/{s['recall']:.2f})")
        rows.append(f"| {report['checkpoint']} | {t} | " + " | ".join(cells) + " |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m m2ae_infer.benchmarks.mask_table", description=__doc__.split("\n")[0])
    p.add_argument("corpus", help="corpus folder (m2ae-data fetch DIR); its dev split is scored")
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--video", help="a static-camera dev video (e.g. DIR/videos/opencv-doc/vtest.avi), scored on its "
                   "frames from video.TRAIN_FRAMES on (those before it may train: m2ae-train --video)")
    p.add_argument("--out", help="write the reports as JSON")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    reports = [table(c, args.corpus, args.video) for c in args.checkpoints]
    print("| checkpoint | threshold | sharp flagged mean | max | scenes IoU (P/R) | independent IoU (P/R)"
          + (" | video IoU (P/R) |" if args.video else " |"))
    for r in reports:
        print("\n".join(format_rows(r)))
    if args.out:
        write_json(args.out, reports)
    return 0


if __name__ == "__main__":
    sys.exit(main())
