"""A deblurring job of files, shared by ``m2ae-deblur`` and its ``--ray`` form (:mod:`m2ae_infer.distributed`):
which inputs, which outputs, the refusal rules checked before any work, and the one-line report of a run.

Nothing here runs the network or parses arguments: :mod:`m2ae_infer.cli` and the distributed job call these.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, TypeVar

from .cliutil import cli_message, say, writable_folder
from .formats import FORMATS, writable_suffixes
from .messages import one_line, shown
from .shipped import EXAMPLE_PHOTO

SHOWN = 10                       # failed files named in a closing summary line
IMAGE_SUFFIXES = set(FORMATS)    # read from folders; the writable ones are formats.writable_suffixes()
MIN_TILE_OVERLAPS = 2            # --tile must be at least this many overlaps (see check_tiling)


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
                problems.append(f"{shown(item)}: cannot list the folder ({one_line(exc.strerror or exc)})")
                continue
            found = [p for p in entries if p.is_file()]
            problems.extend(f"{shown(p)}: broken symlink or symlink loop" for p in entries
                            if p.is_symlink() and not p.exists())
            if not found:
                problems.append(f"{shown(item)}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.extend(found)
        elif path.exists():
            files.append(path)
        elif path.is_symlink():
            problems.append(f"{shown(item)}: broken symlink or symlink loop")
        else:
            problems.append(f"{shown(item)}: no such file or folder")
    return files, problems


def plan_outputs(files: list[Path], output: str, example: bool, masks: bool = False) -> dict[Path, Path]:
    """Map each input to its output path.

    OUT is a file when it has an image suffix (imgsave.FORMATS, or any other Pillow knows), does not end
    with a slash and is not an existing folder; there must then be one input and a suffix we write. Otherwise
    OUT is a folder: each input keeps its name, with ``.png`` for formats we do not write (GIF, ICO), and
    the ``--example`` photo is ``example_deblurred.png``.
    """
    out = Path(output)
    as_folder = output.endswith(("/", os.sep)) or out.is_dir()
    suffix = out.suffix.lower()
    if not as_folder and (suffix in FORMATS or suffix in _pillow_suffixes()):
        fmt = FORMATS.get(suffix)
        if fmt is None or fmt.refused:
            why = f": {fmt.refused}" if fmt else ""
            raise ValueError(f"{shown(output)}: cannot write {shown(suffix)} images{why}; use "
                             f"{', '.join(writable_suffixes())} (or end OUT with / for a folder)")
        if not files:   # every input failed already; they are reported, nothing to write
            return {}
        if len(files) != 1:
            raise ValueError(f"{shown(output)}: a file name takes one input, got {len(files)}; give a folder for "
                             "several inputs")
        return {files[0]: out}
    if out.exists() and not out.is_dir():
        raise ValueError(f"{shown(output)}: exists and is not a folder; give a folder for several inputs")
    names: dict[Path, Path] = {}
    taken: set[Path] = set()
    for f in files:
        if example and f == EXAMPLE_PHOTO:
            name = "example_deblurred.png"
        else:   # a format we read but do not write (GIF, ICO) comes out as PNG, as -o NAME.gif would tell
            fmt = FORMATS.get(f.suffix.lower())
            name = f.name if fmt is not None and fmt.refused is None else f.stem + ".png"
        target = out / name
        written = {target, mask_path(target)} if masks else {target}
        if written & taken:
            raise ValueError(f"two inputs would both write {shown(sorted(written & taken)[0])}; "
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
        writable_folder(folder, "output folder ", "choose a writable folder with -o")


def _pillow_suffixes() -> dict[str, str]:
    """Every file suffix Pillow knows (``.ppm``, ``.pcx``, ...): OUT with one of them means a file."""
    from PIL import Image
    return Image.registered_extensions()


def check_tiling(deblurrer, args) -> None:
    """--tile against the loaded network's tile overlap (the API accepts any tile size; the CLI refuses
    tiles that would mostly compute overlap). Raises ValueError (one line)."""
    least = MIN_TILE_OVERLAPS * deblurrer.tiling.overlap
    if isinstance(args.tile, int) and 0 < args.tile < least:
        # Each tile also computes --tile-overlap pixels of context on every side: below 2x the overlap a
        # tile computes over 4x its own pixels (--tile 1 ran 2145 tiles on a 257x131 image).
        raise ValueError(f"--tile {args.tile} is too small: tiles must be at least {least} pixels "
                         f"({MIN_TILE_OVERLAPS} x the {deblurrer.tiling.overlap}-pixel overlap each tile also "
                         "computes on every side); use --tile 0 (no tiles), auto, or a larger size")


def describe(info) -> str:
    """One line on what ran: the mask share, the FLOPs executed vs the untiled dense run, the time (and the
    tiles). Savings are against running the whole image densely, so tile overlaps count as cost."""
    saved = info.flops_saved_untiled
    saving = f"{saved:.1%} saved" if saved >= 0 else f"{-saved:.1%} more, tile overlaps"
    if info.execution == "dense":   # every pixel computed, then gated by the mask
        work = (f"mask {info.active_fraction:.1%} of pixels, computed densely: {info.flops_executed / 1e9:.2f} "
                f"GFLOP ({saving})")
    else:   # sparse, or tiles that chose differently ("mixed"), or nothing to restore ("none")
        work = (f"computed {info.active_fraction:.1%} of pixels, {info.flops_executed / 1e9:.2f} of "
                f"{info.flops_untiled / 1e9:.2f} GFLOP ({saving})")
    tiles = f", {info.tiles} tiles" if getattr(info, "tiles", 1) > 1 else ""
    return f"{work}, {info.seconds:.2f} s [{info.execution}{tiles}]"


def file_id(path: Path) -> tuple[int, int] | None:
    """``(device, inode)`` of ``path`` (links followed), None when it cannot be read: the same file under
    any name, for the rule that an output is never one of the inputs."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


T = TypeVar("T")


def run_setup(prog: str, setup: Callable[[], T], problems: list[str]) -> T | None:
    """A deblurring job's setup (output plan, checkpoint, folders) before any image runs: its result, or None
    after one ``PROG: error: ...`` line when it fails (the caller exits 2); then one ``PROG: skipped ...`` line
    per input ``collect_inputs`` could not use."""
    try:
        result = setup()
    except (ValueError, OSError, RuntimeError) as exc:   # CheckpointError is a ValueError
        say(f"{prog}: error: {cli_message(exc)}", sys.stderr)
        return None
    for p in problems:
        say(f"{prog}: skipped {p}", sys.stderr)
    return result
