"""Reading checkpoint files with bounded memory: nothing is allocated before it has been checked.

A file is read in two passes (:class:`CheckpointSource`). ``read("meta")`` gives its *structure*: every tensor's
name, shape and dtype on the ``meta`` device, plus the stored config, form and meta, without reading any tensor
data; :mod:`m2ae_infer.checkpoint` checks that against the network. Only then does ``read("cpu")`` read the
tensors. The bounds that hold before either pass:

- **torch zip** (``torch.save``): the zip directory (:mod:`zipfile`, nothing inflated) gives each record's
  declared size. The object pickle (``data.pkl``) may declare at most :data:`MAX_PICKLE_BYTES`. Tensor records
  stored uncompressed (``torch.save``'s own layout) are memory-mapped (``torch.load(mmap=True)``), so records
  the network does not use are never read; compressed ones (a re-zipped file) are inflated whole by
  ``torch.load``, so their declared total is reported as :attr:`CheckpointSource.inflated` for the caller to
  bound against the network (a 1 MB file can declare 1 GB of zeros).
- **legacy torch files**: tensors are inline and uncompressed, bounded by the file's size.
- **safetensors**: the header length field is checked against the file and :data:`MAX_HEADER_BYTES` before the
  header is parsed; ``safe_open``/``get_slice`` give shapes and dtypes without data, and tensors are read one by
  one (``get_tensor``) after the check.

Every failure is one :class:`CheckpointError` naming the file: damaged containers, refused pickles (explained by
:mod:`m2ae_infer.pickle_scan`), odd or deeply nested JSON, sparse tensors and tensors without data.
"""
from __future__ import annotations

import json
import os
import re
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from .errors import M2AEError
from .messages import one_line, shown
from .pickle_scan import scan_main_pickle

__all__ = ["CheckpointError", "Contents", "CheckpointSource", "MAX_PICKLE_BYTES", "MAX_HEADER_BYTES"]

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = "m2ae"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIXES = (".safetensors",)
# Far above any real checkpoint's (ours: ~10 kB pickle, the shipped safetensors header 5.8 kB; safetensors itself
# allows 100 MB headers) and low enough that parsing one costs tens of MB, not gigabytes.
MAX_PICKLE_BYTES = 16 * 2**20
MAX_HEADER_BYTES = 16 * 2**20
TRUST_TORCH = ("if you trust it, torch.load it with weights_only=False in a trusted environment and "
               "re-save model.state_dict() with torch.save or m2ae_infer.save_checkpoint")
TRUST_PICKLE = ("if you trust it, pickle.load it in a trusted environment and re-save the weights with "
                "torch.save(state_dict, path) or m2ae_infer.save_checkpoint")
COPY_AGAIN = "download or copy the file again"
# safetensors dtype names (the format's spec) -> torch
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointError(M2AEError, ValueError):
    """A checkpoint could not be written or read; the message is one line naming the file, problem and fix."""

    def __init__(self, path: PathLike, problem: str = "", fix: str = ""):
        # CheckpointError(message) alone also works (and is what unpickling the exception calls)
        text = shown(path) + (f": {problem}" if problem else "") + (f"; {fix}" if fix else "")
        super().__init__(one_line(text))  # one line, whatever the wrapped exception printed


@dataclass
class Contents:
    """What one pass over a file read: the (unwrapped) state dict and, for our format, its raw entries
    ``version``/``config``/``deploy``/``meta`` (validated by :mod:`m2ae_infer.checkpoint`); ``None`` for others."""

    state_dict: dict[str, torch.Tensor]
    entries: dict[str, Any] | None = None


