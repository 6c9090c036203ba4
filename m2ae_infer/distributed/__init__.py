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

Modules: ``job`` (the driver: plan, connect, run, clean up; :func:`deblur_files`), ``pool`` (the actors and the loop
that feeds them, and why not Ray Data), ``worker`` (the decode task and the actor, on the cluster), ``records``
(:class:`BatchSummary`, :class:`InputResult`), ``cli`` (``--ray``). docs/ray.md has the commands and measurements.
"""
from .cli import cli_run
from .job import LOOPBACK_ENV, RAY_EXTRA, connect, deblur_files
from .records import BatchSummary, InputResult

__all__ = ["BatchSummary", "InputResult", "deblur_files", "connect", "cli_run", "RAY_EXTRA", "LOOPBACK_ENV"]
