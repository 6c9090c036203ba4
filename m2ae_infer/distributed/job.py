"""The driver's side of a distributed batch: plan (names, refusals, skips), connect, run the pool, clean up."""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import logging
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..atomic import TEMP_PREFIX
from ..jobs import collect_inputs, file_id, mask_path, plan_outputs, prepare_folders
from ..messages import one_line, shown
from ..shipped import DETECTOR_SIDE
from .pool import _Pool
from .records import BatchSummary, InputResult, _Item
from .worker import _deblurrer, _identity

RAY_EXTRA = "pip install 'm2ae-infer[ray]'"
# Ray binds a cluster it starts to the machine's network address; with this variable (read when ray is imported)
# it uses 127.0.0.1: a cluster started for one job on one machine listens on the loopback interface only.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def deblur_files(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *, address: str | None = None,
                 workers: int | None = None, threads_per_worker: int = 1, gpus_per_worker: float = 0.0,
                 checkpoint: str | os.PathLike | None = None, device: str = "auto", execution: str = "auto",
                 threshold: float | None = None, dilation: int = 0, full: bool = False, tile: int | str | None = "auto",
                 tile_overlap: int | None = None, detector_side: int | None = DETECTOR_SIDE, save_mask: bool = False,
                 force: bool = False, retries: int = 1,
                 max_restarts: int = 3, on_result: Callable[[InputResult], None] | None = None,
                 _faults: Sequence[dict] = ()) -> BatchSummary:
    """Deblur image files and folders on a Ray cluster, as ``m2ae-deblur IN... -o OUT --ray ADDRESS`` does.

    Args:
        inputs, output: as ``m2ae-deblur``'s ``IN...`` and ``-o`` (folders expand to their images; ``output`` is
            a folder, or a file name for one input).
        address: ``None`` (Ray's default: ``RAY_ADDRESS``, else a cluster running on this machine, else a new
            one), ``"auto"`` (a running cluster only), ``"local"`` (a new cluster on this machine, for this job),
            or ``"HOST:PORT"`` / ``"ray://HOST:PORT"``. Ignored when Ray is already initialized in this process.
        workers: deblurring actors; default: as many as the cluster's CPUs (or GPUs) hold, at most one per input.
        threads_per_worker: torch threads (and Ray CPUs) per actor. gpus_per_worker: GPUs per actor (fractions
            share one); above 0 the actors run on CUDA.
        checkpoint, device, execution, threshold, dilation, tile, tile_overlap, detector_side: as
            :class:`~m2ae_infer.Deblurrer`;
            ``full``: restore every pixel; ``save_mask``: also write ``NAME_mask.png``.
        force: overwrite existing outputs (never an input); without it existing complete outputs are skipped.
        retries: times an input is run again after its worker process died; max_restarts: restarts per actor.
        on_result: called in the driver with an :class:`InputResult` as each input ends.
    Returns:
        A :class:`BatchSummary` (``exit_code`` 0 or 1). Raises ValueError (one line) before anything runs for
        a bad output, option or checkpoint, or a cluster that cannot be reached; KeyboardInterrupt stops the
        job (nothing is half-written: outputs are atomic).
    """
    files, problems = collect_inputs([os.fspath(i) for i in inputs])
    outputs = plan_outputs(files, os.fspath(output), example=False, masks=save_mask)
    options = _options(checkpoint, device, execution, threshold, dilation, full, tile, tile_overlap, save_mask,
                       force, gpus_per_worker, detector_side=detector_side)
    _check_pool(workers, threads_per_worker, gpus_per_worker, retries, max_restarts)
    _load_on_driver(options)
    prepare_folders(outputs.values())
    summary = BatchSummary()
    _run(summary, files, problems, outputs, options, address, workers, threads_per_worker, gpus_per_worker,
         retries, max_restarts, on_result, _faults)
    return summary


def _options(checkpoint, device, execution, threshold, dilation, full, tile, tile_overlap, save_mask, force,
             gpus_per_worker, *, detector_side: int | None) -> dict:
    """The actors' settings, checked: a CUDA device needs GPUs given to the actors, and GPUs a CUDA device."""
    if device != "auto" and not str(device).startswith(("cpu", "cuda")):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if str(device).startswith("cuda") and not gpus_per_worker:
        raise ValueError(f"device {device} on Ray workers needs GPUs given to them: set gpus_per_worker "
                         "(--gpus-per-worker F)")
    if gpus_per_worker and device == "cpu":
        raise ValueError("gpus_per_worker (--gpus-per-worker) with device cpu: drop one of the two")
    # Ray hides the GPUs an actor was not given (CUDA_VISIBLE_DEVICES): inside the actor the GPU is cuda:0.
    device = "cuda" if gpus_per_worker else "cpu"
    return dict(checkpoint=None if checkpoint is None else os.path.abspath(os.fspath(checkpoint)), device=device,
                execution=execution, threshold=threshold, dilation=dilation, full=full, tile=tile,
                tile_overlap=tile_overlap, detector_side=detector_side, save_mask=save_mask, force=force)


def _check_pool(workers, threads, gpus, retries, max_restarts) -> None:
    for name, value, least in (("workers (--workers)", workers, 1),
                               ("threads_per_worker (--threads-per-worker)", threads, 1),
                               ("retries", retries, 0), ("max_restarts", max_restarts, 0)):
        if value is not None and not (isinstance(value, int) and value >= least):
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not (isinstance(gpus, (int, float)) and gpus >= 0):
        raise ValueError(f"gpus_per_worker (--gpus-per-worker) must be a number >= 0, got {gpus!r}")


