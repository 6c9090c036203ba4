"""``m2ae-deblur IN... -o OUT``: deblur image files or folders from the command line.

Exit codes: 0 all inputs written; 1 some inputs failed (each reported when it fails and named again in the
closing summary; the rest are still written); 2 a usage error, a model that cannot be loaded or an output folder
that cannot be written (checked before any image runs); 130 interrupted. Errors are one line, never a traceback
(file names with control characters are shown escaped), and every output is written atomically
(:mod:`m2ae_infer.atomic`), so a failure or Ctrl-C leaves no partial file.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .cliutil import OneLineArgumentParser, check_device, cli_main, cli_message, device_arg, progress_stream, say
from .formats import writable_suffixes
from .jobs import (SHOWN, check_tiling, collect_inputs, describe, file_id, mask_path, plan_outputs,
                   prepare_folders, run_setup)
from .messages import one_line, shown
from .shipped import DETECTOR_SIDE, EXAMPLE_PHOTO

PROG = "m2ae-deblur"
EXAMPLE_OUTPUT = "m2ae_out"      # -o default with --example


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog=PROG, description=(
        "Deblur locally motion-blurred photos, computing only the pixels the blur mask selects."))
    p.add_argument("inputs", nargs="*", metavar="IN", help="image files or folders (folders: their images, sorted)")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="output folder, or a file name for a single input (a trailing / makes it a folder); "
                        f"writes {' '.join(writable_suffixes())}")
    p.add_argument("--example", action="store_true",
                   help="also deblur the example photo shipped with the package, written as "
                        f"example_deblurred.png (default -o: {EXAMPLE_OUTPUT})")
    p.add_argument("--checkpoint", metavar="CKPT", help="checkpoint (.pth/.safetensors); default: the shipped one")
    p.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--execution", default="auto", choices=("auto", "sparse", "dense"),
                   help="sparse: masked pixels only; dense: everything; auto: by mask density (default)")
    p.add_argument("--threshold", type=float, default=None,
                   help="blur probability threshold (default: the checkpoint's recommended one, else 0.5)")
    p.add_argument("--dilation", type=int, default=0, help="grow the mask by N working pixels (default 0)")
    p.add_argument("--full", action="store_true", help="restore every pixel (globally blurred photos)")
    p.add_argument("--tile", default="auto", type=_tile_size, metavar="N",
                   help="run in N x N tiles (same result, bounded memory); 0: never; default auto: "
                        "images above 2.5 MP in 1024-pixel tiles")
    p.add_argument("--tile-overlap", type=int, metavar="N",
                   help="context pixels around each tile (default and minimum: the network's receptive field)")
    p.add_argument("--detector-side", type=int, default=DETECTOR_SIDE, metavar="N",
                   help="the blur detector sees larger photos averaged down to at most N pixels on the long side "
                        f"(default {DETECTOR_SIDE}, its training scale); 0: at full size")
    p.add_argument("--save-mask", action="store_true", help="also write NAME_mask.png beside each output")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs (never an input)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-file lines and no progress bar")
    ray = p.add_argument_group("Ray (pip install 'm2ae-infer[ray]'; docs/ray.md)")
    ray.add_argument("--ray", nargs="?", const="default", metavar="ADDRESS",
                     help="run on a Ray cluster: HOST:PORT or ray://HOST:PORT, auto (the running one), local (a new "
                          "one on this machine); alone: RAY_ADDRESS, else a running one, else a new one. Complete "
                          "outputs that exist are skipped, so running the same command again resumes")
    ray.add_argument("--workers", type=int, metavar="N",
                     help="with --ray: deblurring workers (default: as many as the cluster's CPUs or GPUs hold)")
    ray.add_argument("--threads-per-worker", type=int, default=1, metavar="N",
                     help="with --ray: torch threads (Ray CPUs) per worker (default 1)")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="F",
                     help="with --ray: GPUs per worker (fractions share one); workers then run on CUDA")
    return p


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


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:   # usage errors (and --help) exit through argparse; main returns the code instead
        args = parser.parse_args(argv)
        if args.example:
            args.inputs = [str(EXAMPLE_PHOTO), *args.inputs]
            args.output = args.output or EXAMPLE_OUTPUT
        if not args.inputs:
            parser.error("give at least one input image or folder (or --example)")
        if not args.output:
            parser.error("give an output with -o OUT")
        if args.ray is None and (args.workers, args.threads_per_worker, args.gpus_per_worker) != (None, 1, 0.0):
            parser.error("--workers, --threads-per-worker and --gpus-per-worker need --ray")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if args.ray is not None:
        from .distributed import cli_run   # imports Ray only when the job runs
        return cli_run(args)

    files, problems = collect_inputs(args.inputs)

    def setup():
        outputs = plan_outputs(files, args.output, args.example, args.save_mask)
        check_device(args.device)
        from .api import Deblurrer   # after argument checks: importing torch takes a second
        # The API's argument errors name its parameters; cli_message words them as the flags.
        deblurrer = Deblurrer(args.checkpoint, device=args.device, execution=args.execution,
                              threshold=args.threshold, dilation=args.dilation, tile=args.tile,
                              tile_overlap=args.tile_overlap, detector_side=args.detector_side)
        check_tiling(deblurrer, args)
        prepare_folders(outputs.values())
        return outputs, deblurrer
    ready = run_setup(PROG, setup, problems)
    if ready is None:
        return 2
    outputs, deblurrer = ready

    inputs = {file_id(f) for f in files} - {None}
    failed = [p.split(": ", 1)[0] for p in problems]   # already shown escaped
    written = 0
    bar = None if args.quiet or len(outputs) < 2 else _progress(len(outputs))
    try:
        for source, target in outputs.items():
            try:
                _deblur_one(deblurrer, source, target, args, inputs)
                written += 1
            except (ValueError, OSError, RuntimeError, MemoryError) as exc:   # ImageError is a ValueError
                # RuntimeError/MemoryError: torch ran out of memory or failed on this image; the batch goes on
                failed.append(shown(source))
                say(f"{PROG}: failed {shown(source)}: {cli_message(exc)}", sys.stderr)
            if bar is not None:
                bar.update()
    except KeyboardInterrupt:   # atomic writes: nothing half-written, whatever was running
        if bar is not None:
            bar.close()
        say(f"{PROG}: interrupted; {written} written, {len(failed)} failed, "
            f"{len(outputs) - written - len(failed) + len(problems)} not run", sys.stderr)
        return 130
    if bar is not None:
        bar.close()
    if failed:
        names = ", ".join(failed[:SHOWN]) + (f", ... {len(failed) - SHOWN} more" if len(failed) > SHOWN else "")
        say(f"{PROG}: {written} written, {len(failed)} failed: {names}", sys.stderr)
        return 1
    return 0


def _deblur_one(deblurrer, source: Path, target: Path, args, inputs: set) -> None:
    from .imgio import ImageWarning
    from .imgsave import mask_to_image, save_images

    mask_target = mask_path(target)
    for path in (target, mask_target) if args.save_mask else (target,):
        if file_id(path) in inputs:   # the same file as an input (also through links), whatever --force says
            what = "the input itself" if os.path.samefile(source, path) else "one of the inputs"
            raise ValueError(f"output {shown(path)} is {what}; choose another output")
        if path.is_dir():
            raise ValueError(f"output {shown(path)} is a folder; move it or choose another output")
        if os.path.lexists(path) and not args.force:   # lexists: a dangling symlink is an existing name too
            raise ValueError(f"{shown(path)} exists; pass --force to overwrite it")
    # Warnings (the image's frames or depth, EXIF a format cannot hold) are one line each, not Python's two lines,
    # printed also when the image then fails.
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ImageWarning)
            restored, info = deblurrer.run(source, mask="full" if args.full else None, return_info=True)
            items = [(restored, target)]
            if args.save_mask:
                import torch
                items.append((mask_to_image(torch.from_numpy(info.mask)), mask_target))
            # Both files are checked and encoded before either is published: a failure leaves the user's files as
            # they were (an image without its mask would be a half-done pair).
            save_images(items, overwrite=args.force)
    finally:
        for w in caught:
            if issubclass(w.category, ImageWarning):
                say(f"{PROG}: warning: {one_line(w.message)}", sys.stderr)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not args.quiet:
        say(f"{shown(source)} -> {shown(target)}: {describe(info)}")


def _progress(total: int):
    from tqdm import tqdm
    return tqdm(total=total, unit="img", file=progress_stream(), dynamic_ncols=True)


if __name__ == "__main__":
    sys.exit(main())
