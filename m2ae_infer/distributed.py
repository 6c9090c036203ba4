"""Batch deblurring on a Ray cluster: ``m2ae-deblur IN... -o OUT --ray [ADDRESS]`` and :func:`deblur_files`.

The same job as ``m2ae-deblur``, with the same input expansion (``cli.collect_inputs``), output names
(``cli.plan_outputs``), refusal rules and atomic writes, and the same output bytes: the driver plans, Ray tasks
read and decode, and a pool of actors (each loads the checkpoint once) deblurs and writes. What differs:

- An output that already exists as a complete file is **skipped**, so running the same command again resumes a
  batch that stopped. Every file this project writes is published by :mod:`m2ae_infer.atomic` (written to a
  temporary name, fsynced, then linked or renamed into place), so a file under an output's name is never a
  partial one; only a symlink or an empty file at that name is refused as not complete (``--force`` overwrites).
  An output that is one of the inputs is refused, never skipped.
- A worker process that dies (killed, out of memory, a crash in native code) loses nothing: Ray restarts the actor
  (``max_restarts``) and its input is run again (``retries``) on the next free actor. An input whose worker died
  more often than that fails alone, named in the summary; the re-run completes it.

Ray is imported only inside the functions here (``pip install 'm2ae-infer[ray]'``). Inputs, outputs and the
checkpoint must be readable (outputs writable) at the same paths on the driver and every node: a shared
filesystem on a multi-node cluster.
"""
from __future__ import annotations

import contextlib
import glob
import importlib.util
import itertools
import logging
import os
import socket
import stat
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .atomic import TEMP_PREFIX
from .cli import PROG, SHOWN, _file_id, collect_inputs, describe, mask_path, plan_outputs, prepare_folders
from .cliutil import cli_message, progress_stream, say
from .messages import one_line, shown

__all__ = ["BatchSummary", "InputResult", "deblur_files", "connect", "RAY_EXTRA"]

RAY_EXTRA = "pip install 'm2ae-infer[ray]'"
# Ray binds a cluster it starts to the machine's network address; with this variable (read when ray is imported)
# it uses 127.0.0.1: a cluster started for one job on one machine listens on the loopback interface only.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
DECODE_AHEAD = 2   # inputs decoded ahead per worker: the next image is ready when an actor frees up
READY_TIMEOUT_S = 600   # actors that cannot be placed (the cluster busy) for this long: an error, not a hang


@dataclass(frozen=True)
class _Item:
    """One input to deblur: its outputs (the image, and its mask with ``save_mask``), and what each output path
    held when the job was planned (``os.lstat`` identity, None: absent)."""

    source: str
    targets: tuple[str, ...]
    before: tuple[tuple[int, ...] | None, ...]


@dataclass(frozen=True)
class _Decoded:
    """What a decode task hands an actor: the decoded image (PIL, EXIF orientation applied) or the error."""

    image: Any
    error: str | None
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class InputResult:
    """How one input ended (what :func:`deblur_files` hands ``on_result``).

    Attributes:
        source: the input path. status: ``"written"``, ``"skipped"`` (its outputs existed, complete) or
            ``"failed"``. message: the one-line description of the run, or the failure's reason.
        info: the RunInfo's numbers (active_fraction, flops_*, seconds, execution, backend, tiles) when written.
        warnings: one-line ImageWarnings (e.g. only the first frame of an animation was deblurred).
    """

    source: str
    status: str
    message: str = ""
    info: dict | None = None
    warnings: tuple[str, ...] = ()


