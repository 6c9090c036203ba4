"""The records of a distributed batch: one input to run (:class:`_Item`), how an input ended
(:class:`InputResult`) and the whole job (:class:`BatchSummary`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..jobs import SHOWN
from ..messages import shown


@dataclass(frozen=True)
class _Item:
    """One input to deblur: its outputs (the image, and its mask with ``save_mask``), and what each output path
    held when the job was planned (``os.lstat`` identity, None: absent)."""

    source: str
    targets: tuple[str, ...]
    before: tuple[tuple[int, ...] | None, ...]


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