def _load_on_driver(options: dict, check: Callable[[Any], None] | None = None) -> None:
    """Load the network once on the driver (CPU), as m2ae-deblur does before any image: a bad checkpoint or tile
    setting fails here, in one line, not in every actor. ``check`` (the CLI's own checks) gets the Deblurrer."""
    deblurrer = _deblurrer(options, "cpu")
    if check is not None:
        check(deblurrer)


# --------------------------------------------------------------------------------------- connecting
def connect(address: str | None) -> bool:
    """Initialize Ray for ``address`` (see :func:`deblur_files`) unless it already is; returns whether this call
    initialized it (then the caller shuts it down). ValueError, one line, when Ray is missing or the cluster
    cannot be reached."""
    if importlib.util.find_spec("ray") is None:
        raise ValueError(f"--ray needs Ray, which is not installed: {RAY_EXTRA}")
    if address == "local" and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")
    import ray
    if ray.is_initialized():
        return False
    try:
        # Worker output and Ray's INFO lines stay in Ray's log files: the CLI's lines are the report.
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = "a running Ray cluster" if address in (None, "auto") else f"the Ray cluster at {address}"
        raise ValueError(f"cannot connect to {where} ({one_line(exc, 200)}); start one with 'ray start --head', "
                         "or use a new one on this machine (--ray local)") from None
    return True


# ------------------------------------------------------------------------------------------ the job
def _plan_items(outputs: dict[Path, Path], files: list[Path], options: dict):
    """Split the planned outputs into work, skips and refusals (the refusal rules of m2ae-deblur, and resume).

    Returns (items to run, inputs skipped, (input, reason) refused)."""
    inputs = {file_id(f) for f in files} - {None}
    items, skipped, refused = [], [], []
    for source, target in outputs.items():
        targets = (target, mask_path(target)) if options["save_mask"] else (target,)
        reason = None
        for path in targets:
            if file_id(path) in inputs:   # the same file as an input (also through links), never skipped
                what = "the input itself" if os.path.samefile(source, path) else "one of the inputs"
                reason = f"output {shown(path)} is {what}; choose another output"
            elif path.is_dir():
                reason = f"output {shown(path)} is a folder; move it or choose another output"
            elif os.path.lexists(path) and not options["force"] and not _complete(path):
                reason = f"{shown(path)} exists but is not a complete output (a symlink or an empty file); " \
                         "pass --force to overwrite it"
            if reason:
                break
        existing = [p for p in targets if os.path.lexists(p)]
        if reason is None and existing and not options["force"]:
            if len(existing) == len(targets):
                skipped.append(str(source))
                continue
            reason = f"{shown(existing[0])} exists; pass --force to overwrite it"   # half of an image+mask pair
        if reason:
            refused.append((str(source), reason))
            continue
        items.append(_Item(str(source), tuple(map(str, targets)), tuple(_identity(p) for p in targets)))
    return items, skipped, refused


def _complete(path: Path) -> bool:
    """A regular, non-empty file: what an atomic write leaves (nothing this project writes is ever partial)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size > 0


def _run(summary: BatchSummary, files, problems, outputs, options, address, workers, threads, gpus, retries,
         max_restarts, on_result, faults) -> None:
    """Run the job, filling ``summary`` as inputs end (so that after a KeyboardInterrupt it says what was done)."""
    started = time.time()
    report = on_result or (lambda result: None)
    for problem in problems:   # collect_inputs' problems: "NAME: reason", NAME already escaped
        name, _, reason = problem.partition(": ")
        summary.failed.append((name, reason))
    items, skipped, refused = _plan_items(outputs, files, options)
    for source in skipped:
        summary.skipped.append(source)
        report(InputResult(source, "skipped", "skipped, already complete"))
    for source, reason in refused:
        summary.failed.append((source, reason))
        report(InputResult(source, "failed", reason))
    if not items:
        return
    owned = connect(address)
    import ray
    pool = None
    try:
        pool = _Pool(ray, items, options, workers, threads, gpus, max_restarts, faults)
        summary.workers = len(pool.actors)
        summary.startup_seconds = time.time() - started
        pool.run(summary, retries, report)
        summary.run_seconds = time.time() - started - summary.startup_seconds
    except KeyboardInterrupt:
        summary.not_run = pool.unfinished() if pool is not None else [i.source for i in items]
        raise
    finally:
        if pool is not None:
            pool.close()
        if owned:
            ray.shutdown()
        if pool is None or pool.deaths or summary.not_run:
            _remove_leftovers(items, started)


def _remove_leftovers(items: list[_Item], since: float) -> None:
    """Remove the temporary files (``atomic.TEMP_PREFIX``) that this job's killed workers left beside its outputs:
    their final names were never published, so no output is lost or partial, but the bytes should not linger.
    Only names atomic.atomic_path makes for this job's targets, created since the job started."""
    for item in items:
        for target in map(Path, item.targets):
            stem = TEMP_PREFIX + target.name.encode()[:200].decode(errors="ignore") + "-"
            with contextlib.suppress(OSError):
                for leftover in target.parent.glob(f"{glob.escape(stem)}*"):
                    if len(leftover.name) == len(stem) + 8 and leftover.lstat().st_mtime >= since - 1:
                        leftover.unlink()
