"""Plumbing shared by the console scripts (m2ae-deblur, -eval, -train, -export, -bench): one-line usage errors,
Ctrl-C as exit 130 and one line (:func:`cli_main`), library errors worded for the command line
(:func:`cli_message`), the ``--device`` option, output paths, and printing that survives a closed pipe.

Importing ``m2ae_infer`` and this module is light (no torch: the package's names load on first use), so a
console script reaches its ``main`` and :func:`cli_main`'s handler within milliseconds of starting.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import signal
import sys
import threading
from typing import Callable

from .messages import one_line, shown

INTERRUPTED = 130   # 128 + SIGINT, what a shell reports for a process stopped by Ctrl-C


def cli_main(prog: str, usage: tuple[type[BaseException], ...] = ()) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a console script's ``main(argv) -> int`` with the exit-code ladder every CLI shares:

    * argparse's exits (``--help``: 0, a usage error already printed: 2) pass through as ``SystemExit``;
    * an exception of a ``usage`` type (bad options, an input that cannot be used): ``PROG: error: ...``, 2;
    * a Ctrl-C that reaches it (wherever it struck: an import, an export, a write): ``PROG: interrupted``, 130;
    * any other exception: ``PROG: error: Type: ...``, 1.

    Each is one line on stderr, never a traceback. Cleaning up is the writers' job: every output goes through
    :mod:`m2ae_infer.atomic`, so nothing partial is left. While ``main`` runs, Ctrl-C is also counted, for
    :func:`stop_if_interrupted`."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            previous = _count_interrupts()
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt as exc:   # KeyboardInterrupt("at step 5, saved") adds what was kept
                say(f"{prog}: interrupted" + (f": {exc}" if str(exc) else ""), sys.stderr)
                return INTERRUPTED
            except usage as exc:
                say(f"{prog}: error: {cli_message(exc)}", sys.stderr)
                return 2
            except Exception as exc:  # noqa: BLE001 - one line, never a traceback
                say(f"{prog}: error: {type(exc).__name__}: {one_line(exc)}", sys.stderr)
                return 1
            finally:
                if previous is not None:
                    signal.signal(signal.SIGINT, previous)
        return run
    return wrap


_interrupts = [0]   # Ctrl-C seen since the running cli_main started


def _count_interrupts():
    """Install a SIGINT handler that counts, then raises KeyboardInterrupt as Python's own does; returns the
    handler to restore (None when this is not the main thread or SIGINT is not Python's default handler)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return None

    def counting(signum, frame):
        _interrupts[0] += 1
        raise KeyboardInterrupt

    _interrupts[0] = 0
    signal.signal(signal.SIGINT, counting)
    return previous


def stop_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C arrived since the CLI started, even one a library swallowed (torch.export
    turns a Ctrl-C inside its tracing into an AttributeError, which it may handle and go on): call it before
    publishing the result of such a step."""
    if _interrupts[0]:
        raise KeyboardInterrupt


def cli_message(exc: BaseException) -> str:
    """The one line a CLI prints for a library error. The library speaks Python (``overwrite=True``,
    ``tile_overlap=5``); an existing output (:class:`m2ae_infer.atomic.OutputExistsError`, raised or the cause
    of the error raised) is worded with the CLI's ``--force`` instead, and an
    :class:`~m2ae_infer.errors.InvalidArgument` with the flag of the same name (``--tile-overlap 5``)."""
    from .atomic import OutputExistsError
    from .errors import InvalidArgument
    exists = next((e for e in (exc, exc.__cause__) if isinstance(e, OutputExistsError)), None)
    if exists is not None:
        return f"{shown(exists.path)} exists; pass --force to overwrite it"
    if isinstance(exc, InvalidArgument):   # the API's parameter name, spelled as the flag that set it
        return one_line(exc.for_flag("--" + exc.parameter.replace("_", "-")))
    return one_line(exc)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit code 2) like every other error of the CLIs, not the
    whole usage block followed by the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


def writable_folder(folder, what: str = "", fix: str = "choose a writable folder", error: type = ValueError):
    """Create ``folder`` and check a file can be written in it (:func:`m2ae_infer.atomic.prepare_folder`), before
    any long work: an hour of computing must not end in "cannot write". Raises ``error`` with one line,
    ``cannot write to {what}{folder} ({reason}); {fix}`` (``what``: e.g. ``"--out "``). Returns the folder."""
    from .atomic import prepare_folder
    try:
        return prepare_folder(folder)
    except OSError as exc:
        raise error(f"cannot write to {what}{shown(folder)} ({one_line(exc.strerror or exc)}); {fix}") from None


def threshold_arg(text: str) -> float:
    """argparse ``type`` of ``--threshold``: :func:`~m2ae_infer.checks.check_mask_settings`'s rule."""
    return _mask_setting(text, float, "threshold")


def dilation_arg(text: str) -> int:
    """argparse ``type`` of ``--dilation``: :func:`~m2ae_infer.checks.check_mask_settings`'s rule."""
    return _mask_setting(text, int, "dilation")


def _mask_setting(text: str, kind, name: str):
    from .checks import check_mask_settings
    from .errors import InvalidArgument
    try:
        value = kind(text)
        check_mask_settings(**{"threshold": 0.5, "dilation": 0, name: value})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(exc.for_flag("").strip() if isinstance(exc, InvalidArgument)
                                         else f"expected a number, got {text!r}") from None
    return value


def device_arg(text: str) -> str:
    """argparse ``type`` of ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (the executors run on CPU and
    CUDA only; meta, mps, ... are refused here, by name, instead of failing deep inside torch)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def check_device(device: str) -> None:
    """A CUDA device that this machine does not have: ValueError, one line naming ``--device``."""
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu "
                             "(or auto)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"use --device cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def path_arg(text: str) -> str:
    """argparse ``type`` of an output path: an empty string is refused (it would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return text


def say(text: str, file=None) -> None:
    """Print a line (above any tqdm bar) that a closed pipe cannot turn into a failure: if the reader went away
    (``| head -1``) the report is lost, not the work. As Python's docs advise (signal module, note on SIGPIPE),
    the stream is then pointed at devnull so that later writes and the flush at exit do not fail again."""
    stream = file or sys.stdout
    if stream is None:   # started with the stream closed (>&-)
        return
    from tqdm import tqdm
    try:
        tqdm.write(text, file=stream)
        stream.flush()   # a closed pipe shows up here, not at exit
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except ValueError:   # the stream object itself was closed
        pass


class PipeSafeStream:
    """A text stream for progress bars that stops writing, instead of raising, once the reader went away
    (``2>&1 | head``): a progress bar is a report, and a closed pipe must not stop the work it reports on."""

    def __init__(self, stream):
        self.stream, self.closed_pipe = stream, stream is None

    def write(self, text: str) -> int:
        if not self.closed_pipe:
            try:
                return self.stream.write(text)
            except (BrokenPipeError, ValueError):   # ValueError: the stream object itself was closed
                self.closed_pipe = True
        return len(text)

    def flush(self) -> None:
        if not self.closed_pipe:
            try:
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                self.closed_pipe = True

    def isatty(self) -> bool:
        return not self.closed_pipe and self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


def progress_stream():
    """Where progress bars write: stderr, wrapped in :class:`PipeSafeStream`."""
    return PipeSafeStream(sys.stderr)