@dataclass
class CheckpointSource:
    """An opened checkpoint file: container kind and the bounds read off it before any tensor (see module doc)."""

    path: Path
    kind: str                 # "torch" | "safetensors"
    mmap: bool = False        # a torch zip whose tensor records are stored: torch.load(mmap=True) maps them
    inflated: int = 0         # bytes torch.load inflates up front (compressed tensor records), 0 when none

    @classmethod
    def open(cls, path: PathLike) -> "CheckpointSource":
        """Sniff ``path`` (first bytes against the extension) and read the bounds; nothing is unpickled yet."""
        path = Path(path)
        kind = _sniff(path)
        source = cls(path, kind)
        if kind == "torch":
            source.mmap, source.inflated = _zip_layout(path)
        return source

    def read(self, map_location: Any = "cpu") -> Contents:
        """The file's wrapped state dict and entries. ``"meta"``: the structure only, no tensor data read.
        A str/device ``map_location`` reads on the CPU (mapped where possible) and moves the state dict's tensors;
        anything else is passed to ``torch.load``."""
        structure = isinstance(map_location, str) and map_location == "meta"
        device = None
        if not structure and isinstance(map_location, (str, torch.device)):
            try:
                device = torch.device(map_location)
            except (RuntimeError, TypeError) as exc:
                raise CheckpointError(self.path, f"map_location {shown(map_location)!r} is not a device "
                                      f"({one_line(exc, 80)})", "pass 'cpu', 'cuda' or 'cuda:N'") from None
        try:
            if self.kind == "safetensors":
                contents = self._read_safetensors(structure)
            else:
                contents = self._read_torch("meta" if structure else "cpu" if device is not None else map_location)
        except RecursionError:
            raise CheckpointError(self.path, "nested too deeply to read (a damaged or crafted file)",
                                  "re-save the checkpoint") from None
        if not structure:
            _check_storage(self.path, contents.state_dict)
            if device is not None and device.type != "cpu":
                contents.state_dict = {k: v.to(device) for k, v in contents.state_dict.items()}
        return contents

    def _read_torch(self, map_location: Any) -> Contents:
        mmap = self.mmap and map_location != "meta"
        try:  # weights_only=True always: a file that needs code is refused, never retried unsafely
            with warnings.catch_warnings():  # torch's two-line protocol warning; a failure is explained below
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                obj = torch.load(self.path, map_location=map_location, weights_only=True, mmap=mmap)
        except RecursionError:
            raise
        except Exception as exc:  # refused code, a pickle weights-only cannot read, or a truncated/damaged file
            raise _load_failure(self.path, exc) from exc
        if not isinstance(obj, Mapping):
            raise CheckpointError(self.path, f"holds a {type(obj).__name__}, not a state dict or a dict of them")
        if obj.get("format") == FORMAT:
            entries = {k: obj.get(k, default) for k, default in (("version", None), ("config", None),
                                                                  ("deploy", None), ("meta", {}))}
            return Contents(_tensor_dict(self.path, obj.get("state_dict")), entries)
        return Contents(unwrap(self.path, obj))

    def _read_safetensors(self, structure: bool) -> Contents:
        from safetensors import safe_open

        path = self.path
        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                if structure:
                    state = {k: _meta_tensor(path, k, f.get_slice(k)) for k in f.keys()}
                else:   # one tensor at a time, after the structure was checked
                    state = {k: f.get_tensor(k) for k in f.keys()}
        except CheckpointError:
            raise
        except Exception as exc:  # SafetensorError (truncated header/data), OSError, ...
            raise _corrupt(path, exc) from exc
        if metadata.get("format") != FORMAT:
            return Contents(unwrap(path, state))
        entries = {"version": metadata.get("version"), "config": _json(path, metadata, "config", "null"),
                   "deploy": {"true": True, "false": False}.get(metadata.get("deploy", "")),
                   "meta": _json(path, metadata, "meta", "{}")}
        return Contents(_tensor_dict(path, state), entries)


