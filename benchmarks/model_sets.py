"""Every ``m2ae-eval`` set for one or more checkpoints, as one table: how a checkpoint is chosen (``--split dev``)
and reported (``--split heldout``) in docs/model_card.md.

``python -m m2ae_infer.benchmarks.model_sets --split dev --corpus CORPUS CKPT...`` scores on the corpus's dev
photos and its dev video (opencv-doc's vtest.avi); ``--split heldout --heldout HELDOUT CKPT...`` on the held-out
photos and video (``m2ae-data fetch HELDOUT --heldout``), never to be tuned on. Each cell runs ``m2ae-eval`` in its
own process (``--threads 1`` by default, so two cells can share a 2-core machine); the eval.json files are kept
under ``--out`` and the table is printed and written as ``table.md`` there.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ..cliutil import OneLineArgumentParser, cli_main, path_arg, say


def eval_sets(split: str, corpus: Path | None, heldout: Path | None) -> dict[str, list[str]]:
    """``{set name: m2ae-eval arguments}`` of a split."""
    if split == "dev":
        return {"sharp": ["--set", "sharp", "--photos-dir", str(corpus), "--split", "dev"],
                "independent": ["--set", "independent", "--photos-dir", str(corpus), "--split", "dev",
                                "--samples", "40"],
                "video": ["--set", "video", "--video", str(corpus / "videos/opencv-doc/vtest.avi"),
                          "--frames", "400:", "--samples", "8"]}   # frames before 400 may train (m2ae-train --video)
    return {"synthetic": ["--set", "synthetic", "--samples", "40"],
            "independent": ["--set", "independent", "--photos-dir", str(heldout), "--split", "heldout",
                            "--samples", "40"],
            "independent-skimage": ["--set", "independent", "--samples", "30"],
            "sharp": ["--set", "sharp", "--photos-dir", str(heldout), "--split", "heldout"],
            "video": ["--set", "video", "--video", str(heldout / "videos/mvtb-data/traffic_sequence.mp4"),
                      "--samples", "8"]}


def row(set_name: str, checkpoint: str, report: dict) -> dict:
    """The figures of one eval.json that the model card's tables use."""
    rows, mask, harm = report["rows"], report["mask"], report["do_no_harm"]
    get = lambda name, key: rows.get(name, {}).get("all", {}).get(key)  # noqa: E731
    sharp = harm["sharp_samples"]
    return {"set": set_name, "checkpoint": checkpoint,
            "psnr_input": get("blurry", "psnr"), "psnr_ours": get("ours_sparse", "psnr"),
            "psnr_true_mask": get("ours_true_mask", "psnr"),
            "mask_psnr_input": get("blurry", "psnr_mask"), "mask_psnr_ours": get("ours_sparse", "psnr_mask"),
            "mask_psnr_true_mask": get("ours_true_mask", "psnr_mask"),
            "iou": mask["pooled"]["iou"], "precision": mask["pooled"]["precision"],
            "recall": mask["pooled"]["recall"], "active": mask["mean_active_fraction"],
            "below_input": harm["output_below_input"]["ours_sparse"], "n": rows["blurry"]["all"]["n"],
            "sharp_flagged": sharp["mean_flagged_fraction"] if sharp["n"] else None,
            "sharp_worst_db": sharp["worst_psnr_vs_input"], "sharp_below_40": sharp["below_40db"] if sharp["n"] else None,
            "exact": report["contracts"]["pass"]}


def markdown(rows: list[dict]) -> str:
    f = lambda v, p=2: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = ["| set | checkpoint | PSNR input → ours (true mask) | in mask: input → ours (true mask) | IoU (P / R) "
             "| active | below input | sharp: flagged, worst, < 40 dB | exact |", "|" + "---|" * 9]
    for r in rows:
        sharp = ("–" if r["sharp_flagged"] is None else
                 f"{r['sharp_flagged']:.1%}, {f(r['sharp_worst_db'], 1)} dB, {r['sharp_below_40']}/{r['n']}")
        lines.append(f"| {r['set']} | {r['checkpoint']} | {f(r['psnr_input'])} → {f(r['psnr_ours'])} "
                     f"({f(r['psnr_true_mask'])}) | {f(r['mask_psnr_input'])} → {f(r['mask_psnr_ours'])} "
                     f"({f(r['mask_psnr_true_mask'])}) | {f(r['iou'], 3)} ({f(r['precision'])} / {f(r['recall'])}) "
                     f"| {r['active']:.1%} | {r['below_input']}/{r['n']} | {sharp} | {'yes' if r['exact'] else 'NO'} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="python -m m2ae_infer.benchmarks.model_sets", description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", type=path_arg)
    p.add_argument("--split", choices=("dev", "heldout"), required=True)
    p.add_argument("--corpus", type=Path, help="the training corpus (m2ae-data fetch DIR), for --split dev")
    p.add_argument("--heldout", type=Path, help="the held-out corpus (m2ae-data fetch DIR --heldout)")
    p.add_argument("--sets", help="comma-separated subset of the split's sets (default: all)")
    p.add_argument("--out", type=Path, default=Path("m2ae_model_sets"), help="folder for the eval.json files")
    p.add_argument("--threads", type=int, default=1, help="torch threads per m2ae-eval (default 1)")
    return p


@cli_main("model_sets", usage=(ValueError,))
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = args.corpus if args.split == "dev" else args.heldout
    if root is None or not (root / "manifest.json").is_file():
        raise ValueError(f"--split {args.split} needs --{'corpus' if args.split == 'dev' else 'heldout'} DIR "
                         "holding a manifest.json (m2ae-data fetch)")
    sets = eval_sets(args.split, args.corpus, args.heldout)
    chosen = [s.strip() for s in args.sets.split(",")] if args.sets else list(sets)
    if unknown := [s for s in chosen if s not in sets]:
        raise ValueError(f"--sets {','.join(unknown)}: the {args.split} split has {', '.join(sets)}")
    rows = []
    for checkpoint in args.checkpoints:
        for name in chosen:
            out = args.out / f"{Path(checkpoint).stem}-{name}"
            if not (out / "eval.json").is_file():   # finished cells are kept: a re-run resumes
                cmd = ["m2ae-eval", "--checkpoint", str(checkpoint), *sets[name], "--out", str(out),
                       "--threads", str(args.threads), "-q"]
                say(" ".join(cmd))
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            rows.append(row(name, Path(checkpoint).stem, json.loads((out / "eval.json").read_text())))
    table = markdown(rows)
    (args.out / "table.md").write_text(table + "\n")
    say(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
