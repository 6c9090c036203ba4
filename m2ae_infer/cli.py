"""``m2ae-deblur IN... -o OUT``: deblur image files or folders from the command line.

Exit codes: 0 all inputs written; 1 some inputs failed (each reported, the rest still written);
2 a usage error or a model that cannot be loaded. User errors are one line, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .imgio import ImageError, mask_to_image, save_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
EXAMPLE_PHOTO = Path(__file__).parent / "assets" / "example_blurry.png"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m2ae-deblur", description=(
        "Deblur locally motion-blurred photos, computing only the pixels the blur mask selects."))
    p.add_argument("inputs", nargs="*", metavar="IN", help="image files or folders (folders: their images, sorted)")
    p.add_argument("-o", "--output", metavar="OUT", help="output folder, or a file name for a single input")
    p.add_argument("--example", action="store_true", help="deblur the example photo shipped with the package")
    p.add_argument("--checkpoint", metavar="CKPT", help="checkpoint (.pth/.safetensors); default: the shipped one")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    p.add_argument("--execution", default="auto", choices=("auto", "sparse", "dense"),
                   help="sparse: masked pixels only; dense: everything; auto: by mask density (default)")
    p.add_argument("--threshold", type=float, default=0.5, help="blur probability threshold (default 0.5)")
    p.add_argument("--dilation", type=int, default=0, help="grow the mask by N working pixels (default 0)")
    p.add_argument("--full", action="store_true", help="restore every pixel (globally blurred photos)")
    p.add_argument("--tile", default="auto", type=_tile_size, metavar="N",
                   help="run in N x N tiles (same result, bounded memory); 0: never; default auto: "
                        "images above 2.5 MP in 1024-pixel tiles")
    p.add_argument("--tile-overlap", type=int, metavar="N",
                   help="context pixels around each tile (default and minimum: the network's receptive field)")
    p.add_argument("--save-mask", action="store_true", help="also write NAME_mask.png beside each output")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs (never an input)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-file lines and no progress bar")
    return p


def collect_inputs(items: list[str]) -> tuple[list[Path], list[str]]:
    """Expand folders into their image files; returns (files, problems)."""
    files, problems = [], []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{item}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            problems.append(f"{item}: no such file or folder")
    return files, problems


def plan_outputs(files: list[Path], output: str, example: bool) -> dict[Path, Path]:
    """Map each input to its output path. A single input with an image suffix on OUT writes that file."""
    out = Path(output)
    if len(files) == 1 and out.suffix.lower() in IMAGE_SUFFIXES and not out.is_dir():
        return {files[0]: out}
    if out.exists() and not out.is_dir():
        raise ValueError(f"{output}: exists and is not a folder; give a folder for several inputs")
    names: dict[Path, Path] = {}
    for f in files:
        name = "example_deblurred.png" if example else f.name
        target = out / name
        if target in names.values():
            raise ValueError(f"two inputs would both write {target}; give them different names or run them apart")
        names[f] = target
    return names


def describe(info) -> str:
    """One line on what ran: the mask share, the FLOPs executed vs dense, the time (and the tiles)."""
    if info.execution == "dense":   # every pixel computed, then gated by the mask
        work = (f"mask {info.active_fraction:.1%} of pixels, computed densely: {info.flops_executed / 1e9:.2f} "
                f"GFLOP ({info.flops_saved:.1%} saved)")
    else:   # sparse, or tiles that chose differently ("mixed"), or nothing to restore ("none")
        work = (f"computed {info.active_fraction:.1%} of pixels, {info.flops_executed / 1e9:.2f} of "
                f"{info.flops_dense / 1e9:.2f} GFLOP ({info.flops_saved:.1%} saved)")
    tiles = f", {info.tiles} tiles" if getattr(info, "tiles", 1) > 1 else ""
    return f"{work}, {info.seconds:.2f} s [{info.execution}{tiles}]"


def _tile_size(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a tile size in pixels (0: never tile), got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"tile size must be >= 0, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.example:
        args.inputs = [str(EXAMPLE_PHOTO), *args.inputs]
        args.output = args.output or "m2ae_out"
    if not args.inputs:
        parser.error("give at least one input image or folder (or --example)")
    if not args.output:
        parser.error("give an output with -o OUT")

    files, problems = collect_inputs(args.inputs)
    try:
        outputs = plan_outputs(files, args.output, args.example)
        from .api import Deblurrer   # after argument checks: importing torch takes a second
        deblurrer = Deblurrer(args.checkpoint, device=args.device, execution=args.execution,
                              threshold=args.threshold, dilation=args.dilation, tile=args.tile,
                              tile_overlap=args.tile_overlap)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"m2ae-deblur: error: {exc}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"m2ae-deblur: skipped {p}", file=sys.stderr)

    failures = list(problems)
    bar = None if args.quiet or len(outputs) < 2 else _progress(len(outputs))
    for source, target in outputs.items():
        try:
            _deblur_one(deblurrer, source, target, args)
        except (ImageError, ValueError, OSError) as exc:
            failures.append(f"{source}: {exc}")
            print(f"m2ae-deblur: failed {source}: {exc}", file=sys.stderr)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    if failures:
        print(f"m2ae-deblur: {len(outputs) + len(problems) - len(failures)} written, {len(failures)} failed",
              file=sys.stderr)
        return 1
    return 0


def _deblur_one(deblurrer, source: Path, target: Path, args) -> None:
    if target.exists() and os.path.samefile(source, target):
        raise ValueError(f"output {target} is the input itself; choose another output")
    if target.exists() and not args.force:
        raise ValueError(f"{target} exists; pass --force to overwrite it")
    mask_target = target.with_name(target.stem + "_mask.png")
    if args.save_mask and mask_target.exists() and not args.force:
        raise ValueError(f"{mask_target} exists; pass --force to overwrite it")
    restored, info = deblurrer.run(source, mask="full" if args.full else None, return_info=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_image(restored, target, overwrite=args.force)
    if args.save_mask:
        import torch
        save_image(mask_to_image(torch.from_numpy(info.mask)), mask_target, overwrite=args.force)
    if not args.quiet:
        _write_line(f"{source} -> {target}: {describe(info)}")


def _progress(total: int):
    from tqdm import tqdm
    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)


def _write_line(text: str) -> None:
    from tqdm import tqdm
    tqdm.write(text)   # keeps the progress bar intact below the line


if __name__ == "__main__":
    sys.exit(main())
