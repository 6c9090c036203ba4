"""Atomic file output: every file the project writes goes through :func:`atomic_path` or :func:`atomic_write`.

The bytes go to a temporary file in the target's own folder (same filesystem, so the final rename is atomic),
are flushed and fsynced, get the usual ``0666 & ~umask`` permissions, and only then appear under the target
name. A failure or an interrupt at any point (including ``KeyboardInterrupt``) removes the temporary file and
leaves the target as it was: absent, or the previous complete version. Temporary files are named
``.tmp-<name>-<random>`` so a leftover from a killed process is easy to spot.

Without ``overwrite`` an existing target is never replaced, even one that appears while we write: the
file is published with a hard link, which fails if the name exists (where a rename would clobber it).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

from .errors import M2AEError
from .messages import shown

__all__ = ["atomic_path", "atomic_write", "prepare_folder", "OutputExistsError", "TEMP_PREFIX"]

TEMP_PREFIX = ".tmp-"


class OutputExistsError(M2AEError, FileExistsError):
    """The target exists and ``overwrite`` is false. The message speaks Python (``overwrite=True``); a CLI words
    it for its users from :attr:`path` (``--force``: :func:`m2ae_infer.cliutil.cli_message`)."""

    def __init__(self, path: str | os.PathLike[str]):
        super().__init__(f"{shown(path)} exists; pass overwrite=True to replace it")
        self.path = path

    def __reduce__(self):   # picklable (a process pool's error), with its path
        return type(self), (self.path,)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; publish it as ``path`` when the block succeeds.

    For writers that want a file name (``torch.save``, ``safetensors.save_file``, an engine builder).

    Raises:
        OutputExistsError: (a FileExistsError) ``path`` exists and ``overwrite`` is false (checked before and,
            where hard links work, again at publishing).
        OSError: the folder is missing or not writable, the disk is full, ...; the target is untouched.
    """
    target = Path(os.path.abspath(os.fspath(path)))
    if not overwrite and os.path.lexists(target):
        raise OutputExistsError(path)
    # The name is cut so that prefix + name + mkstemp's 8 random characters stay within the usual 255-byte limit
    # for any target name that itself fits.
    short = target.name.encode()[:200].decode(errors="ignore")
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{short}-", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())          # the rename must never publish bytes that are not on disk
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600 files
        _publish(tmp, target, overwrite, path)
        _fsync_folder(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)                # gone after a rename; still there after a hard link or a failure


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", *, overwrite: bool = False,
                 encoding: str | None = None, newline: str | None = None) -> Iterator[IO]:
    """Like ``open(path, mode)`` for writing, but the file appears under ``path`` only once complete.

    ``mode`` is ``"wb"`` or ``"w"`` (text; ``encoding`` defaults to UTF-8). See :func:`atomic_path`.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write mode must be 'wb' or 'w', got {mode!r}")
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, mode, encoding=encoding, newline=newline) as f:
            yield f
            f.flush()


def write_json(path: str | os.PathLike[str], obj, *, overwrite: bool = True, indent: int = 1) -> None:
    """``obj`` as JSON at ``path``, atomically (a benchmark's ``--out`` rows: replaced by default)."""
    with atomic_write(path, "w", overwrite=overwrite) as f:
        json.dump(obj, f, indent=indent)


def prepare_folder(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` (and its parents) and check that a file can be created in it, by creating and removing
    a probe file: run before long work, so that an hour of computing does not end in "cannot write".
    Raises OSError (a read-only or full filesystem, no permission, a file in the way)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=TEMP_PREFIX + "probe-", dir=folder)
    os.close(fd)
    os.unlink(probe)
    return folder


def _publish(tmp: str, target: Path, overwrite: bool, name: object) -> None:
    if overwrite:
        os.replace(tmp, target)
        return
    try:   # a hard link fails if the target appeared meanwhile, where a rename would clobber it
        os.link(tmp, target)
    except FileExistsError:
        raise OutputExistsError(name) from None
    except OSError:    # no hard links on this filesystem: the race window is the best we can do
        if os.path.lexists(target):
            raise OutputExistsError(name) from None
        os.replace(tmp, target)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; restored at once
    os.umask(mask)
    return mask