# ------------------------------------------------------------------------------------------ containers
def _sniff(path: Path) -> str:
    """'torch' or 'safetensors' from the file's first bytes, checked against its extension."""
    if not path.exists():
        raise CheckpointError(path, "no such file", "check the path")
    if path.is_dir():
        raise CheckpointError(path, "is a directory, not a checkpoint file", "give the checkpoint file inside it")
    suffix = checked_suffix(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if size == 0:
        raise CheckpointError(path, "is empty", "the file was not written completely; save it again")
    expected = "safetensors" if suffix in SAFETENSORS_SUFFIXES else "torch"
    # safetensors first: its header length (u64 little-endian) may start with 0x80, a pickle's first byte
    header = struct.unpack("<Q", head[:8])[0] if len(head) == 9 and head[8:9] == b"{" else None
    if header is not None and (header <= size - 8 or expected == "safetensors"):
        kind = "safetensors"
        if header > MAX_HEADER_BYTES:
            over = "" if header <= size - 8 else f", and the file holds only {size - 8} after the length field"
            raise CheckpointError(path, f"its safetensors header length field says {header} bytes, more than the "
                                  f"{MAX_HEADER_BYTES} bytes any checkpoint header needs{over}: the file is damaged "
                                  "or not a checkpoint", "check that this is the right file, or " + COPY_AGAIN)
        if header > size - 8:
            raise CheckpointError(path, f"truncated (its safetensors header says {header} bytes, the file has "
                                  f"{size - 8} after the length)", COPY_AGAIN)
    elif head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch zip archive / legacy pickle
        kind = "torch"
    else:
        raise CheckpointError(path, "unrecognized content (neither a torch checkpoint nor safetensors)",
                              "check that this is the right file and that it was copied completely")
    if kind != expected:
        raise CheckpointError(path, f"the extension says {expected} but the content is {kind}",
                              "rename the file with the matching extension")
    return kind


def checked_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in TORCH_SUFFIXES + SAFETENSORS_SUFFIXES:
        raise CheckpointError(path, f"unsupported extension {shown(suffix) or '(none)'!r}",
                              f"use one of {', '.join(TORCH_SUFFIXES + SAFETENSORS_SUFFIXES)}")
    return suffix


def _zip_layout(path: Path) -> tuple[bool, int]:
    """``(mmap, inflated)`` of a torch zip from its directory alone; ``(False, 0)`` for a legacy file or a zip
    whose directory does not read (``torch.load`` then fails and the failure is explained)."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error):
        return False, 0
    size = path.stat().st_size
    pickles = [r for r in records if r.filename.endswith("data.pkl")]
    tensors = [r for r in records if re.search(r"(^|/)data/[^/]+$", r.filename)]
    for record in pickles:
        if record.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(path, f"its object pickle {shown(record.filename)} declares {record.file_size} "
                                  f"bytes once unpacked, more than the {MAX_PICKLE_BYTES} a checkpoint's needs "
                                  "(a compressed bomb or a damaged file); refusing to unpack it",
                                  "re-save the weights alone with torch.save(state_dict, path)")
    if any(r.header_offset + r.compress_size > size for r in records):
        raise CheckpointError(path, "truncated (a record of its zip directory lies past the end of the file)",
                              COPY_AGAIN)
    compressed = [r for r in tensors if r.compress_type != zipfile.ZIP_STORED]
    return not compressed, sum(r.file_size for r in compressed)


def _meta_tensor(path: Path, key: str, view: Any) -> torch.Tensor:
    """A safetensors entry as a meta tensor (its shape and dtype), from ``get_slice`` without reading data."""
    dtype = _ST_DTYPES.get(view.get_dtype())
    if dtype is None:
        raise CheckpointError(path, f"tensor {shown(key)!r} has dtype {view.get_dtype()}, which this reader does "
                              "not load", "save it as float32")
    return torch.empty(view.get_shape(), dtype=dtype, device="meta")


def _json(path: Path, metadata: Mapping[str, str], key: str, default: str) -> Any:
    """One JSON entry of our safetensors metadata, parsed: odd or deeply nested JSON is a CheckpointError."""
    try:
        return json.loads(metadata.get(key, default))
    except (ValueError, RecursionError) as exc:   # RecursionError: "[[[[..." nested past the interpreter's limit
        what = "nested too deeply" if isinstance(exc, RecursionError) else one_line(exc, 120)
        raise CheckpointError(path, f"damaged m2ae metadata ({key!r}: {what})", "re-save the checkpoint") from None


# ------------------------------------------------------------------------------------------ contents
def _tensor_dict(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(path, "the state dict is missing or empty")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(path, f"state dict entries that are not tensors: {listing(bad)}")
    sparse = [f"{k} ({v.layout})" for k, v in obj.items() if v.layout != torch.strided]
    if sparse:
        raise CheckpointError(path, f"sparse tensors, which are no weights of a network: {listing(sparse)}",
                              "save dense tensors (tensor.to_dense())")
    return dict(obj)


WRAPPER_KEYS = ("params_ema", "params", "state_dict", "model", "ema", "net")  # preference order
SHOWN = 8  # keys listed per category in an error message


def unwrap(path: Path, obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Stage 2a: descend through training-framework wrappers until a flat ``{name: tensor}`` dict."""
    while obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and obj[k]), None)
        if inner is None:
            keys = [str(k) for k in obj]
            raise CheckpointError(path, f"no state dict found among the top-level keys {listing(keys)}",
                                  f"expected a bare state dict or one under {'/'.join(WRAPPER_KEYS)}")
        obj = inner
    return _tensor_dict(path, obj)


