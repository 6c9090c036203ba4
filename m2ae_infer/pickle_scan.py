"""Read a pickle's opcodes without executing them, to explain why ``torch.load(weights_only=True)`` refused a file.

:mod:`pickletools` parses opcodes and never runs them, so a scan is safe on any file. It tells apart a pickle
that imports code (and which names, minus torch's weights-only allowlist), an ordinary ``pickle.dump`` file,
a ``torch.save`` file with a protocol the weights-only unpickler cannot read, and truncated or corrupt data.
Used only after a load has failed (:func:`m2ae_infer.checkpoint.load_checkpoint`).
"""
from __future__ import annotations

import io
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .messages import one_line

SCAN_OPS = 1_000_000  # opcodes read when explaining a failed load (a state dict's pickle has ~10 per tensor)


@dataclass
class PickleScan:
    """What :mod:`pickletools` read off one pickle: nothing in it was executed."""

    protocol: int = 0
    ordinary: bool = False  # written by pickle.dump (its first pickle is not torch's magic number)
    needs: list[str] = field(default_factory=list)  # imported names outside torch's weights-only allowlist
    damage: str = ""  # "truncated ..." or "corrupt ..." when the opcodes themselves are broken
    magic: bool = False  # the pickle is torch's legacy-format magic number


def scan_main_pickle(path: Path) -> PickleScan | None:
    """Scan the pickle that holds the checkpoint's object: ``data.pkl`` in a torch zip; in a legacy torch
    file the 4th pickle (after magic number, protocol version and system info); else the file's first."""
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # as _sniff decided; a zip cut short is no pickle either
        if is_zip:
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                with archive.open(name) as member:
                    return scan_pickle(member)
        with open(path, "rb") as f:
            scan = scan_pickle(f)
            if scan.damage or not scan.magic:
                scan.ordinary = not scan.damage
                return scan
            for _ in range(3):  # protocol version, system info, then the object
                scan = scan_pickle(f)
                if scan.damage:
                    break
            return scan
    except Exception:  # noqa: BLE001 - explaining a failed load must not fail: fall back to "corrupt"
        return None


def scan_pickle(f: io.BufferedIOBase) -> PickleScan:
    """Opcodes of the next pickle in ``f`` (at most :data:`SCAN_OPS`): protocol, imported names, damage."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals  # private: fall back to naming all
        allowed = set(_get_allowed_globals())
    except (ImportError, AttributeError, TypeError):
        allowed = set()
    scan, names, recent, memo = PickleScan(), [], [None, None], {}  # recent: the last two pushed strings
    try:
        for count, (op, arg, _) in enumerate(pickletools.genops(f)):
            if op.name == "PROTO":
                scan.protocol = arg
            elif op.name in ("GLOBAL", "INST"):
                names.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL":
                names.append(f"{recent[-2]}.{recent[-1]}")
            elif op.name == "MEMOIZE" or op.name.endswith("PUT"):
                memo[len(memo) if op.name == "MEMOIZE" else arg] = recent[-1]
            elif op.name in ("LONG1", "LONG4", "LONG") and count < 3:
                scan.magic = arg == torch.serialization.MAGIC_NUMBER
            if isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                recent.append(arg)
            elif op.name.endswith("GET"):
                recent.append(memo.get(arg))
            elif op.name not in ("MEMOIZE", "FRAME", "PROTO") and not op.name.endswith("PUT"):
                recent.append(None)
            del recent[:-2]
            if count >= SCAN_OPS:
                break
    except Exception as exc:  # noqa: BLE001 - pickletools raises ValueError and friends on broken data
        try:
            at_end = f.read(1) == b""
        except Exception:  # noqa: BLE001 - e.g. a zip member whose data is damaged too
            at_end = False
        scan.damage = ("truncated (the pickle data ends before its end mark)" if at_end else
                       f"corrupt (not a valid pickle: {one_line(exc, 120)})")
    scan.needs = [n for n in dict.fromkeys(names) if n not in allowed]
    return scan
