"""``m2ae-deblur ... --ray [ADDRESS]``: the CLI side of :func:`m2ae_infer.distributed.deblur_files`."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from ..cli import PROG
from ..jobs import collect_inputs, plan_outputs, prepare_folders, run_setup
from ..cliutil import progress_stream, say
from ..messages import one_line, shown
from .job import RAY_EXTRA, _check_pool, _load_on_driver, _options, _run
from .records import BatchSummary, InputResult


def cli_run(args) -> int:
    """``m2ae-deblur ... --ray [ADDRESS]``, from the arguments of ``cli.build_parser`` (``cli.main`` checked that
    inputs and an output are given). Returns the exit code: 0, 1 (some inputs failed or were not run), 2 (setup
    errors, before any image runs), 130 (interrupted)."""
    from ..jobs import check_tiling
    files, problems = collect_inputs(args.inputs)

    def setup():
        address = _address_arg(args.ray)
        _check_pool(args.workers, args.threads_per_worker, args.gpus_per_worker, 0, 0)
        outputs = plan_outputs(files, args.output, args.example, args.save_mask)
        options = _options(args.checkpoint, args.device, args.execution, args.threshold, args.dilation, args.full,
                           args.tile, args.tile_overlap, args.save_mask, args.force, args.gpus_per_worker,
                           detector_side=args.detector_side)
        if importlib.util.find_spec("ray") is None:
            raise ValueError(f"--ray needs Ray, which is not installed: {RAY_EXTRA}")
        _load_on_driver(options, check=lambda deblurrer: check_tiling(deblurrer, args))
        prepare_folders(outputs.values())
        return address, outputs, options
    ready = run_setup(PROG, setup, problems)
    if ready is None:
        return 2
    address, outputs, options = ready
    bar = None if args.quiet or len(outputs) < 2 else _progress(len(outputs))

    def report(result: InputResult) -> None:
        for warning in result.warnings:
            say(f"{PROG}: warning: {warning}", sys.stderr)
        if result.status == "failed":
            say(f"{PROG}: failed {shown(result.source)}: {result.message}", sys.stderr)
        elif not args.quiet:
            say(f"{shown(result.source)} -> {shown(outputs[Path(result.source)])}: {result.message}")
        if bar is not None:
            bar.update()

    summary = BatchSummary()
    try:
        _run(summary, files, problems, outputs, options, address, args.workers, args.threads_per_worker,
             args.gpus_per_worker, 1, 3, report, ())
    except ValueError as exc:   # the cluster cannot be reached, or cannot hold the pool: no image ran
        _close(bar)
        say(f"{PROG}: error: {one_line(exc)}", sys.stderr)
        return 2
    except KeyboardInterrupt:   # atomic writes: nothing half-written; the same command resumes
        _close(bar)
        say(f"{PROG}: interrupted; {len(summary.written)} written, {len(summary.skipped)} skipped, "
            f"{len(summary.failed)} failed, {len(summary.not_run)} not run; run the same command to resume",
            sys.stderr)
        return 130
    _close(bar)
    if summary.exit_code:
        say(f"{PROG}: {summary.line()}", sys.stderr)
    elif not args.quiet:
        where = f" on {summary.workers} Ray worker{'s' * (summary.workers != 1)}, " \
                f"{summary.startup_seconds:.1f} s start-up + {summary.run_seconds:.1f} s" if summary.workers else ""
        say(f"{PROG}: {summary.line()}{where}")
    return summary.exit_code


def _address_arg(value: str) -> str | None:
    """``--ray`` alone (``"default"``), auto, local, HOST:PORT or ray://HOST:PORT -> ray.init's address."""
    if value == "default":
        return None
    if value in ("auto", "local") or value.startswith("ray://") or (
            value.rpartition(":")[2].isdigit() and not os.path.exists(value)):
        return value
    raise ValueError(f"--ray {shown(value)}: not a Ray address (auto, local, HOST:PORT or ray://HOST:PORT); "
                     "an input right after a bare --ray is read as its address: write --ray=auto, or put --ray "
                     "after the inputs")


def _progress(total: int):
    from tqdm import tqdm
    return tqdm(total=total, unit="img", file=progress_stream(), dynamic_ncols=True)


def _close(bar) -> None:
    """Close the progress bar before the closing line, so that the line is the last one on the terminal."""
    if bar is not None:
        bar.close()
