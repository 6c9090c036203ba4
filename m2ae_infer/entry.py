"""Console-script launchers for the CLIs whose modules import torch or Ray at the top (m2ae-train, m2ae-bench,
m2ae-serve).

A Ctrl-C during that import (about 1.5 s; Ray Serve's about 1 s) would otherwise print a traceback before ``main``
could install its handler; here it is ``PROG: interrupted`` and exit code 130 like every other interrupt (docs/bad_inputs.md).
"""
from __future__ import annotations

import importlib
import sys

from .cliutil import INTERRUPTED


def _launch(prog: str, module: str) -> int:
    try:
        main = importlib.import_module(module).main
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    return main()


def train() -> int:
    return _launch("m2ae-train", "m2ae_infer.train")


def bench() -> int:
    return _launch("m2ae-bench", "m2ae_infer.benchmarks.cli")


def serve() -> int:
    return _launch("m2ae-serve", "m2ae_infer.serve")