def _check_storage(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Tensors read for real must hold data: one saved from the meta device comes back without any."""
    empty = [k for k, v in state.items() if v.device.type == "meta"]
    if empty:
        raise CheckpointError(path, f"tensors without data (saved from the meta device): {listing(empty)}",
                              "save the weights of a network that holds them")


def listing(items: list[str]) -> str:
    """``(N) [a, b, ... K more]``: names escaped (an empty one shows as ``''``), at most :data:`SHOWN` of them."""
    names = [shown(k) if k else "''" for k in items]
    head = ", ".join(names[:SHOWN])
    return f"({len(items)}) [{head}" + (f", ... {len(items) - SHOWN} more]" if len(items) > SHOWN else "]")


# ------------------------------------------------------------------------------------------ failures
def _load_failure(path: Path, exc: Exception) -> CheckpointError:
    """Why ``torch.load(weights_only=True)`` failed, from the file's main pickle
    (see :func:`m2ae_infer.pickle_scan.scan_main_pickle`)."""
    scan = scan_main_pickle(path)
    text = str(exc)
    if scan is None:  # not even the container opens (a zip cut short, ...)
        return _corrupt(path, exc)
    if scan.damage:
        return CheckpointError(path, scan.damage, COPY_AGAIN)
    fix = TRUST_PICKLE if scan.ordinary else TRUST_TORCH
    refused = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    needs = scan.needs or ([refused.group(1)] if refused else [])
    if needs:
        names = ", ".join(needs[:3]) + (f" and {len(needs) - 3} more" if len(needs) > 3 else "")
        return CheckpointError(path, f"refusing to unpickle code (the file needs {names})", fix)
    if scan.ordinary:
        return CheckpointError(path, f"not a weights-only checkpoint (an ordinary pickle, protocol {scan.protocol}, "
                               "not a torch.save file): refusing to unpickle it", fix)
    if "Weights only load failed" in text:  # a clean pickle the weights-only unpickler cannot read
        detail = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text, re.S)
        why = (f"saved with pickle protocol {scan.protocol}, which torch.load(weights_only=True) cannot read"
               if scan.protocol >= 4 else f"torch.load(weights_only=True) cannot read it: "
               f"{one_line(detail.group(1) if detail else text, 160)}")
        return CheckpointError(path, f"not a weights-only checkpoint ({why}): refusing to unpickle it", fix)
    return _corrupt(path, exc)


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    detail = one_line(exc, 160)
    return CheckpointError(path, f"truncated or corrupt ({type(exc).__name__}: {detail})", COPY_AGAIN)