@dataclass
class BatchSummary:
    """What :func:`deblur_files` did.

    Attributes:
        written: inputs whose outputs were written by this job (input paths as given).
        skipped: inputs whose outputs already existed, complete (not recomputed).
        failed: ``(input, reason)`` of every input that failed, one-line reasons.
        not_run: inputs never run (interrupted, or every worker gone).
        info: per written input, its RunInfo numbers (active_fraction, flops_*, seconds, execution, tiles).
        workers: actors in the pool; ``worker_deaths``: times one died; ``retried``: inputs run again after that.
        startup_seconds: connecting to (or starting) the cluster and loading the checkpoint in every actor;
            ``run_seconds``: from then to the last result.
    """

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    info: dict[str, dict] = field(default_factory=dict)
    workers: int = 0
    worker_deaths: int = 0
    retried: int = 0
    startup_seconds: float = 0.0
    run_seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every input was written or skipped, else 1 (as ``m2ae-deblur``)."""
        return 1 if self.failed or self.not_run else 0

    def line(self) -> str:
        """One line: the counts, and the failed inputs named (the first ``cli.SHOWN``)."""
        text = f"{len(self.written)} written, {len(self.skipped)} skipped (complete), {len(self.failed)} failed"
        if self.not_run:
            text += f", {len(self.not_run)} not run"
        if self.failed:
            names = [shown(name) for name, _ in self.failed]
            more = f", ... {len(names) - SHOWN} more" if len(names) > SHOWN else ""
            text += ": " + ", ".join(names[:SHOWN]) + more
        return text


# ------------------------------------------------------------------------------------------------ API
def deblur_files(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *, address: str | None = None,
                 workers: int | None = None, threads_per_worker: int = 1, gpus_per_worker: float = 0.0,
                 checkpoint: str | os.PathLike | None = None, device: str = "auto", execution: str = "auto",
                 threshold: float | None = None, dilation: int = 0, full: bool = False, tile: int | str | None = "auto",
                 tile_overlap: int | None = None, save_mask: bool = False, force: bool = False, retries: int = 1,
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
        checkpoint, device, execution, threshold, dilation, tile, tile_overlap: as :class:`~m2ae_infer.Deblurrer`;
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
                       force, gpus_per_worker)
    _check_pool(workers, threads_per_worker, gpus_per_worker, retries, max_restarts)
    _load_on_driver(options)
    prepare_folders(outputs.values())
    summary = BatchSummary()
    _run(summary, files, problems, outputs, options, address, workers, threads_per_worker, gpus_per_worker,
         retries, max_restarts, on_result, _faults)
    return summary


def _options(checkpoint, device, execution, threshold, dilation, full, tile, tile_overlap, save_mask, force,
             gpus_per_worker) -> dict:
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
                tile_overlap=tile_overlap, save_mask=save_mask, force=force)


def _check_pool(workers, threads, gpus, retries, max_restarts) -> None:
    for name, value, least in (("workers (--workers)", workers, 1),
                               ("threads_per_worker (--threads-per-worker)", threads, 1),
                               ("retries", retries, 0), ("max_restarts", max_restarts, 0)):
        if value is not None and not (isinstance(value, int) and value >= least):
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not (isinstance(gpus, (int, float)) and gpus >= 0):
        raise ValueError(f"gpus_per_worker (--gpus-per-worker) must be a number >= 0, got {gpus!r}")


def _deblurrer(options: dict, device: str):
    from .api import Deblurrer
    return Deblurrer(options["checkpoint"], device=device, execution=options["execution"],
                     threshold=options["threshold"], dilation=options["dilation"], tile=options["tile"],
                     tile_overlap=options["tile_overlap"])


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
    inputs = {_file_id(f) for f in files} - {None}
    items, skipped, refused = [], [], []
    for source, target in outputs.items():
        targets = (target, mask_path(target)) if options["save_mask"] else (target,)
        reason = None
        for path in targets:
            if _file_id(path) in inputs:   # the same file as an input (also through links), never skipped
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


def _identity(path) -> tuple[int, ...] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


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


class _Pool:
    """The deblurring actors and the loop that feeds them, one input at a time per actor.

    Why not Ray Data (``read_images`` → ``map_batches`` on an actor pool): its fault model is per batch of
    rows, retried as a whole (``max_task_retries=-1`` by default: an input that kills its worker every time is
    retried forever) or failing the whole dataset; here an input that kills its worker fails alone, named, and
    a half-done batch is never redone. Its rows are Arrow blocks, where a decoded image with its mode, ICC
    profile and EXIF (needed for identical output files) would travel as a pickled object anyway. Nor
    ``ray.util.ActorPool``: it does not resubmit after an actor dies. Plain tasks with a bounded look-ahead give
    the same overlap of decoding and deblurring with bounded memory.
    """

    def __init__(self, ray, items, options, workers, threads, gpus, max_restarts, faults):
        self.ray, self.queue = ray, deque(items)
        resources = ray.cluster_resources()
        if workers is None:
            held = resources.get("GPU", 0) / gpus if gpus else resources.get("CPU", 0) / threads
            workers = max(1, min(len(items), int(held + 1e-9)))
        need_cpu, need_gpu = workers * threads, workers * gpus
        if need_cpu > resources.get("CPU", 0) + 1e-9 or need_gpu > resources.get("GPU", 0) + 1e-9:
            raise ValueError(f"{workers} workers x {threads} threads" + (f" x {gpus:g} GPUs" if gpus else "")
                             + f" need {need_cpu} CPUs" + (f" and {need_gpu:g} GPUs" if gpus else "")
                             + f"; the cluster has {resources.get('CPU', 0):g} CPUs and "
                               f"{resources.get('GPU', 0):g} GPUs: give fewer --workers or threads")
        # max_task_retries=0: a call that dies with its actor comes back to this loop, which counts the deaths per
        # input; Ray alone would rerun the call on the restarted actor however often it kills it.
        actor = ray.remote(_DeblurWorker).options(num_cpus=threads, num_gpus=gpus, max_restarts=max_restarts,
                                                  max_task_retries=0)
        self.decode = ray.remote(_decode).options(num_cpus=0)   # light next to deblurring; see DECODE_AHEAD
        self.actors = [actor.remote(options, threads, list(faults)) for _ in range(workers)]
        self.deaths, self.running, self.decoding = 0, {}, {}
        try:   # every actor loads the checkpoint before the first image: a node that cannot is an error here
            ray.get([a.ready.remote() for a in self.actors], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise ValueError(f"the {workers} Ray workers did not start within {READY_TIMEOUT_S} s: the cluster's "
                             "CPUs/GPUs are taken by other work; give fewer --workers or free the cluster") from None
        except ray.exceptions.RayError as exc:
            self.close()
            raise ValueError(f"a Ray worker could not start: {_cause(exc)}") from None

    def run(self, summary: BatchSummary, retries: int, report) -> None:
        ray = self.ray
        unavailable = getattr(ray.exceptions, "ActorUnavailableError", ())   # Ray >= 2.2x: the actor is restarting
        idle, probes, restarting, attempts = list(self.actors), {}, [], {}
        while self.queue or self.running or probes or restarting:
            while idle and self.queue:
                item = self.queue.popleft()
                actor = idle.pop()
                decoded = self.decoding.pop(item.source, None) or self.decode.remote(item.source)
                self.running[actor.process.remote(item, decoded)] = (actor, item, decoded)
            self._decode_ahead(len(self.actors) * DECODE_AHEAD)
            if not self.queue and not self.running:
                break   # the work is done; actors still restarting are not needed
            while restarting and time.monotonic() >= restarting[0][0]:   # ask a restarting actor if it is back
                actor = restarting.pop(0)[1]
                probes[actor.ready.remote()] = actor
            if not self.running and not probes and not restarting:
                break   # no actor left alive: the rest are not run
            ready, _ = ray.wait([*self.running, *probes], num_returns=1, timeout=0.2 if restarting else None)
            if not ready:
                continue
            ref = ready[0]
            if ref in probes:
                actor = probes.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)
                except unavailable:   # still restarting: ask again shortly
                    restarting.append((time.monotonic() + 0.2, actor))
                except ray.exceptions.RayActorError:   # out of restarts: gone for good
                    pass
                continue
            actor, item, decoded = self.running.pop(ref)
            try:
                outcome = ray.get(ref)
                idle.append(actor)
            except ray.exceptions.RayActorError:   # the worker process died on this input
                self.deaths += 1
                summary.worker_deaths += 1
                attempts[item.source] = attempts.get(item.source, 0) + 1
                restarting.append((time.monotonic() + 0.2, actor))   # Ray restarts it (max_restarts)
                if attempts[item.source] <= retries:
                    summary.retried += 1
                    self.queue.appendleft(item)
                    self.decoding[item.source] = decoded
                    continue
                deaths = attempts[item.source]
                outcome = InputResult(item.source, "failed", f"its worker process died while deblurring it ("
                                      f"{deaths} time{'s' * (deaths > 1)}); run it alone to see why")
            except ray.exceptions.RayError as exc:   # e.g. the decode task's worker crashed
                outcome = InputResult(item.source, "failed", f"cannot be read on the cluster ({_cause(exc)})")
                idle.append(actor)
            if outcome.status == "written":
                summary.written.append(item.source)
                summary.info[item.source] = outcome.info
            else:
                summary.failed.append((item.source, outcome.message))
            report(outcome)
        summary.not_run.extend(self.unfinished())

    def _decode_ahead(self, ahead: int) -> None:
        for item in itertools.islice(self.queue, ahead):
            if item.source not in self.decoding:
                self.decoding[item.source] = self.decode.remote(item.source)

    def unfinished(self) -> list[str]:
        return [item.source for _, item, _ in self.running.values()] + [item.source for item in self.queue]

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)


def _cause(exc: BaseException) -> str:
    """The one line that says why a Ray call failed: the user code's own error where Ray wraps one."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    if cause is not None and not isinstance(cause, type(exc)):
        return one_line(cause, 300)
    lines = [line for line in str(exc).splitlines() if line.strip() and not line.startswith(" ")]
    return one_line(lines[-1] if lines else exc, 300)


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


