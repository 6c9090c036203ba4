"""Shared CLI plumbing: a closed pipe never fails the work; --device and output paths are checked up front."""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys

import pytest

from m2ae_infer.cliutil import device_arg, path_arg


def test_say_survives_a_reader_that_went_away():
    """`... | head -0`: the pipe is closed before the line is written; the line is lost, the exit code is not."""
    code = ("from m2ae_infer.cliutil import say\n"
            "import sys\n"
            "for i in range(3): say(f'line {i}'); say(f'err {i}', sys.stderr)\n"
            "print('done', file=open(sys.argv[1], 'w'))\n")
    read, write = os.pipe()
    os.close(read)   # nobody will ever read
    marker = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"say-{os.getpid()}.txt")
    proc = subprocess.run([sys.executable, "-c", code, marker], stdout=write, stderr=write, timeout=120)
    os.close(write)
    assert proc.returncode == 0
    with open(marker) as f:
        assert f.read().strip() == "done"
    os.unlink(marker)


def test_say_with_stdout_closed_at_start():
    proc = subprocess.run([sys.executable, "-c", "from m2ae_infer.cliutil import say; say('x')"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=lambda: os.close(1))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("text", ["auto", "cpu", "cuda", "cuda:1"])
def test_device_arg_accepts(text):
    assert device_arg(text) == text


@pytest.mark.parametrize("text", ["meta", "mps", "gpu", "cuda:", "cuda:x", "CPU", ""])
def test_device_arg_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError, match="auto, cpu, cuda or cuda:N"):
        device_arg(text)


@pytest.mark.parametrize("text", ["", "  "])
def test_empty_output_paths_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="empty path"):
        path_arg(text)


def test_progress_stream_stops_writing_once_the_pipe_is_closed():
    from m2ae_infer.cliutil import PipeSafeStream
    read, write = os.pipe()
    os.close(read)
    raw = os.fdopen(write, "w")
    stream = PipeSafeStream(raw)
    assert stream.write("x" * 100) == 100   # buffered; the pipe error comes at flush
    stream.flush()
    assert stream.closed_pipe and stream.write("more") == 4
    raw.write = lambda text: pytest.fail("wrote after the pipe closed")
    stream.write("again")
    stream.flush()
    with contextlib.suppress(BrokenPipeError):   # the raw stream still holds the unsent bytes
        raw.close()
