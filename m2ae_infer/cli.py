"""``m2ae-deblur IN... -o OUT``: deblur image files or folders from the command line.

Exit codes: 0 all inputs written; 1 some inputs failed (each reported when it fails and named again in the
closing summary; the rest are still written); 2 a usage error, a model that cannot be loaded or an output folder
that cannot be written (checked before any image runs); 130 interrupted. Errors are one line, never a traceback,
and every output is written atomically (:mod:`m2ae_infer.atomic`), so a failure or Ctrl-C leaves no partial file.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

from .atomic import TEMP_PREFIX
from .checkpoint import CheckpointError
from .imgio import ImageError, ImageWarning, mask_to_image, save_image
from .messages import one_line

PROG = "m2ae-deblur"
SHOWN = 10  # failed files named in the closing summary line
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
EXAMPLE_PHOTO = Path(__file__).parent / "assets" / "example_blurry.png"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit code 2), like every other error of this tool."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=(
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
    """Expand folders into their image files (not recursive); returns (files, problems).

    A folder's image-named entries that cannot be read as files (broken symlinks, symlink loops) are
    problems, not silently dropped; other files in a folder are ignored.
    """
    files, problems = [], []
    for item in items:
        path = Path(item)
        if path.is_dir():
            try:
                entries = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            except OSError as exc:
                problems.append(f"{item}: cannot list the folder ({one_line(exc.strerror or exc)})")
                continue
            found = [p for p in entries if p.is_file()]
            problems.extend(f"{p}: broken symlink or symlink loop" for p in entries
                            if p.is_symlink() and not p.exists())
            if not found:
                problems.append(f"{item}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif path.exists():
            files.append(path)
        elif path.is_symlink():
            problems.append(f"{item}: broken symlink or symlink loop")
        else:
            problems.append(f"{item}: no such file or folder")
    return files, problems


def plan_outputs(files: list[Path], output: str, example: bool, masks: bool = False) -> dict[Path, Path]:
    """Map each input to its output path. A single input with an image suffix on OUT writes that file."""
    out = Path(output)
    if len(files) == 1 and out.suffix.lower() in IMAGE_SUFFIXES and not out.is_dir():
        return {files[0]: out}
    if out.exists() and not out.is_dir():
        raise ValueError(f"{output}: exists and is not a folder; give a folder for several inputs")
    names: dict[Path, Path] = {}
    taken: set[Path] = set()
    for f in files:
        name = "example_deblurred.png" if example else f.name
        target = out / name
        written = {target, mask_path(target)} if masks else {target}
        if written & taken:
            raise ValueError(f"two inputs would both write {sorted(written & taken)[0]}; "
                             "give them different names or run them apart")
        taken |= written
        names[f] = target
    return names


def mask_path(target: Path) -> Path:
    """Where ``--save-mask`` writes the mask of the output ``target``."""
    return target.with_name(target.stem + "_mask.png")


def prepare_folders(targets) -> None:
    """Create the output folders and check that files can be created there (before any image is run:
    a batch must not compute for an hour and then fail to write). Raises ValueError, one line."""
    for folder in sorted({Path(t).parent for t in targets}):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX + "probe-", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ValueError(f"cannot write to output folder {folder} ({one_line(exc.strerror or exc)}); "
                             "choose a writable folder with -o") from None


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
    try:   # usage errors (and --help) exit through argparse; main returns the code instead
        args = parser.parse_args(argv)
        if args.example:
            args.inputs = [str(EXAMPLE_PHOTO), *args.inputs]
            args.output = args.output or "m2ae_out"
        if not args.inputs:
            parser.error("give at least one input image or folder (or --example)")
        if not args.output:
            parser.error("give an output with -o OUT")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2

    files, problems = collect_inputs(args.inputs)
    try:
        outputs = plan_outputs(files, args.output, args.example, args.save_mask)
        from .api import Deblurrer   # after argument checks: importing torch takes a second
        deblurrer = Deblurrer(args.checkpoint, device=args.device, execution=args.execution,
                              threshold=args.threshold, dilation=args.dilation, tile=args.tile,
                              tile_overlap=args.tile_overlap)
        prepare_folders(outputs.values())
    except (ValueError, OSError, RuntimeError, CheckpointError) as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    for p in problems:
        print(f"{PROG}: skipped {p}", file=sys.stderr)

    inputs = {_file_id(f) for f in files} - {None}
    failed = [p.split(": ", 1)[0] for p in problems]
    written = 0
    bar = None if args.quiet or len(outputs) < 2 else _progress(len(outputs))
    try:
        for source, target in outputs.items():
            try:
                _deblur_one(deblurrer, source, target, args, inputs)
                written += 1
            except (ImageError, ValueError, OSError, RuntimeError, MemoryError) as exc:
                # RuntimeError/MemoryError: torch ran out of memory or failed on this image; the batch goes on
                failed.append(str(source))
                print(f"{PROG}: failed {source}: {one_line(exc)}", file=sys.stderr)
            if bar is not None:
                bar.update()
    except KeyboardInterrupt:   # atomic writes: nothing half-written, whatever was running
        if bar is not None:
            bar.close()
        print(f"{PROG}: interrupted; {written} written, {len(failed)} failed, "
              f"{len(outputs) - written - len(failed) + len(problems)} not run", file=sys.stderr)
        return 130
    if bar is not None:
        bar.close()
    if failed:
        shown = ", ".join(failed[:SHOWN]) + (f", ... {len(failed) - SHOWN} more" if len(failed) > SHOWN else "")
        print(f"{PROG}: {written} written, {len(failed)} failed: {shown}", file=sys.stderr)
        return 1
    return 0


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _deblur_one(deblurrer, source: Path, target: Path, args, inputs: set) -> None:
    mask_target = mask_path(target)
    for path in (target, mask_target) if args.save_mask else (target,):
        if _file_id(path) in inputs:   # the same file as an input (also through links), whatever --force says
            what = "the input itself" if os.path.samefile(source, path) else "one of the inputs"
            raise ValueError(f"output {path} is {what}; choose another output")
        if path.exists() and not args.force:
            raise ValueError(f"{path} exists; pass --force to overwrite it")
    with warnings.catch_warnings(record=True) as caught:   # one line each, not Python's two-line warning
        warnings.simplefilter("always", ImageWarning)
        restored, info = deblurrer.run(source, mask="full" if args.full else None, return_info=True)
    for w in caught:
        if issubclass(w.category, ImageWarning):
            _write_line(f"{PROG}: warning: {one_line(w.message)}", sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    save_image(restored, target, overwrite=args.force)
    if args.save_mask:
        import torch
        try:
            save_image(mask_to_image(torch.from_numpy(info.mask)), mask_target, overwrite=args.force)
        except BaseException:
            target.unlink(missing_ok=True)   # an image without its mask would be a half-done pair
            raise
    if not args.quiet:
        _write_line(f"{source} -> {target}: {describe(info)}")


def _progress(total: int):
    from tqdm import tqdm
    return tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)


def _write_line(text: str, file=None) -> None:
    from tqdm import tqdm
    tqdm.write(text, file=file)   # keeps the progress bar intact below the line


if __name__ == "__main__":
    sys.exit(main())
