"""The pool of deblurring actors and the loop that feeds them (:class:`_Pool`)."""
from __future__ import annotations

import contextlib
import itertools
import time
from collections import deque

from ..messages import one_line
from .records import BatchSummary, InputResult
from .worker import _DeblurWorker, _decode

DECODE_AHEAD = 1   # inputs decoded ahead per worker: the next image is ready when an actor frees up
READY_TIMEOUT_S = 600   # actors that cannot be placed (the cluster busy) for this long: an error, not a hang


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
        # The first inputs are decoded while the actors load the checkpoint: both start processes that import torch.
        self._decode_ahead(workers * (1 + DECODE_AHEAD))
        try:   # every actor loads the checkpoint before the first image: a node that cannot is an error here
            ray.get([a.ready.remote() for a in self.actors], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.close()
            raise ValueError(f"the {workers} Ray workers did not start within {READY_TIMEOUT_S} s: the cluster's "
                             "CPUs/GPUs are taken by other work; give fewer --workers or free the cluster") from None
        except ray.exceptions.RayError as exc:
            self.close()
            raise ValueError(f"a Ray worker could not start: {_cause(exc)}") from None
        except BaseException:   # Ctrl-C while the actors start: they must not outlive the job on a shared cluster
            self.close()
            raise

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
