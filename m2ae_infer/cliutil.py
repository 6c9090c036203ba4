"""Plumbing shared by the console scripts (m2ae-deblur, -eval, -train, -export, -bench): one-line usage errors,
the ``--device`` option, output paths, and printing that survives a closed pipe."""
from __future__ import annotations

import argparse
import os
import re
import sys

from .messages import one_line


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit code 2) like every other error of the CLIs, not the
    whole usage block followed by the message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see --help)\n")


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