# ------------------------------------------------------------------------------------------ workers
def _decode(source: str) -> _Decoded:
    """Ray task: read and decode one input as m2ae-deblur does (:func:`m2ae_infer.imgio.load_image`)."""
    from .imgio import ImageWarning, load_image
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ImageWarning)
        try:
            image, error = load_image(source), None
        except (ValueError, OSError, MemoryError) as exc:   # ImageError is a ValueError
            image, error = None, one_line(exc)
    return _Decoded(image, error, tuple(one_line(w.message) for w in caught if issubclass(w.category, ImageWarning)))


class _DeblurWorker:
    """Ray actor: one Deblurrer (the checkpoint loaded once, in ``__init__``), writing outputs as m2ae-deblur.

    ``faults`` is a test hook: ``{"name": file name, "when": "publish" | "return", "marker": path}`` makes this
    process exit (``os._exit(1)``) on that input, once per marker file: with the output's bytes complete in their
    temporary file but not yet published ("publish"), or after publishing, before reporting ("return").
    """

    def __init__(self, options: dict, threads: int, faults: list[dict]):
        import torch
        torch.set_num_threads(threads)
        self.options, self.faults = options, faults
        self.deblurrer = _deblurrer(options, options["device"])

    def ready(self) -> str:
        return f"{socket.gethostname()} pid {os.getpid()} {self.deblurrer.device}"

    def process(self, item: _Item, decoded: _Decoded) -> InputResult:
        # Write each output that is still as it was when the job was planned. One that changed since was
        # published by an earlier attempt of this input whose worker then died (an atomic publish makes a new
        # file): it is complete, and writing it again would write it twice.
        todo = [i for i, (t, b) in enumerate(zip(item.targets, item.before)) if _identity(t) == b]
        if not todo:
            return InputResult(item.source, "written", "written before its worker died", None, decoded.warnings)
        if decoded.error is not None:
            return InputResult(item.source, "failed", decoded.error, None, decoded.warnings)
        from .imgio import ImageWarning
        from .imgsave import mask_to_image, save_images
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught, self._fault(item.source, "publish"):
                warnings.simplefilter("always", ImageWarning)
                restored, info = self.deblurrer.run(decoded.image, mask="full" if self.options["full"] else None,
                                                    return_info=True)
                images = [restored]
                if self.options["save_mask"]:
                    import torch
                    images.append(mask_to_image(torch.from_numpy(info.mask)))
                save_images([(images[i], item.targets[i]) for i in todo], overwrite=self.options["force"])
        except (ValueError, OSError, RuntimeError, MemoryError) as exc:   # as m2ae-deblur: this input fails alone
            return InputResult(item.source, "failed", _named(cli_message(exc), item.source), None,
                            decoded.warnings + _warned(caught, item.source))
        self._die_if(item.source, "return")
        numbers = {k: getattr(info, k) for k in ("active_fraction", "flops_dense", "flops_executed", "flops_untiled",
                                                  "seconds", "execution", "backend", "tiles")}
        return InputResult(item.source, "written", describe(info), numbers, decoded.warnings + _warned(caught, item.source))

    @contextlib.contextmanager
    def _fault(self, source: str, when: str):
        if not any(f["when"] == when and f["name"] == Path(source).name for f in self.faults):
            yield
            return
        from . import atomic
        publish = atomic._publish

        def dying(*args, **kwargs):
            self._die_if(source, when)
            return publish(*args, **kwargs)

        atomic._publish = dying
        try:
            yield
        finally:
            atomic._publish = publish

    def _die_if(self, source: str, when: str) -> None:
        for fault in self.faults:
            if fault["when"] == when and fault["name"] == Path(source).name:
                try:
                    os.close(os.open(fault["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
                os._exit(1)


def _named(message: str, source: str) -> str:
    """The decoded image reaches the Deblurrer as a PIL image, so imgio names it "PIL image"; name the file."""
    return shown(source) + message[len("PIL image"):] if message.startswith("PIL image") else message


def _warned(caught, source: str) -> tuple[str, ...]:
    from .imgio import ImageWarning
    return tuple(_named(one_line(w.message), source) for w in caught or () if issubclass(w.category, ImageWarning))


# ---------------------------------------------------------------------------------------------- CLI
def cli_run(args) -> int:
    """``m2ae-deblur ... --ray [ADDRESS]``, from the arguments of ``cli.build_parser`` (``cli.main`` checked that
    inputs and an output are given). Returns the exit code: 0, 1 (some inputs failed or were not run), 2 (setup
    errors, before any image runs), 130 (interrupted)."""
    from .cli import check_tiling
    files, problems = collect_inputs(args.inputs)
    try:
        address = _address_arg(args.ray)
        _check_pool(args.workers, args.threads_per_worker, args.gpus_per_worker, 0, 0)
        outputs = plan_outputs(files, args.output, args.example, args.save_mask)
        options = _options(args.checkpoint, args.device, args.execution, args.threshold, args.dilation, args.full,
                           args.tile, args.tile_overlap, args.save_mask, args.force, args.gpus_per_worker)
        if importlib.util.find_spec("ray") is None:
            raise ValueError(f"--ray needs Ray, which is not installed: {RAY_EXTRA}")
        _load_on_driver(options, check=lambda deblurrer: check_tiling(deblurrer, args))
        prepare_folders(outputs.values())
    except (ValueError, OSError, RuntimeError) as exc:   # CheckpointError is a ValueError
        say(f"{PROG}: error: {cli_message(exc)}", sys.stderr)
        return 2
    for p in problems:
        say(f"{PROG}: skipped {p}", sys.stderr)
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
        say(f"{PROG}: error: {one_line(exc)}", sys.stderr)
        return 2
    except KeyboardInterrupt:   # atomic writes: nothing half-written; the same command resumes
        say(f"{PROG}: interrupted; {len(summary.written)} written, {len(summary.skipped)} skipped, "
            f"{len(summary.failed)} failed, {len(summary.not_run)} not run; run the same command to resume",
            sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
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
